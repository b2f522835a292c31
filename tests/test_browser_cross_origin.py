"""Signed links in media elements of a page on another site, in Debian's headless Chromium against a real
``python -m mvserver`` with API keys on.

The page is served from ``http://localhost:<port>`` and the API from ``http://127.0.0.1:<port>``: two sites, so
Chromium loads the ``<img>``, ``<audio>`` and ``<video>`` sources (plain ``src``, no ``crossorigin``) without
``Origin`` and with ``Sec-Fetch-Site: cross-site``, as a frontend on its own domain would. The second test is that
frontend: it runs the project flow itself (fetch with the key, CORS) with a key of default limits, and loads the
song, the candidate images, every clip and the final video straight from the signed links the answers and events
carry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from helpers import PROJECT, requires_browser, song_bytes, start_server

try:
    from playwright.sync_api import Browser
except ImportError:  # pragma: no cover - depends on the environment
    pass

SECRET = "cross-site-signing-secret-" + "y" * 24
SEEK_TO = 2.5


class PageServer:
    """One HTML page on 127.0.0.1 (the test addresses it as ``localhost``), set with :meth:`show`, and files the page
    may fetch from its own origin (:meth:`serve`)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, kind = owner.files.get(self.path, (b"", "text/plain"))
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def show(self, html: str) -> None:
        self.serve("/", html.encode(), "text/html; charset=utf-8")

    def serve(self, path: str, body: bytes, kind: str) -> None:
        self.files[path] = (body, kind)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def page_server() -> Iterator[PageServer]:
    server = PageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, page_server: PageServer) -> Iterator[tuple[str, str]]:
    """The API with keys on and the page's origin in MV_CORS_ORIGINS: (base URL, key)."""
    tmp = tmp_path_factory.mktemp("cross-site-api")
    env = {
        "MV_API_KEYS_FILE": str(tmp / "keys.yaml"),
        "MV_URL_SIGNING_SECRET": SECRET,
        "MV_CORS_ORIGINS": page_server.origin,
        "MV_SANDBOX_VIDEO_SECONDS": "1",
    }
    created = subprocess.run(
        [sys.executable, "-m", "mvserver", "keys", "create", "page"],
        cwd=PROJECT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = created.stdout.strip().splitlines()[-1]
    for base in start_server(tmp, env):
        yield base, key


def call(base: str, key: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_succeeded(base: str, key: str, job_id: str) -> None:
    """Follow the job's event stream until its final event."""
    request = urllib.request.Request(f"{base}/api/mv/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("event: ") and line[7:] in ("succeeded", "failed", "canceled"):
                assert line == "event: succeeded", line
                return
    pytest.fail("the event stream ended without a final event")


@requires_browser
def test_a_page_on_another_site_shows_a_signed_image_and_plays_and_seeks_a_signed_video(
    browser: Browser, api: tuple[str, str], page_server: PageServer
) -> None:
    base, key = api
    image = call(
        base,
        key,
        "/api/mv/generate_character_reference",
        {"character_description": "a tall man with a red beard and yellow boots"},
    )
    job = call(base, key, "/api/mv/generate_video", {"prompt": "a lighthouse keeper dances on the pier", "duration": 8})
    wait_succeeded(base, key, job["job_id"])
    video_url = call(base, key, f"/api/mv/jobs/{job['job_id']}")["signed_urls"]["video_url"]
    image_url = image["signed_urls"]["image_url"]
    assert "sig=" in video_url and "sig=" in image_url and key not in video_url + image_url
    page_server.show(f"""<!doctype html><title>storyboard</title>
<img id="image" src="{base}{image_url}" alt="character">
<video id="video" src="{base}{video_url}" muted playsinline preload="auto"></video>""")

    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    seen: list[tuple[str, int, dict[str, str]]] = []
    page.on(
        "response",
        lambda r: seen.append((r.url, r.status, r.request.all_headers())) if r.url.startswith(base) else None,
    )
    page.goto(page_server.origin + "/")

    page.wait_for_function(
        "() => { const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0; }"
    )
    page.evaluate("() => document.getElementById('video').play()")
    page.wait_for_function("() => document.getElementById('video').currentTime > 0.2")
    seeked = page.evaluate(f"""() => new Promise((resolve, reject) => {{
        const v = document.getElementById('video');
        v.addEventListener('seeked', () => resolve({{time: v.currentTime, duration: v.duration}}), {{once: true}});
        v.addEventListener('error', () => reject(new Error('media error ' + (v.error && v.error.code))), {{once: true}});
        v.currentTime = {SEEK_TO};
    }})""")
    assert abs(seeked["time"] - SEEK_TO) < 0.2 and seeked["duration"] > SEEK_TO, seeked
    page.wait_for_function(f"() => document.getElementById('video').currentTime > {SEEK_TO + 0.2}")
    context.close()

    assert seen and all(status < 400 for _, status, _ in seen), [(u, s) for u, s, _ in seen]
    media = [headers for url, _, headers in seen if "/get_video/" in url or "/get_image/" in url]
    assert media and all(h.get("sec-fetch-site") == "cross-site" and "origin" not in h for h in media), media
    assert any(status == 206 for url, status, _ in seen if "/get_video/" in url)  # the video was read by ranges


FLOW = """
const API = %(base)s, KEY = %(key)s, FINAL = ["succeeded", "failed", "canceled"];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const $ = (id) => document.getElementById(id);
// fetch with the key; a 429 is retried after its Retry-After (waiting helps, or the server would not send it).
async function call(method, path, body, headers = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = {method, headers: {Authorization: `Bearer ${KEY}`, ...headers}};
    if (body !== undefined) {
      init.body = headers["Content-Type"] ? body : JSON.stringify(body);
      init.headers["Content-Type"] = headers["Content-Type"] || "application/json";
    }
    const response = await fetch(API + path, init);
    const answer = await response.json();
    if (response.status === 429 && response.headers.get("Retry-After") && attempt < 3) {
      await sleep(1000 * Number(response.headers.get("Retry-After")));
      continue;
    }
    if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(answer)}`);
    return answer;
  }
}
// Follow jobs on one EventSource (its signed link); onSucceeded(data) gets each job's final event.
function follow(eventsUrl, count, onSucceeded) {
  return new Promise((resolve, reject) => {
    const source = new EventSource(API + eventsUrl);
    let ended = 0;
    for (const name of FINAL) {
      source.addEventListener(name, (e) => {
        const data = JSON.parse(e.data);
        if (name !== "succeeded") { source.close(); reject(new Error(`job ${data.job_id} ${name}`)); return; }
        onSucceeded(data);
        if (++ended === count) { source.close(); resolve(); }
      });
    }
  });
}
function media(tag, src, parent) {
  const element = document.createElement(tag);
  element.muted = true; element.playsInline = true; element.preload = "auto"; element.src = API + src;
  $(parent).append(element);
  return element;
}
window.flow = (async () => {
  const songBytes = await (await fetch("/song.mp3")).arrayBuffer();
  const song = await call("POST", "/api/mv/upload_audio", songBytes, {"Content-Type": "audio/mpeg"});
  media("audio", song.signed_urls.audio_url, "song");
  let project = await call("POST", "/api/mv/projects", {idea: "a night train", character_description: "a singer",
                                                       audio_id: song.audio_id, number_of_scenes: 6});
  const base = `/api/mv/projects/${project.project_id}`;
  project = await call("POST", `${base}/write_scenes`);
  const candidates = await call("POST", "/api/mv/generate_character_reference",
                                {character_description: "a singer", number_of_images: 3});
  for (const image of candidates.images) media("img", image.signed_urls.image_url, "candidates");
  project = (await call("POST", `${base}/character`)).project;
  project = await call("PATCH", base, {scenes: project.scenes.map((s) => ({id: s.id, duration: 4}))},
                       {"If-Match": project.etag});
  const started = await call("POST", `${base}/clips`, {generate_audio: false});
  const ids = started.jobs.map((job) => job.job_id);
  const link = await call("GET", `/api/mv/events/link?jobs=${ids.join(",")}`);
  await follow(link.events_url, ids.length, (data) => media("video", data.signed_urls.video_url, "clips"));
  project = await call("GET", base);
  const storyboard = project.scenes.map((scene) => scene.signed_urls.chosen_video_url);
  const assembly = await call("POST", `${base}/assemble`, {});
  await follow(assembly.signed_urls.events_url, 1, (data) => media("video", data.signed_urls.video_url, "final"));
  return {clips: ids.length, storyboard, character: project.signed_urls.character_image_url};
})();
"""


@requires_browser
def test_a_page_on_another_site_runs_the_project_flow_with_a_default_key_and_plays_everything_by_signed_links(
    browser: Browser, api: tuple[str, str], page_server: PageServer
) -> None:
    base, key = api  # the key has the default limits: jobs_burst 5, 4 running
    page_server.serve("/song.mp3", song_bytes(24.0, frequency=330), "audio/mpeg")
    page_server.show(f"""<!doctype html><title>storyboard</title>
<div id="song"></div><div id="candidates"></div><div id="clips"></div><div id="final"></div>
<script>{FLOW % {"base": json.dumps(base), "key": json.dumps(key)}}</script>""")
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(240_000)
    seen: list[tuple[str, int, dict[str, str]]] = []
    page.on(
        "response",
        lambda r: seen.append((r.url, r.status, r.request.all_headers())) if r.url.startswith(base) else None,
    )
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_server.origin + "/")
    result = page.evaluate("() => window.flow")
    assert not errors, errors
    assert result["clips"] == 6 and len(result["storyboard"]) == 6 and all(result["storyboard"])

    # Everything loads and plays from its signed link: the song, the three candidates, the six clips as their
    # final events named them, the storyboard's chosen clips, the character and the final video (seeked too).
    page.wait_for_function(
        "() => [...document.querySelectorAll('#candidates img')]"
        ".every((i) => i.complete && i.naturalWidth > 0) && "
        "document.querySelectorAll('#candidates img').length === 3"
    )
    played = page.evaluate(
        """async (extra) => {
        const plays = async (element) => {
            await element.play();
            while (element.currentTime < 0.2) await new Promise((r) => setTimeout(r, 50));
            return element.currentTime;
        };
        const loads = (tag, src) => new Promise((resolve, reject) => {
            const element = document.createElement(tag);
            element.addEventListener(tag === 'img' ? 'load' : 'loadedmetadata', () => resolve(true));
            element.addEventListener('error', () => reject(new Error('cannot load ' + src)));
            element.muted = true; element.src = src;
        });
        const api = new URL(document.querySelector('#song audio').src).origin;
        const elements = [...document.querySelectorAll('#song audio, #clips video, #final video')];
        const times = await Promise.all(elements.map(plays));
        await Promise.all([...extra.storyboard.map((u) => loads('video', api + u)), loads('img', api + extra.character)]);
        const final = document.querySelector('#final video');
        final.pause();
        final.currentTime = 10;
        await new Promise((r) => final.addEventListener('seeked', r, {once: true}));
        return {count: elements.length, times, seeked: final.currentTime, duration: final.duration};
    }""",
        result,
    )
    context.close()
    assert played["count"] == 1 + 6 + 1 and all(t > 0.1 for t in played["times"]), played
    assert abs(played["seeked"] - 10) < 0.5 and played["duration"] > 20, played

    # The six clips started with one request. A 429 (an empty job bucket: the clips take its whole burst, the
    # earlier test's job a token) only ever delayed a step by its Retry-After, after which the same request passed.
    assert seen and all(status < 400 or status == 429 for _, status, _ in seen), [(u, s) for u, s, _ in seen]
    clips = [status for url, status, _ in seen if url.endswith("/clips")]
    assert clips[-1] == 202 and set(clips[:-1]) <= {429}, clips
    media = [
        (url, headers)
        for url, status, headers in seen
        if any(part in url for part in ("/get_video/", "/get_image/", "/get_audio/"))
    ]
    assert {part for url, _ in media for part in ("/get_video/", "/get_image/", "/get_audio/") if part in url} == {
        "/get_video/",
        "/get_image/",
        "/get_audio/",
    }
    assert all(
        "sig=" in url and headers.get("sec-fetch-site") == "cross-site" and "origin" not in headers
        for url, headers in media
    ), media
    assert not any(key in url for url, _, _ in seen)
