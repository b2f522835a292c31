"""Signed links in media elements of a page on another site, in Debian's headless Chromium against a real
``python -m mvserver`` with API keys on.

The page is served from ``http://localhost:<port>`` and the API from ``http://127.0.0.1:<port>``: two sites, so
Chromium loads the ``<img>`` and ``<video>`` sources (plain ``src``, no ``crossorigin``) without ``Origin`` and with
``Sec-Fetch-Site: cross-site``, as a frontend on its own domain would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from test_browser import PROJECT, _start_server, browser, requires_browser  # noqa: F401

try:
    from playwright.sync_api import Browser
except ImportError:  # pragma: no cover - depends on the environment
    pass

SECRET = "cross-site-signing-secret-" + "y" * 24
SEEK_TO = 2.5


class PageServer:
    """One HTML page on 127.0.0.1 (the test addresses it as ``localhost``), set with :meth:`show`."""

    def __init__(self) -> None:
        self.html = b""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook
                body = owner.html if self.path == "/" else b""
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
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
        self.html = html.encode()

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
    env = {"MV_API_KEYS_FILE": str(tmp / "keys.yaml"), "MV_URL_SIGNING_SECRET": SECRET,
           "MV_CORS_ORIGINS": page_server.origin, "MV_SANDBOX_VIDEO_SECONDS": "1"}
    created = subprocess.run([sys.executable, "-m", "mvserver", "keys", "create", "page"], cwd=PROJECT,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True)
    key = created.stdout.strip().splitlines()[-1]
    for base in _start_server(tmp, env):
        yield base, key


def call(base: str, key: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_succeeded(base: str, key: str, job_id: str) -> None:
    """Follow the job's event stream until its final event."""
    request = urllib.request.Request(f"{base}/api/mv/jobs/{job_id}/events",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("event: ") and line[7:] in ("succeeded", "failed", "canceled"):
                assert line == "event: succeeded", line
                return
    pytest.fail("the event stream ended without a final event")


@requires_browser
def test_a_page_on_another_site_shows_a_signed_image_and_plays_and_seeks_a_signed_video(
        browser: Browser, api: tuple[str, str], page_server: PageServer) -> None:
    base, key = api
    image = call(base, key, "/api/mv/generate_character_reference",
                 {"character_description": "a tall man with a red beard and yellow boots"})
    job = call(base, key, "/api/mv/generate_video", {"prompt": "a lighthouse keeper dances on the pier",
                                                    "duration": 8})
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
    page.on("response", lambda r: seen.append((r.url, r.status, r.request.all_headers()))
            if r.url.startswith(base) else None)
    page.goto(page_server.origin + "/")

    page.wait_for_function("() => { const i = document.getElementById('image'); "
                           "return i.complete && i.naturalWidth > 0; }")
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
