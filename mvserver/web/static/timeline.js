// The song timeline of the project page: the waveform (peaks), the beat and bar grid, the section bands, the scene
// blocks over them, the cuts between scenes (drag one, or focus it and use the arrow keys, to move it; it snaps to
// the bar lines, to the beats with Shift), and the playhead of the assembled video.
//
// It draws what it is given: the project (each scene's `window` in the song) and the song (GET /api/mv/songs/{id},
// with its `analysis`). Moving a cut calls `onCut(sceneId, songTime, snap)`; the page PATCHes the scene's trim with
// that snap, and the server's answer (the cut on the grid) is drawn when it comes back.

const SECTION_COLOURS = ["#c7d2fe", "#fde68a", "#bbf7d0", "#fecaca", "#ddd6fe", "#bae6fd", "#fed7aa", "#e5e7eb"];

const el = (tag, cls, attrs = {}) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
};

export function nearest(points, t) {
  let best = null;
  for (const p of points) if (best === null || Math.abs(p - t) < Math.abs(best - t)) best = p;
  return best;
}

export class Timeline {
  constructor(root, onCut) {
    this.root = root;
    this.onCut = onCut;
    this.project = null;
    this.song = null;
    this.length = 0;
    this.playheadTime = null;
  }

  // Draw the project's scenes over its song (song may be null while it is loading).
  render(project, song) {
    this.project = project;
    this.song = song;
    const analysis = song && song.analysis;
    this.length = Math.max(project.song ? project.song.duration : 0, analysis ? analysis.duration : 0);
    this.root.replaceChildren();
    if (!project.song || !this.length) return;
    const track = el("div", "tl-track", { "data-testid": "timeline-track" });
    this.track = track;
    const wave = el("canvas", "tl-wave", { "data-testid": "timeline-wave", "aria-hidden": "true" });
    track.append(wave, this.sectionBands(analysis), this.gridLines(analysis), this.sceneBlocks(project),
                 this.cutHandles(project));
    this.playhead = el("div", "tl-playhead", { "data-testid": "playhead", "aria-hidden": "true" });
    this.playhead.hidden = this.playheadTime === null;
    track.append(this.playhead);
    this.root.append(track);
    this.drawWave(wave, analysis);
    if (this.playheadTime !== null) this.setPlayhead(this.playheadTime);
  }

  x(t) {
    return `${(100 * t) / this.length}%`;
  }

  drawWave(canvas, analysis) {
    const width = Math.max(1, Math.round(this.root.clientWidth || 800));
    const height = 96;
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, width, height);
    const peaks = analysis && analysis.peaks;
    if (!peaks || !peaks.values.length) return;
    context.fillStyle = "#64748b";
    const perPixel = (this.length * peaks.rate) / width; // peak values per pixel column
    for (let px = 0; px < width; px += 1) {
      const from = Math.floor(px * perPixel);
      const to = Math.max(from + 1, Math.floor((px + 1) * perPixel));
      let peak = 0;
      for (let i = from; i < to && i < peaks.values.length; i += 1) peak = Math.max(peak, peaks.values[i]);
      const h = Math.max(1, peak * (height - 4));
      context.fillRect(px, (height - h) / 2, 1, h);
    }
  }

  sectionBands(analysis) {
    const layer = el("div", "tl-sections");
    for (const [i, section] of ((analysis && analysis.sections) || []).entries()) {
      const band = el("div", "tl-section", { "data-testid": `section-${i + 1}`, "data-label": section.label,
                                             title: `section ${section.label}: ${section.start.toFixed(2)}–${section.end.toFixed(2)} s` });
      band.style.left = this.x(section.start);
      band.style.width = this.x(section.end - section.start);
      band.style.background = SECTION_COLOURS[section.cluster % SECTION_COLOURS.length];
      band.textContent = section.label;
      layer.append(band);
    }
    return layer;
  }

  gridLines(analysis) {
    const layer = el("div", "tl-grid", { "aria-hidden": "true" });
    const grid = analysis && analysis.grid;
    if (!grid) return layer;
    const bars = new Set(grid.downbeats);
    for (const beat of grid.beats) {
      const line = el("div", bars.has(beat) ? "tl-bar" : "tl-beat", { "data-time": String(beat) });
      line.style.left = this.x(beat);
      layer.append(line);
    }
    return layer;
  }

  sceneBlocks(project) {
    const layer = el("div", "tl-scenes");
    for (const [i, scene] of project.scenes.entries()) {
      if (!scene.window) continue;
      const block = el("div", "tl-scene", { "data-testid": `timeline-scene-${i + 1}`, "data-scene-id": scene.id,
                                            "data-start": String(scene.window.start), "data-end": String(scene.window.end),
                                            title: this.describe(i, scene.window) });
      block.style.left = this.x(scene.window.start);
      block.style.width = this.x(scene.window.end - scene.window.start);
      block.textContent = String(i + 1);
      layer.append(block);
    }
    return layer;
  }

  describe(i, window) {
    const bars = window.first_bar !== null && window.end_bar !== null
      ? ` · bars ${Math.max(window.first_bar, 0) + 1}–${window.end_bar}` : "";
    const section = window.section_label ? ` · section ${window.section_label}` : "";
    return `scene ${i + 1}: ${window.start.toFixed(2)}–${window.end.toFixed(2)} s${bars}${section} · cut on ${window.cut}`;
  }

  // The cut after each scene but the last: a slider over the song's time.
  cutHandles(project) {
    const layer = el("div", "tl-cuts");
    const scenes = project.scenes;
    for (let i = 0; i < scenes.length - 1; i += 1) {
      const scene = scenes[i];
      if (!scene.window) continue;
      const handle = el("div", "tl-cut", {
        role: "slider", tabindex: "0", "data-testid": `cut-${i + 1}`, "data-scene-id": scene.id,
        "data-time": String(scene.window.end), "data-cut": scene.window.cut,
        "aria-label": `Cut after scene ${i + 1}`, "aria-valuemin": "0", "aria-valuemax": String(this.length),
        "aria-valuenow": String(scene.window.end), "aria-valuetext": `${scene.window.end.toFixed(2)} s, on ${scene.window.cut}`,
      });
      handle.style.left = this.x(scene.window.end);
      this.draggable(handle, scene);
      layer.append(handle);
    }
    return layer;
  }

  // Where a cut may go: at least half a second into its scene, at most as far as its clip reaches.
  reach(scene) {
    const chosen = scene.versions.find((v) => v.job_id === scene.chosen_job_id);
    const length = chosen ? chosen.duration : scene.duration;
    return [scene.window.start + 0.5, scene.window.start + (length - scene.trim_in)];
  }

  snapped(t, scene, fine) {
    const [low, high] = this.reach(scene);
    const grid = this.song && this.song.analysis && this.song.analysis.grid;
    const clamped = Math.min(Math.max(t, low), high);
    if (!grid) return { time: clamped, snap: "none" };
    const points = (fine ? grid.beats : grid.downbeats).filter((p) => p >= low - 1e-6 && p <= high + 1e-6);
    if (!points.length) return { time: clamped, snap: "none" };
    return { time: nearest(points, clamped), snap: fine ? "beat" : "bar" };
  }

  draggable(handle, scene) {
    const timeAt = (event) => {
      const box = this.track.getBoundingClientRect();
      return ((event.clientX - box.left) / box.width) * this.length;
    };
    let moving = null;
    handle.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      handle.setPointerCapture(event.pointerId);
      moving = this.snapped(scene.window.end, scene, event.shiftKey);
      handle.classList.add("is-moving");
    });
    handle.addEventListener("pointermove", (event) => {
      if (!moving) return;
      moving = this.snapped(timeAt(event), scene, event.shiftKey);
      this.place(handle, moving.time);
    });
    const drop = (event) => {
      if (!moving) return;
      const target = moving;
      moving = null;
      handle.classList.remove("is-moving");
      if (event.type === "pointerup" && Math.abs(target.time - scene.window.end) > 1e-3) {
        this.onCut(scene.id, target.time, target.snap);
      } else {
        this.place(handle, scene.window.end);
      }
    };
    handle.addEventListener("pointerup", drop);
    handle.addEventListener("pointercancel", drop);
    handle.addEventListener("keydown", (event) => {
      if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
      event.preventDefault();
      const grid = this.song && this.song.analysis && this.song.analysis.grid;
      const [low, high] = this.reach(scene);
      const step = event.key === "ArrowRight" ? 1 : -1;
      let target;
      if (grid) {
        const points = (event.shiftKey ? grid.beats : grid.downbeats).filter((p) => p >= low - 1e-6 && p <= high + 1e-6);
        // The cut is on a whole frame, so up to half a frame off its grid point: skip the point it is on.
        const ahead = points.filter((p) => (step > 0 ? p > scene.window.end + 0.05 : p < scene.window.end - 0.05));
        if (!ahead.length) return;
        target = { time: step > 0 ? ahead[0] : ahead[ahead.length - 1], snap: event.shiftKey ? "beat" : "bar" };
      } else {
        target = { time: Math.min(Math.max(scene.window.end + step * 0.5, low), high), snap: "none" };
      }
      this.place(handle, target.time);
      this.onCut(scene.id, target.time, target.snap);
    });
  }

  place(handle, t) {
    handle.style.left = this.x(t);
    handle.dataset.time = String(t);
    handle.setAttribute("aria-valuenow", String(t));
  }

  // The assembled video's position, as song time (the video starts at the song's offset).
  setPlayhead(time) {
    this.playheadTime = time;
    if (!this.playhead) return;
    this.playhead.hidden = false;
    this.playhead.style.left = this.x(Math.min(time, this.length));
    this.playhead.dataset.time = String(time);
  }
}
