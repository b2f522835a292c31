// The demo page: scenes -> character reference -> video jobs followed over Server-Sent Events.

import { asError, callApi } from "./api.js";

const FINAL_EVENTS = ["succeeded", "failed", "canceled"];
const JOB_EVENTS = ["queued", "running", "progress", ...FINAL_EVENTS];

const $ = (selector, root = document) => root.querySelector(selector);

const page = {
  imageId: null,
  scenes: [], // {index, root, els, job: {id, statusUrl, source}}
};

// ---------------------------------------------------------------------------------------------- API helpers

async function api(method, url, body) {
  return (await callApi(method, url, body)).body;
}

// ---------------------------------------------------------------------------------------------- rendering

function announce(text) {
  $("#status").textContent = text;
}

function showError(box, error) {
  box.replaceChildren();
  if (!error) {
    box.hidden = true;
    return;
  }
  const title = document.createElement("p");
  const code = document.createElement("code");
  code.className = "error-code";
  code.textContent = error.code;
  title.append(code, " ", error.message || "");
  box.append(title);
  const details = [
    ["field", error.field],
    ["provider", error.provider],
    ["provider status", error.provider_status],
    ["provider error", error.provider_error],
  ].filter(([, value]) => value !== undefined && value !== null && value !== "");
  if (details.length) {
    const list = document.createElement("dl");
    for (const [name, value] of details) {
      const term = document.createElement("dt");
      term.textContent = name;
      const desc = document.createElement("dd");
      desc.textContent = typeof value === "string" ? value : JSON.stringify(value, null, 1);
      desc.dataset.field = name.replace(" ", "_");
      list.append(term, desc);
    }
    box.append(list);
  }
  box.hidden = false;
}

function setBusy(button, busy, label) {
  button.disabled = busy;
  button.setAttribute("aria-busy", String(busy));
  if (label) button.textContent = label;
}

// ---------------------------------------------------------------------------------------------- health

async function loadHealth() {
  const target = $("#health");
  try {
    const health = await api("GET", "/api/mv/health");
    const providers = Object.entries(health.providers || {});
    const simulated = providers.filter(([, mode]) => mode === "sandbox").map(([name]) => name);
    $("#sandbox-badge").hidden = simulated.length === 0;
    target.textContent = simulated.length
      ? `${health.mode} · simulated: ${simulated.join(", ")}`
      : "live · every provider is real";
    for (const option of $("#backend").options) {
      const service = option.value === "gemini" ? "gemini_video" : option.value;
      const mode = health.providers && health.providers[service];
      if (mode) option.textContent = `${option.value} (${mode})`;
    }
  } catch (err) {
    const error = asError(err);
    target.textContent = `service unavailable: ${error.code}`;
  }
}

// ---------------------------------------------------------------------------------------------- scenes

async function createScenes(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const button = $("#create-scenes");
  const errorBox = $("#scenes-error");
  showError(errorBox, null);
  const body = {
    idea: form.idea.value,
    character_description: form.character_description.value,
    number_of_scenes: Number(form.number_of_scenes.value),
  };
  setBusy(button, true, "Creating scenes…");
  announce("Writing scenes…");
  try {
    const result = await api("POST", "/api/mv/create_scenes", body);
    renderScenes(result);
    announce(`${result.scenes.length} scene${result.scenes.length === 1 ? "" : "s"} ready.`);
  } catch (err) {
    showError(errorBox, asError(err));
    announce("Creating scenes failed.");
  } finally {
    setBusy(button, false, "Create scenes");
  }
}

function renderScenes(result) {
  for (const scene of page.scenes) closeStream(scene);
  const list = $("#scenes");
  list.replaceChildren();
  page.scenes = result.scenes.map((data, i) => buildScene(i + 1, data, result.sandbox));
  for (const scene of page.scenes) list.append(scene.root);
  const summary = $("#scenes-summary");
  const count = result.scenes.length;
  summary.textContent = `${count} scene${count === 1 ? "" : "s"} · id ${result.scenes_id}` + (result.sandbox ? " · sandbox output" : "");
  summary.hidden = false;
  $("#scenes-empty").hidden = true;
  $("#generate-all").disabled = page.scenes.length === 0;
}

function buildScene(index, data, sandbox) {
  const root = $("#scene-template").content.firstElementChild.cloneNode(true);
  const id = `scene-${index}`;
  root.id = id;
  root.dataset.testid = id;
  const els = {
    title: $(".scene-title", root),
    description: $(".scene-description", root),
    negative: $(".scene-negative", root),
    generate: $(".generate-video", root),
    cancel: $(".cancel-video", root),
    sandbox: $(".job-sandbox", root),
    job: $(".job", root),
    progress: $(".job-progress", root),
    status: $(".job-status", root),
    logs: $(".job-logs", root),
    error: $(".job-error", root),
    video: $(".job-video", root),
  };
  els.title.textContent = `Scene ${index}` + (sandbox ? " (sandbox)" : "");
  bindLabel($(".scene-description-label", root), els.description, `${id}-description`);
  bindLabel($(".scene-negative-label", root), els.negative, `${id}-negative`);
  els.description.value = data.description;
  els.negative.value = data.negative_description || "";
  const testIds = { generate: "generate-video", cancel: "cancel-video", sandbox: "job-sandbox", progress: "progress",
                    status: "job-status", error: "job-error", video: "video", job: "job" };
  for (const [key, name] of Object.entries(testIds)) els[key].dataset.testid = `${name}-${index}`;
  els.generate.setAttribute("aria-label", `Generate video for scene ${index}`);
  els.cancel.setAttribute("aria-label", `Cancel video for scene ${index}`);
  els.progress.setAttribute("aria-label", `Scene ${index} progress`);
  const scene = { index, root, els, job: null };
  els.generate.addEventListener("click", () => generateVideo(scene));
  els.cancel.addEventListener("click", () => cancelVideo(scene));
  return scene;
}

function bindLabel(label, control, id) {
  control.id = id;
  control.dataset.testid = id;
  label.htmlFor = id;
}

// ---------------------------------------------------------------------------------------------- character

async function generateCharacter() {
  const button = $("#generate-character");
  const errorBox = $("#character-error");
  showError(errorBox, null);
  setBusy(button, true, "Generating character…");
  announce("Rendering the character reference…");
  try {
    const result = await api("POST", "/api/mv/generate_character_reference", {
      character_description: $("#character-description").value,
    });
    page.imageId = result.image_id;
    const image = $("#character-image");
    image.src = `data:${result.mime_type};base64,${result.image_base64}`;
    $("#character-caption").textContent = `image ${result.image_id}` + (result.sandbox ? " · sandbox image" : "");
    $("#character").hidden = false;
    $("#character").classList.toggle("is-sandbox", Boolean(result.sandbox));
    announce("Character reference ready; videos will use it.");
  } catch (err) {
    showError(errorBox, asError(err));
    announce("Generating the character failed.");
  } finally {
    setBusy(button, false, "Generate character");
  }
}

// ---------------------------------------------------------------------------------------------- video jobs

async function generateVideo(scene) {
  const { els } = scene;
  closeStream(scene);
  showError(els.error, null);
  els.error.classList.remove("is-notice");
  els.video.hidden = true;
  els.video.removeAttribute("src");
  els.logs.hidden = true;
  els.sandbox.hidden = true;
  els.job.hidden = false;
  setProgress(els.progress, null);
  els.status.textContent = "submitting…";
  els.generate.disabled = true;
  const body = {
    prompt: els.description.value,
    negative_prompt: els.negative.value,
    backend: $("#backend").value,
    provider_logs: true, // this page shows the provider's log lines and a moving bar while the clip is made
  };
  if (page.imageId) body.reference_image_id = page.imageId;
  try {
    const accepted = await api("POST", "/api/mv/generate_video", body);
    scene.job = { id: accepted.job_id, statusUrl: accepted.status_url, source: null, timer: null, last: null };
    els.sandbox.hidden = !accepted.sandbox;
    els.cancel.hidden = false;
    els.cancel.disabled = false;
    announce(`Scene ${scene.index}: video job ${accepted.job_id} queued on ${accepted.backend}.`);
    follow(scene, accepted.events_url);
  } catch (err) {
    els.job.hidden = true;
    els.generate.disabled = false;
    showError(els.error, asError(err));
    announce(`Scene ${scene.index}: the video could not be started.`);
  }
}

function follow(scene, eventsUrl) {
  const source = new EventSource(eventsUrl);
  scene.job.source = source;
  scene.job.timer = setInterval(() => renderJobStatus(scene), 1000);
  for (const name of JOB_EVENTS) {
    source.addEventListener(name, (message) => onJobEvent(scene, name, JSON.parse(message.data)));
  }
  source.addEventListener("error", () => {
    if (scene.job && scene.job.source === source && source.readyState === EventSource.CONNECTING) {
      announce(`Scene ${scene.index}: connection lost, reconnecting…`);
    }
  });
}

function onJobEvent(scene, name, update) {
  const { els } = scene;
  // A status event carries the job's full state; a progress event only what moved: merge it onto the last state.
  const job = { ...(scene.job.last || {}), ...update };
  scene.job.last = job;
  scene.job.receivedAt = performance.now();
  els.sandbox.hidden = !job.sandbox;
  setProgress(els.progress, job.progress);
  renderJobStatus(scene);
  if (update.logs) {
    els.logs.textContent = update.logs;
    els.logs.hidden = false;
  }
  if (!FINAL_EVENTS.includes(name)) return;
  closeStream(scene);
  if (job.progress === null || job.progress === undefined) setProgress(els.progress, 0); // stop the indeterminate bar
  els.cancel.hidden = true;
  els.generate.disabled = false;
  if (name === "succeeded") {
    els.video.src = job.video_url;
    els.video.hidden = false;
    announce(`Scene ${scene.index}: video ready${job.sandbox ? " (sandbox)" : ""}.`);
  } else {
    showError(els.error, job.error || { code: `job_${name}`, message: `the job ended ${name}` });
    els.error.classList.toggle("is-notice", name === "canceled");
    announce(`Scene ${scene.index}: video ${name}.`);
  }
}

// "status · stage · NN% · N s"; between events the seconds keep counting from the last event's elapsed_seconds.
function renderJobStatus(scene) {
  const job = scene.job && scene.job.last;
  if (!job) return;
  const running = !FINAL_EVENTS.includes(job.status);
  const since = running ? (performance.now() - scene.job.receivedAt) / 1000 : 0;
  const seconds = Math.round((job.elapsed_seconds || 0) + since);
  const percent = job.progress === null || job.progress === undefined ? "" : ` · ${Math.round(job.progress * 100)}%`;
  scene.els.status.textContent = `${job.status} · ${job.stage}${percent} · ${seconds} s`;
}

function setProgress(progress, value) {
  if (value === null || value === undefined) {
    progress.removeAttribute("value"); // indeterminate
  } else {
    progress.value = value;
  }
}

function closeStream(scene) {
  if (scene.job && scene.job.source) {
    scene.job.source.close();
    scene.job.source = null;
    clearInterval(scene.job.timer);
  }
}

async function cancelVideo(scene) {
  if (!scene.job) return;
  scene.els.cancel.disabled = true;
  try {
    const job = await api("DELETE", scene.job.statusUrl);
    if (FINAL_EVENTS.includes(job.status) && scene.job.source) onJobEvent(scene, job.status, job);
  } catch (err) {
    scene.els.cancel.disabled = false;
    showError(scene.els.error, asError(err));
  }
}

async function generateAll() {
  const button = $("#generate-all");
  button.disabled = true;
  try {
    for (const scene of page.scenes) {
      if (!scene.els.generate.disabled) await generateVideo(scene);
    }
  } finally {
    button.disabled = page.scenes.length === 0;
  }
}

// ---------------------------------------------------------------------------------------------- start

$("#scenes-form").addEventListener("submit", createScenes);
$("#generate-character").addEventListener("click", generateCharacter);
$("#generate-all").addEventListener("click", generateAll);
loadHealth();
