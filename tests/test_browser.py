"""The demo page at ``/`` driven in Debian's headless Chromium against a real sandboxed server process."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer
from helpers import BROWSER_VIDEO_SECONDS, PROJECT, module_loop, open_page, requires_browser, start_server
from object_store import S3Server

try:
    from playwright.sync_api import Browser, Page, Response, expect, sync_playwright
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from start_server(tmp_path_factory.mktemp("server"))


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """A fresh page on the single-clip demo; fails the test on script or console errors and on requests to another origin."""
    yield from open_page(browser, server, "/single")


def _create_scenes(page: Page, count: int) -> None:
    page.get_by_label("Idea").fill("A synth-pop song about a lighthouse keeper who learns to dance")
    page.get_by_label("Character description").fill("a tall man with a red beard, a navy wool sweater and yellow boots")
    page.get_by_label("Number of scenes").fill(str(count))
    page.get_by_test_id("create-scenes").click()
    expect(page.get_by_test_id("scenes").locator("li.scene")).to_have_count(count)
    expect(page.get_by_test_id("scene-1-description")).to_have_value(re.compile(r"lighthouse keeper"))


def _progress(page: Page, index: int) -> float | None:
    """The bar's value, or None while it is indeterminate."""
    return page.get_by_test_id(f"progress-{index}").evaluate("el => el.hasAttribute('value') ? el.value : null")


def _sample_progress(page: Page, index: int, timeout: float) -> list[float | None]:
    samples: list[float | None] = []
    video = page.get_by_test_id(f"video-{index}")
    error = page.get_by_test_id(f"job-error-{index}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not video.is_visible() and not error.is_visible():
        samples.append(_progress(page, index))
        page.wait_for_timeout(100)
    samples.append(_progress(page, index))
    return samples


def _wait_video_playable(page: Page, index: int) -> None:
    selector = f'[data-testid="video-{index}"]'
    try:
        page.wait_for_function("s => document.querySelector(s).readyState >= 2", arg=selector, timeout=15_000)
    except PlaywrightError as exc:
        diagnostics = page.eval_on_selector(
            selector,
            """v => ({
            readyState: v.readyState, networkState: v.networkState, src: v.currentSrc,
            error: v.error && {code: v.error.code, message: v.error.message},
            h264: v.canPlayType('video/mp4; codecs="avc1.42E01E"'),
            h264_aac: v.canPlayType('video/mp4; codecs="avc1.64001F, mp4a.40.2"')})""",
        )
        pytest.fail(f"the video never reached HAVE_CURRENT_DATA: {diagnostics} ({exc})")


@requires_browser
def test_demo_flow_scenes_character_video(page: Page, tmp_path: Path) -> None:
    expect(page.get_by_test_id("sandbox-badge")).to_be_visible()
    expect(page.get_by_test_id("health")).to_contain_text("sandbox")
    _create_scenes(page, 2)
    expect(page.get_by_test_id("scenes-summary")).to_contain_text("sandbox output")

    page.get_by_test_id("generate-character").click()
    page.wait_for_function(
        "() => { const i = document.getElementById('character-image'); return i.complete && i.naturalWidth > 0; }"
    )
    assert page.get_by_test_id("character-image").get_attribute("src").startswith("data:image/png;base64,")
    expect(page.get_by_test_id("character-caption")).to_contain_text("sandbox image")

    started = time.monotonic()
    page.get_by_test_id("generate-video-1").click()
    expect(page.get_by_test_id("cancel-video-1")).to_be_visible()
    samples = _sample_progress(page, 1, timeout=BROWSER_VIDEO_SECONDS + 15)
    _wait_video_playable(page, 1)

    determinate = [value for value in samples if value is not None]
    assert len(set(determinate)) >= 3, f"the bar should move through several values: {samples}"
    assert determinate == sorted(determinate), f"progress went backwards: {samples}"
    assert determinate[0] < 0.5 < determinate[-1], samples
    assert time.monotonic() - started >= BROWSER_VIDEO_SECONDS * 0.8

    video = page.get_by_test_id("video-1")
    assert video.get_attribute("src").startswith("/api/mv/get_video/")
    assert video.evaluate("v => v.duration") > 0
    expect(page.get_by_test_id("job-status-1")).to_contain_text("succeeded")
    expect(page.get_by_test_id("job-sandbox-1")).to_be_visible()
    expect(page.get_by_test_id("cancel-video-1")).to_be_hidden()
    expect(page.get_by_test_id("job-error-1")).to_be_hidden()
    expect(page.get_by_test_id("sandbox-badge")).to_be_visible()
    expect(page.get_by_test_id("status")).to_contain_text("Scene 1: video ready (sandbox)")
    page.screenshot(path=str(tmp_path / "demo-flow.png"), full_page=True)


@requires_browser
def test_demo_shows_request_errors_failed_and_canceled_jobs(page: Page, tmp_path: Path) -> None:
    page.get_by_label("Number of scenes").fill("99")
    page.get_by_test_id("create-scenes").click()
    scenes_error = page.get_by_test_id("scenes-error")
    expect(scenes_error.locator(".error-code")).to_have_text("invalid_field")
    expect(scenes_error.locator('dd[data-field="field"]')).to_have_text("number_of_scenes")

    _create_scenes(page, 2)
    expect(scenes_error).to_be_hidden()
    description = page.get_by_test_id("scene-1-description")
    description.fill(description.input_value() + " [sandbox:fail]")
    page.get_by_test_id("generate-all").click()
    expect(page.get_by_test_id("job-status-2")).to_contain_text("running")
    page.get_by_test_id("cancel-video-2").click()

    error = page.get_by_test_id("job-error-1")
    expect(error).to_be_visible(timeout=BROWSER_VIDEO_SECONDS * 1000 + 15_000)
    expect(error.locator(".error-code")).to_have_text("provider_prediction_failed")
    expect(error.locator('dd[data-field="provider"]')).to_have_text("replicate")
    expect(error.locator('dd[data-field="provider_status"]')).to_have_text("failed")
    expect(error.locator('dd[data-field="provider_error"]')).not_to_be_empty()
    expect(page.get_by_test_id("job-status-1")).to_contain_text("failed")
    expect(page.get_by_test_id("video-1")).to_be_hidden()
    expect(page.get_by_test_id("generate-video-1")).to_be_enabled()

    expect(page.get_by_test_id("job-error-2").locator(".error-code")).to_have_text("job_canceled")
    expect(page.get_by_test_id("job-status-2")).to_contain_text("canceled")
    expect(page.get_by_test_id("cancel-video-2")).to_be_hidden()
    expect(page.get_by_test_id("video-2")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "demo-errors.png"), full_page=True)


# -- with artefacts in object storage ----------------------------------------------------------------------------------


class ObjectServer(NamedTuple):
    base: str
    bucket: str
    store: str  # the bucket's origin (host:port), where the server's redirects send the browser


@pytest.fixture(scope="module")
def object_server(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[ObjectServer]:
    """A sandboxed server keeping its artefacts in a bucket of moto's S3 server (``MV_STORAGE_URL``): every
    artefact route answers a 302 to a presigned link of the bucket."""
    tmp = tmp_path_factory.mktemp("object-server")
    bucket = s3_server.new_bucket()
    env = {**s3_server.bucket_env(bucket), "MV_SCRATCH_DIR": str(tmp / "scratch")}
    try:
        for base in start_server(tmp, env):
            yield ObjectServer(base, bucket, urlsplit(s3_server.endpoint).netloc)
    finally:
        s3_server.drop_bucket(bucket)


@pytest.fixture
def object_page(browser: Browser, object_server: ObjectServer) -> Iterator[Page]:
    """The single-clip demo of the object-storage server; requests may go to the bucket too (the redirects')."""
    yield from open_page(browser, object_server.base, "/single", origins=(object_server.store,))


@requires_browser
def test_the_video_plays_and_seeks_through_the_redirect_to_the_bucket(
    object_page: Page, object_server: ObjectServer, tmp_path: Path
) -> None:
    page = object_page
    responses: list[Response] = []
    page.on("response", lambda response: responses.append(response))
    _create_scenes(page, 1)
    page.get_by_test_id("generate-video-1").click()
    expect(page.get_by_test_id("video-1")).to_be_visible(timeout=BROWSER_VIDEO_SECONDS * 1000 + 15_000)
    _wait_video_playable(page, 1)
    video = page.get_by_test_id("video-1")
    source = urlsplit(video.evaluate("v => v.currentSrc"))
    assert source.netloc == urlsplit(object_server.base).netloc and source.path.startswith("/api/mv/get_video/")
    job_id = source.path.rsplit("/", 1)[1]
    key_path = f"/{object_server.bucket}/mv/videos/{job_id}.mp4"
    seen = [
        {
            "url": r.url,
            "status": r.status,
            "range": r.request.all_headers().get("range"),  # the raw headers (``headers`` leaves Range out)
            "location": r.headers.get("location"),
            "cache": r.headers.get("cache-control"),
        }
        for r in responses
    ]

    # The element went through the server's redirect to a presigned link of the clip in the bucket...
    [redirect] = [r for r in seen if urlsplit(r["url"]).path == source.path]
    assert redirect["status"] == 302 and redirect["cache"] == "no-store", redirect
    link = urlsplit(redirect["location"])
    assert (link.netloc, link.path) == (object_server.store, key_path)
    assert parse_qs(link.query)["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    # ...and read the clip from there with Range requests, answered 206 by the store.
    from_store = [r for r in seen if urlsplit(r["url"]).netloc == object_server.store]
    assert from_store and all(urlsplit(r["url"]).path == key_path for r in from_store), from_store
    assert any(r["status"] == 206 and (r["range"] or "").startswith("bytes=") for r in from_store), from_store

    duration = video.evaluate("v => v.duration")
    assert duration > 1
    target = round(duration / 2, 3)
    seeked = video.evaluate(
        """(v, t) => new Promise((resolve, reject) => {
            v.addEventListener("seeked", () => resolve({time: v.currentTime, ready: v.readyState}), {once: true});
            v.addEventListener("error", () => reject(new Error(`media error ${v.error && v.error.code}`)), {once: true});
            v.currentTime = t;
        })""",
        target,
    )
    assert seeked["time"] == pytest.approx(target, abs=0.05) and seeked["ready"] >= 2, seeked
    played = video.evaluate(
        """async v => {
            v.muted = true;
            const start = v.currentTime;
            await v.play();
            await new Promise(resolve => {
                const moved = () => { if (v.currentTime > start + 0.2) { v.removeEventListener("timeupdate", moved); resolve(); } };
                v.addEventListener("timeupdate", moved);
            });
            v.pause();
            return {start, now: v.currentTime, error: v.error && v.error.code};
        }"""
    )
    assert played["start"] == pytest.approx(target, abs=0.05) and played["now"] > played["start"], played
    assert played["error"] is None
    page.screenshot(path=str(tmp_path / "object-storage.png"), full_page=True)


# -- the page as served (no browser needed) ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo_client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestClient]:
    """One sandboxed app for the module's tests of the page as served: they only read."""
    from mvserver.app import create_app

    env = {
        "MV_SANDBOX": "true",
        "MV_OUTPUT_DIR": str(tmp_path_factory.mktemp("demo") / "outputs"),
        "MV_SETTINGS_DIR": str(PROJECT / "settings"),
    }
    async with TestClient(TestServer(create_app(env))) as client:
        yield client


@module_loop
async def test_page_is_served_with_form_defaults_and_a_same_origin_policy(demo_client: Any) -> None:
    settings = yaml.safe_load((PROJECT / "settings" / "scenes.yaml").read_text())
    response = await demo_client.get("/single")
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
    html = await response.text()
    for element_id in (
        "scenes-form",
        "idea",
        "character-description",
        "number-of-scenes",
        "generate-character",
        "character-image",
        "backend",
        "generate-all",
        "scenes",
        "sandbox-badge",
        "status",
    ):
        assert f'id="{element_id}"' in html, element_id
    limits = settings["limits"]["number_of_scenes"]
    assert (
        f'min="{limits["min"]}" max="{limits["max"]}"\n                   '
        f'value="{settings["defaults"]["number_of_scenes"]}"'
    ) in html
    assert 'aria-live="polite"' in html
    assert '<option value="replicate" selected>' in html and '<option value="gemini">' in html
    assert re.search(r'<textarea id="idea"[^>]*>[^<]{20,}</textarea>', html), "the idea is prefilled"
    assert "http://" not in html and "https://" not in html, "no external assets"


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("demo.js", "javascript"), ("project.js", "javascript"), ("api.js", "javascript"), ("demo.css", "text/css")],
)
@module_loop
async def test_static_files_are_served(demo_client: Any, name: str, content_type: str) -> None:
    response = await demo_client.get(f"/static/{name}")
    assert response.status == 200
    assert content_type in response.content_type
    assert (await response.read()) == (PROJECT / "mvserver" / "web" / "static" / name).read_bytes()


@pytest.mark.parametrize("name", ["nope.js", "..%2Fapp.py", "demo.js.map", ".hidden.css"])
@module_loop
async def test_missing_static_file_is_a_json_404(demo_client: Any, name: str) -> None:
    response = await demo_client.get(f"/static/{name}")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
