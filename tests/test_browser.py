"""The demo page at ``/`` driven in Debian's headless Chromium against a real sandboxed server process."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer
from conftest import CHROMIUM, module_loop

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROVIDER_KEYS = ("GEMINI_API_KEY", "REPLICATE_API_TOKEN", "GOOGLE_VERTEX_API_KEY", "GOOGLE_CLOUD_PROJECT")
VIDEO_SECONDS = 3


def requires_browser(test: Any) -> Any:
    """Mark a test ``browser``: conftest skips it without Chromium or Playwright, and fails it under ``CI=true``."""
    return pytest.mark.browser(test)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fast_settings(target: Path) -> Path:
    """The project's settings with quick polling, so a 3 s sandbox video reports progress several times."""
    shutil.copytree(PROJECT / "settings", target)
    for name, changes in {
        "videos": {"jobs": {"poll_interval_seconds": 0.2}},
        "images": {"poll_interval_seconds": 0.1},
        "sandbox": {"image_latency_seconds": 0.3, "scenes_latency_seconds": 0.1},
    }.items():
        path = target / f"{name}.yaml"
        data = yaml.safe_load(path.read_text())
        for key, value in changes.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def _server_env(tmp: Path) -> dict[str, str]:
    """This environment without provider credentials (blank, so a ``.env`` cannot supply them) or MV_* knobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "MV_")) and k not in PROVIDER_KEYS}
    env.update({key: "" for key in PROVIDER_KEYS})
    env.update(
        {
            "MV_OUTPUT_DIR": str(tmp / "outputs"),
            "MV_SETTINGS_DIR": str(_fast_settings(tmp / "settings")),
            "MV_SANDBOX_VIDEO_SECONDS": str(VIDEO_SECONDS),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/api/mv/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    pytest.fail(f"the server did not answer /api/mv/health within {timeout} s:\n{log.read_text()}")


def _start_server(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m mvserver`` on a free loopback port, every provider answered by the built-in simulator."""
    port = _free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT,
            env={**_server_env(tmp), **(extra_env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process, log)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start_server(tmp_path_factory.mktemp("server"))


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Chromium for one test: the sync API's event loop must not outlive it, or the async tests cannot run."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """A fresh page on the single-clip demo; fails the test on script or console errors and on requests to another origin."""
    yield from _open_page(browser, server, "/single")


def _open_page(browser: Browser, server: str, path: str, expected: tuple[str, ...] = ()) -> Iterator[Page]:
    """A fresh page at ``path``; fails the test on script errors, unexpected console errors and requests to
    another origin. ``expected`` are console error texts a test provokes on purpose."""
    context = browser.new_context(base_url=server, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    origin = urlsplit(server).netloc

    def check_console(message: Any) -> None:
        if (
            message.type == "error"
            and not _expected_console_error(message.text)
            and not any(text in message.text for text in expected)
        ):
            problems.append(f"console error: {message.text}")

    def check_origin(request: Any) -> None:
        url = urlsplit(request.url)
        if url.scheme != "data" and url.netloc != origin:
            problems.append(f"request to another origin: {request.url}")

    page.on("console", check_console)
    page.on("request", check_origin)
    page.goto(path)
    yield page
    context.close()
    assert not problems, problems


def _expected_console_error(text: str) -> bool:
    """Chromium logs every 4xx answer to fetch; the error test provokes a 400 on purpose."""
    return "status of 400 (Bad Request)" in text


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
    samples = _sample_progress(page, 1, timeout=VIDEO_SECONDS + 15)
    _wait_video_playable(page, 1)

    determinate = [value for value in samples if value is not None]
    assert len(set(determinate)) >= 3, f"the bar should move through several values: {samples}"
    assert determinate == sorted(determinate), f"progress went backwards: {samples}"
    assert determinate[0] < 0.5 < determinate[-1], samples
    assert time.monotonic() - started >= VIDEO_SECONDS * 0.8

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
    expect(error).to_be_visible(timeout=VIDEO_SECONDS * 1000 + 15_000)
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
