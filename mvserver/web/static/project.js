// The music-video project page: song -> project and scenes -> character -> clips -> lip sync -> assembly.
// Every clip, lip-sync and assembly job is followed on ONE multi-job EventSource (/api/mv/events?jobs=…).

import { RequestFailed, asError, callApi } from "./api.js";
import { Timeline } from "./timeline.js";

const FINAL = ["succeeded", "failed", "canceled"];
const EVENTS = ["queued", "running", "progress", ...FINAL];
const KEY_STORAGE = "mvKey";

const $ = (selector, root = document) => root.querySelector(selector);

const state = {
  song: null, // the upload_audio answer
  project: null, // the project record as last read (its etag is what PATCH sends in If-Match)
  jobs: new Map(), // job_id -> latest known job state (merged events)
  assemblyId: null,
  stream: { source: null, ids: [], positions: new Map(), opening: 0, relinked: false },
  poller: null,
  signed: new Map(), // job_id -> signed video link (keys on)
  songInfo: null, // GET /api/mv/songs/{id} of the project's song: its analysis
  songPoll: null,
  songLoading: false,
  timeline: null,
};

// ---------------------------------------------------------------------------------------------- API

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(method, url, body, headers = {}) {
  const key = apiKey();
  try {
    const { body: payload, response } = await callApi(method, url, body,
                                                      key ? { ...headers, Authorization: `Bearer ${key}` } : headers);
    return { body: payload, etag: response.headers.get("ETag") };
  } catch (err) {
    if (err instanceof RequestFailed && err.status === 401) askForKey(err.error);
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------- rendering helpers

function announce(text) {
  $("#status").textContent = text;
}

function showError(box, error) {
  box.replaceChildren();
  box.hidden = !error;
  if (!error) return;
  const title = document.createElement("p");
  const code = document.createElement("code");
  code.className = "error-code";
  code.textContent = error.code;
  title.append(code, " ", error.message || "");
  if (error.field) {
    const field = document.createElement("span");
    field.className = "error-field";
    field.textContent = ` (field: ${error.field})`;
    title.append(field);
  }
  box.append(title);
}

function setProgress(progress, value) {
  if (value === null || value === undefined) progress.removeAttribute("value");
  else progress.value = value;
}

async function busy(button, text, work) {
  const label = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.textContent = text;
  try {
    return await work();
  } finally {
    button.textContent = label;
    button.setAttribute("aria-busy", "false");
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------- keys

function askForKey(error) {
  const section = $("#key-section");
  if (!section.hidden) return;
  section.hidden = false;
  announce(`This server needs an API key (${error.code}). Type it in above.`);
  $("#api-key").focus();
}

function useKey(event) {
  event.preventDefault();
  const value = $("#api-key").value.trim();
  if (!value) return;
  sessionStorage.setItem(KEY_STORAGE, value);
  $("#api-key").value = "";
  $("#key-section").hidden = true;
  announce("API key saved for this tab. Try the step again.");
}

// A link the browser loads without headers: the plain path with keys off, the job's signed link with keys on
// (the one the answer or event carried, else read once from the job).
async function videoLink(jobId, plain, signed) {
  if (!apiKey()) return plain;
  if (signed) state.signed.set(jobId, signed);
  if (!state.signed.has(jobId)) {
    const { body } = await api("GET", `/api/mv/jobs/${jobId}`);
    state.signed.set(jobId, body.signed_urls && body.signed_urls.video_url || plain);
  }
  return state.signed.get(jobId);
}

// ---------------------------------------------------------------------------------------------- health

async function loadHealth() {
  try {
    const { body: health } = await api("GET", "/api/mv/health");
    const simulated = Object.entries(health.providers || {}).filter(([, m]) => m === "sandbox").map(([n]) => n);
    $("#sandbox-badge").hidden = simulated.length === 0;
    $("#health").textContent = simulated.length ? `${health.mode} · simulated: ${simulated.join(", ")}`
      : "live · every provider is real";
    if (health.auth && health.auth.keys_required && !apiKey()) {
      $("#key-section").hidden = false;
      announce("This server needs an API key: type it in above.");
    }
    const select = $("#style");
    for (const style of health.styles || []) {
      const option = document.createElement("option");
      option.value = style.name;
      option.textContent = style.label || style.name;
      option.title = style.description || "";
      select.append(option);
    }
  } catch (err) {
    $("#health").textContent = `service unavailable: ${asError(err).code}`;
  }
}

// ---------------------------------------------------------------------------------------------- 1. song

async function uploadSong() {
  const file = $("#song-file").files[0];
  const box = $("#song-error");
  showError(box, null);
  if (!file) {
    showError(box, { code: "missing_field", message: "choose a song file first", field: "song-file" });
    return;
  }
  const form = new FormData();
  form.append("file", file);
  await busy($("#upload-song"), "Uploading…", async () => {
    try {
      const { body } = await api("POST", "/api/mv/upload_audio", form);
      state.song = { ...body, name: file.name };
      state.songInfo = body;
      const info = $("#song-info");
      showSongInfo(body);
      info.dataset.duration = String(body.duration);
      info.hidden = false;
      announce(`Song uploaded (${body.duration.toFixed(1)} s); the project will be sized to it.`);
      if (body.analysis_status === "pending") state.songPoll = setTimeout(() => loadSongInfo(body.audio_id), 1000);
    } catch (err) {
      showError(box, asError(err));
      announce("The song upload failed.");
    }
  });
}

function describeAnalysis(song) {
  if (song.analysis_status === "pending") return "analysing…";
  if (song.analysis_status === "off") return "not analysed (the server's analysis is off)";
  if (song.analysis_status === "failed") return `analysis failed (${song.analysis_error.code})`;
  const grid = song.analysis.grid;
  if (!grid) return `no beat grid (${song.analysis.no_grid_reason})`;
  return `${grid.tempo.toFixed(1)} BPM · ${grid.beats_per_bar} beats to the bar · ${song.analysis.sections.length} sections`;
}

// ---------------------------------------------------------------------------------------------- the song timeline

function showSongInfo(song) {
  const info = $("#song-info");
  info.textContent = `${state.song.name}: ${song.duration.toFixed(1)} s · ${song.format} · ${song.sample_rate} Hz` +
    ` · ${describeAnalysis(song)}`;
  info.dataset.analysis = song.analysis_status;
}

// The song as GET /api/mv/songs/{id} describes it (the uploaded one, or the project's); while its analysis is
// pending, asked again each second.
async function loadSongInfo(audioId) {
  clearTimeout(state.songPoll);
  try {
    const { body } = await api("GET", `/api/mv/songs/${audioId}`);
    state.songInfo = body;
    if (state.song && state.song.audio_id === audioId) showSongInfo(body);
    if (state.project && state.project.song && state.project.song.audio_id === audioId) renderTimeline();
    if (body.analysis_status === "pending") state.songPoll = setTimeout(() => loadSongInfo(audioId), 1000);
  } catch (err) {
    showError($("#timeline-error"), asError(err));
  }
}

function renderTimeline() {
  const project = state.project;
  const section = $("#timeline-section");
  section.hidden = !project || !project.song;
  if (section.hidden) return;
  const song = state.songInfo && state.songInfo.audio_id === project.song.audio_id ? state.songInfo : null;
  if (!song && !state.songLoading) {
    state.songLoading = true;
    loadSongInfo(project.song.audio_id).finally(() => { state.songLoading = false; });
  }
  if (!state.timeline) state.timeline = new Timeline($("#timeline"), moveCut);
  const sized = project.song.sized_by === "bars" ? "scenes cut on the bar lines"
    : project.song.sized_by === "length" ? `scenes sized by length (${project.song.sizing_note})` : "";
  const info = $("#timeline-info");
  info.textContent = [song ? describeAnalysis(song) : "loading the song…", sized].filter(Boolean).join(" · ");
  info.dataset.analysis = song ? song.analysis_status : "loading";
  state.timeline.render(project, song);
}

// A cut moved on the timeline: the scene's kept part now ends at `time` (song seconds); the server snaps it.
async function moveCut(sceneId, time, snap) {
  showError($("#timeline-error"), null);
  try {
    await patchProject((project) => {
      const scene = project.scenes.find((s) => s.id === sceneId);
      const trimOut = Math.round((scene.trim_in + time - scene.window.start) * 1e6) / 1e6;
      return { scenes: [{ id: sceneId, trim_out: trimOut, snap }] };
    });
    const moved = state.project.scenes.find((s) => s.id === sceneId);
    announce(`Cut moved to ${moved.window.end.toFixed(2)} s (on a ${moved.window.cut}).`);
  } catch (err) {
    showError($("#timeline-error"), asError(err));
    renderTimeline(); // the cut goes back where the project has it
    announce(`Moving the cut failed: ${asError(err).code}.`);
  }
}

function followPlayhead() {
  const video = $("#final-video");
  const update = () => {
    if (state.timeline && state.project && state.project.song) {
      state.timeline.setPlayhead(state.project.song.offset + video.currentTime);
    }
  };
  for (const name of ["timeupdate", "seeked", "loadedmetadata"]) video.addEventListener(name, update);
}

// ---------------------------------------------------------------------------------------------- 2. project

async function createProject(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const box = $("#project-error");
  showError(box, null);
  const body = { idea: form.idea.value, character_description: form.character_description.value };
  if (form.style.value) body.style = form.style.value;
  if (state.song) body.audio_id = state.song.audio_id;
  else body.number_of_scenes = Number(form.number_of_scenes.value);
  await busy($("#create-project"), "Creating…", async () => {
    try {
      announce("Creating the project…");
      const created = await api("POST", "/api/mv/projects", body);
      setProject(created.body);
      announce("Writing the scenes…");
      const written = await api("POST", `/api/mv/projects/${created.body.project_id}/write_scenes`, {},
                                { "If-Match": created.body.etag });
      setProject(written.body);
      announce(`${written.body.scenes.length} scenes written.`);
    } catch (err) {
      showError(box, asError(err));
      announce("Creating the project failed.");
    }
  });
}

function setProject(project) {
  state.project = project;
  for (const scene of project.scenes) {
    for (const version of scene.versions) {
      const known = state.jobs.get(version.job_id);
      // A version's live state from the record, unless the stream already told us something newer.
      if (!known || FINAL.includes(version.status) || !FINAL.includes(known.status)) {
        state.jobs.set(version.job_id, { ...(known || {}), ...version });
      }
    }
  }
  renderProject();
}

async function reloadProject() {
  const { body } = await api("GET", `/api/mv/projects/${state.project.project_id}`);
  setProject(body);
  return body;
}

// PATCH built from the freshest record: on 412 (someone else wrote first) reload and reapply the change once.
// Returns whether it had to.
async function patchProject(build) {
  const url = `/api/mv/projects/${state.project.project_id}`;
  try {
    const { body } = await api("PATCH", url, build(state.project), { "If-Match": state.project.etag });
    setProject(body);
    return false;
  } catch (err) {
    if (!(err instanceof RequestFailed) || err.status !== 412) throw err;
    announce("The project changed elsewhere; reloaded it and applied the change again.");
    const fresh = await reloadProject();
    const { body } = await api("PATCH", url, build(fresh), { "If-Match": fresh.etag });
    setProject(body);
    return true;
  }
}

// ---------------------------------------------------------------------------------------------- 3. character

async function generateCandidates() {
  const box = $("#character-error");
  showError(box, null);
  await busy($("#generate-characters"), "Generating…", async () => {
    try {
      announce("Rendering three character candidates…");
      const { body } = await api("POST", "/api/mv/generate_character_reference", {
        character_description: state.project.character_description, number_of_images: 3,
      });
      await renderCandidates(body);
      announce(`${body.images.length} candidates ready: pick one.`);
    } catch (err) {
      showError(box, asError(err));
      announce("Generating the character failed.");
    }
  });
}

async function renderCandidates(result) {
  const list = $("#candidates");
  list.replaceChildren();
  for (const [i, image] of result.images.entries()) {
    const item = document.createElement("li");
    item.dataset.testid = `candidate-${i + 1}`;
    item.dataset.imageId = image.image_id;
    const img = document.createElement("img");
    img.alt = `Character candidate ${i + 1}`;
    img.src = await imageLink(image);
    const pick = document.createElement("button");
    pick.type = "button";
    pick.textContent = "Use this one";
    pick.dataset.testid = `pick-candidate-${i + 1}`;
    pick.setAttribute("aria-label", `Use character candidate ${i + 1}`);
    pick.addEventListener("click", () => pickCandidate(image.image_id, pick));
    item.append(img, pick);
    list.append(item);
  }
  markChosen();
}

// With keys on every candidate carries its signed link.
async function imageLink(image) {
  return (apiKey() && image.signed_urls && image.signed_urls.image_url) || image.image_url;
}

async function pickCandidate(imageId, button) {
  const box = $("#character-error");
  showError(box, null);
  await busy(button, "Choosing…", async () => {
    try {
      await patchProject(() => ({ character_image_id: imageId }));
      announce("Character chosen; every clip uses it as the reference image.");
    } catch (err) {
      showError(box, asError(err));
    }
  });
}

function markChosen() {
  const chosen = state.project && state.project.character_image_id;
  for (const item of $("#candidates").children) {
    const on = item.dataset.imageId === chosen;
    item.classList.toggle("is-chosen", on);
    item.setAttribute("aria-current", on ? "true" : "false");
  }
}

// ---------------------------------------------------------------------------------------------- 4. scenes and clips

function renderProject() {
  const project = state.project;
  const summary = $("#project-summary");
  const song = project.song ? ` · song ${project.song.duration.toFixed(1)} s from ${project.song.offset} s` : "";
  summary.textContent = `project ${project.project_id} · ${project.scenes.length} scenes${song}`;
  summary.dataset.projectId = project.project_id;
  summary.hidden = false;
  $("#scenes-empty").hidden = project.scenes.length > 0;
  $("#generate-characters").disabled = false;
  $("#generate-clips").disabled = project.scenes.length === 0;
  const list = $("#scenes");
  list.replaceChildren(...project.scenes.map((scene, i) => buildScene(scene, i + 1, project.scenes.length)));
  const ready = project.scenes.length > 0 && project.scenes.every((s) => s.chosen_job_id);
  $("#assemble").disabled = !ready;
  const total = $("#total-seconds");
  total.textContent = ready ? `The video will be ${project.total_seconds.toFixed(2)} s long.` : "Every scene needs a clip first.";
  total.dataset.seconds = String(project.total_seconds);
  markChosen();
  renderTimeline();
}

function buildScene(scene, index, count) {
  const root = $("#scene-template").content.firstElementChild.cloneNode(true);
  root.dataset.testid = `scene-${index}`;
  root.dataset.sceneId = scene.id;
  const els = {
    title: $(".scene-title", root), prompt: $(".scene-prompt", root), up: $(".move-up", root),
    down: $(".move-down", root), regenerate: $(".regenerate", root), lipsync: $(".lipsync", root),
    trimIn: $(".trim-in", root), trimOut: $(".trim-out", root), applyTrim: $(".apply-trim", root),
    version: $(".version", root), job: $(".job", root), progress: $(".job-progress", root),
    status: $(".job-status", root), error: $(".scene-error", root), video: $(".job-video", root),
  };
  els.title.textContent = `Scene ${index} · ${scene.seconds.toFixed(1)} s` +
    (scene.song_start === null ? "" : ` · song from ${scene.song_start.toFixed(1)} s`);
  els.prompt.textContent = scene.prompt || "(no prompt yet)";
  const names = { up: "move-up", down: "move-down", regenerate: "regenerate", lipsync: "lipsync", trimIn: "trim-in",
                  trimOut: "trim-out", applyTrim: "apply-trim", version: "version", progress: "progress",
                  status: "job-status", error: "scene-error", video: "video" };
  for (const [key, name] of Object.entries(names)) els[key].dataset.testid = `${name}-${index}`;
  for (const [cls, control] of [[".trim-in-label", els.trimIn], [".trim-out-label", els.trimOut],
                                [".version-label", els.version]]) {
    control.id = `${control.className}-${index}`;
    $(cls, root).htmlFor = control.id;
  }
  for (const [el, verb] of [[els.up, "Move up"], [els.down, "Move down"], [els.regenerate, "Regenerate"],
                            [els.lipsync, "Lip sync"], [els.applyTrim, "Apply trim to"]]) {
    el.setAttribute("aria-label", `${verb} scene ${index}`);
  }
  els.progress.setAttribute("aria-label", `Scene ${index} progress`);
  els.up.disabled = index === 1;
  els.down.disabled = index === count;
  els.trimIn.value = String(scene.trim_in);
  els.trimOut.value = String(scene.trim_out);
  els.trimIn.max = els.trimOut.max = String(chosenLength(scene));
  for (const version of scene.versions) {
    const option = document.createElement("option");
    const job = state.jobs.get(version.job_id) || version;
    option.value = version.job_id;
    option.textContent = `v${scene.versions.indexOf(version) + 1} · ${job.status}` +
      (version.job_id === scene.chosen_job_id ? " (chosen)" : "");
    option.disabled = job.status !== "succeeded";
    option.selected = version.job_id === scene.chosen_job_id;
    els.version.append(option);
  }
  els.version.disabled = scene.versions.length === 0;
  els.applyTrim.disabled = els.regenerate.disabled = !scene.prompt;
  els.lipsync.disabled = !scene.chosen_job_id;
  els.up.addEventListener("click", () => sceneAction(els, () => move(scene.id, -1)));
  els.down.addEventListener("click", () => sceneAction(els, () => move(scene.id, 1)));
  els.applyTrim.addEventListener("click", () => sceneAction(els, () => patchProject(() => ({
    scenes: [{ id: scene.id, trim_in: Number(els.trimIn.value), trim_out: Number(els.trimOut.value) }],
  }))));
  els.version.addEventListener("change", () => sceneAction(els, () => patchProject(() => ({
    scenes: [{ id: scene.id, chosen_job_id: els.version.value }],
  }))));
  els.regenerate.addEventListener("click", () => sceneAction(els, () => regenerate(scene.id)));
  els.lipsync.addEventListener("click", () => sceneAction(els, () => lipsync(scene.id)));
  renderSceneJob(root, scene);
  return root;
}

function chosenLength(scene) {
  const chosen = scene.versions.find((v) => v.job_id === scene.chosen_job_id);
  return chosen ? chosen.duration : scene.duration;
}

async function sceneAction(els, work) {
  showError(els.error, null);
  try {
    await work();
  } catch (err) {
    showError(els.error, asError(err));
    announce(`That change failed: ${asError(err).code}.`);
  }
}

async function move(sceneId, step) {
  const retried = await patchProject((project) => {
    const ids = project.scenes.map((s) => s.id);
    const at = ids.indexOf(sceneId);
    const to = Math.min(Math.max(at + step, 0), ids.length - 1);
    [ids[at], ids[to]] = [ids[to], ids[at]];
    return { order: ids };
  });
  announce(retried ? "Scene moved; the project had changed elsewhere, so it was reloaded and the move applied again."
    : "Scene moved.");
}

// The scene's newest version (the one being made, else the chosen one) drives its bar, status and player.
function renderSceneJob(root, scene) {
  const current = scene.awaited_job_id || scene.chosen_job_id || (scene.versions.at(-1) || {}).job_id;
  const els = { job: $(".job", root), progress: $(".job-progress", root), status: $(".job-status", root),
                video: $(".job-video", root) };
  if (!current) return;
  const job = state.jobs.get(current) || {};
  els.job.hidden = false;
  setProgress(els.progress, job.status === "succeeded" ? 1 : job.progress);
  const percent = job.progress === null || job.progress === undefined ? "" : ` · ${Math.round(job.progress * 100)}%`;
  const versions = scene.versions.length;
  els.status.textContent = `${job.status || "queued"}${job.stage ? ` · ${job.stage}` : ""}${percent}` +
    ` · ${versions} version${versions === 1 ? "" : "s"}` + (scene.awaited_job_id && scene.chosen_job_id ? " · regenerating…" : "");
  els.status.dataset.versions = String(versions);
  if (scene.chosen_job_id && !els.video.getAttribute("src")) {
    const signed = scene.signed_urls && scene.signed_urls.chosen_video_url;
    videoLink(scene.chosen_job_id, scene.chosen_video_url, signed).then((link) => {
      els.video.src = link;
      els.video.hidden = false;
    }).catch(() => {});
  }
}

async function generateClips() {
  const box = $("#clips-error");
  showError(box, null);
  await busy($("#generate-clips"), "Starting…", async () => {
    try {
      const { body } = await api("POST", `/api/mv/projects/${state.project.project_id}/clips`, {},
                                 { "If-Match": state.project.etag });
      setProject(body.project);
      follow(body.jobs.map((j) => j.job_id));
      announce(`${body.jobs.length} clip job${body.jobs.length === 1 ? "" : "s"} started.`);
    } catch (err) {
      showError(box, asError(err));
      announce("Starting the clips failed.");
    }
  });
}

async function regenerate(sceneId) {
  const { body } = await api("POST", `/api/mv/projects/${state.project.project_id}/scenes/${sceneId}/clips`, {});
  setProject(body.project);
  follow([body.job.job_id]);
  announce("Regenerating the scene: a new version is on its way.");
}

async function lipsync(sceneId) {
  const { body } = await api("POST", `/api/mv/projects/${state.project.project_id}/scenes/${sceneId}/lipsync`, {});
  setProject(body.project);
  follow([body.job.job_id]);
  announce("Lip sync started: it becomes a new version of the scene.");
}

// ---------------------------------------------------------------------------------------------- the one stream

// Follow more jobs: reopen the multi-job stream with the new list, every known job resuming at its position.
function follow(newIds) {
  const stream = state.stream;
  const ids = [...stream.ids.filter((id) => !isFinal(id)), ...newIds.filter((id) => !stream.ids.includes(id))];
  openStream([...new Set(ids)].filter((id) => !isFinal(id)));
}

function isFinal(jobId) {
  const job = state.jobs.get(jobId);
  return Boolean(job && FINAL.includes(job.status));
}

async function openStream(ids) {
  const stream = state.stream;
  if (stream.source) stream.source.close();
  stream.source = null;
  stream.ids = ids;
  const opening = ++stream.opening; // a later call supersedes this one while it waits for its link
  if (ids.length === 0) return;
  const after = ids.map((id) => stream.positions.get(id) || 0).join(".");
  let url = `/api/mv/events?jobs=${ids.join(",")}&after=${after}`;
  if (apiKey()) {
    // Keys on: an EventSource cannot send the key, so ask (with the key) for a link signed for exactly these jobs.
    try {
      url = (await api("GET", `/api/mv/events/link?jobs=${ids.join(",")}&after=${after}`)).body.events_url;
    } catch {
      if (opening === stream.opening) startPolling();
      return;
    }
    if (opening !== stream.opening) return;
  }
  const source = new EventSource(url);
  stream.source = source;
  document.body.dataset.follow = "stream";
  for (const name of EVENTS) {
    source.addEventListener(name, (message) => onEvent(source, name, message));
  }
  source.addEventListener("open", () => { stream.relinked = false; });
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.CLOSED || stream.source !== source) return;
    // Refused (e.g. the signed link expired): one fresh link, then the polling fallback.
    if (apiKey() && !stream.relinked) {
      stream.relinked = true;
      openStream(stream.ids.filter((id) => !isFinal(id)));
    } else {
      startPolling();
    }
  });
}

function onEvent(source, name, message) {
  const stream = state.stream;
  if (stream.source !== source) return;
  const update = JSON.parse(message.data);
  if (message.lastEventId) {
    message.lastEventId.split(".").forEach((pos, i) => stream.positions.set(stream.ids[i], Number(pos)));
  }
  state.jobs.set(update.job_id, { ...(state.jobs.get(update.job_id) || {}), ...update });
  if (apiKey() && update.signed_urls && update.signed_urls.video_url) state.signed.set(update.job_id, update.signed_urls.video_url);
  if (update.job_id === state.assemblyId) renderAssembly();
  else refreshScenes();
  if (FINAL.includes(name)) {
    follow([]); // drop the finished job from the stream
    if (update.job_id === state.assemblyId) assemblyDone();
    else reloadProject().catch(() => {});
  }
}

function refreshScenes() {
  if (!state.project) return;
  for (const root of $("#scenes").children) {
    const scene = state.project.scenes.find((s) => s.id === root.dataset.sceneId);
    if (scene) renderSceneJob(root, scene);
  }
}

// Polling fallback (the stream or its link refused): read the jobs (with the key, if any) until each one ends.
function startPolling() {
  if (state.poller) return;
  document.body.dataset.follow = "polling";
  document.body.dataset.polled = "true";
  state.poller = setInterval(async () => {
    const running = state.stream.ids.filter((id) => !isFinal(id));
    if (running.length === 0) {
      clearInterval(state.poller);
      state.poller = null;
      return;
    }
    for (const id of running) {
      try {
        const { body } = await api("GET", `/api/mv/jobs/${id}`);
        state.jobs.set(id, { ...(state.jobs.get(id) || {}), ...body });
        if (body.signed_urls && body.signed_urls.video_url) state.signed.set(id, body.signed_urls.video_url);
        if (id === state.assemblyId) {
          renderAssembly();
          if (FINAL.includes(body.status)) assemblyDone();
        } else if (FINAL.includes(body.status)) {
          await reloadProject();
        } else {
          refreshScenes();
        }
      } catch {
        // the next tick tries again
      }
    }
  }, 1000);
}

// ---------------------------------------------------------------------------------------------- 5. assembly

async function assemble() {
  const box = $("#assemble-error");
  showError(box, null);
  const video = $("#final-video");
  video.hidden = true;
  video.removeAttribute("src");
  const transition = $("#transition").value;
  const body = { transition, clip_audio: "drop" };
  if (transition === "crossfade") body.crossfade_seconds = Number($("#crossfade-seconds").value);
  await busy($("#assemble"), "Assembling…", async () => {
    try {
      const { body: job } = await api("POST", `/api/mv/projects/${state.project.project_id}/assemble`, body);
      state.assemblyId = job.job_id;
      state.jobs.set(job.job_id, { status: "queued", ...job });
      if (job.signed_urls && job.signed_urls.video_url) state.signed.set(job.job_id, job.signed_urls.video_url);
      $("#assembly").hidden = false;
      renderAssembly();
      follow([job.job_id]);
      announce("Assembling the video…");
    } catch (err) {
      showError(box, asError(err));
      announce("Starting the assembly failed.");
    }
  });
}

function renderAssembly() {
  const job = state.jobs.get(state.assemblyId) || {};
  setProgress($("#assembly-progress"), job.status === "succeeded" ? 1 : job.progress);
  const percent = job.progress === null || job.progress === undefined ? "" : ` · ${Math.round(job.progress * 100)}%`;
  $("#assembly-status").textContent = `${job.status || "queued"}${job.stage ? ` · ${job.stage}` : ""}${percent}`;
}

async function assemblyDone() {
  const job = state.jobs.get(state.assemblyId);
  renderAssembly();
  if (job.status !== "succeeded") {
    showError($("#assemble-error"), job.error || { code: `job_${job.status}`, message: `the assembly ended ${job.status}` });
    announce(`The assembly ${job.status}.`);
    return;
  }
  const video = $("#final-video");
  video.src = await videoLink(state.assemblyId, job.video_url || `/api/mv/get_video/${state.assemblyId}`);
  video.hidden = false;
  announce("The music video is ready.");
}

// ---------------------------------------------------------------------------------------------- start

$("#key-form").addEventListener("submit", useKey);
$("#upload-song").addEventListener("click", uploadSong);
$("#project-form").addEventListener("submit", createProject);
$("#generate-characters").addEventListener("click", generateCandidates);
$("#generate-clips").addEventListener("click", generateClips);
$("#assemble").addEventListener("click", assemble);
followPlayhead();
loadHealth();
