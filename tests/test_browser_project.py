"""The music-video project page at ``/`` driven in Debian's headless Chromium against a real sandboxed server:
song upload, project, character candidates, clips on one multi-job stream, reorder, trim, regenerate, lip sync,
assembly, the song timeline (waveform, grid, sections, scenes, cuts that snap, the playhead), and the same first
steps with API keys on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile
from helpers import PROJECT, open_page, requires_browser, start_server

from bench.songs import SR, Song, drum_song

try:
    from playwright.sync_api import Browser, Page, expect
except ImportError:  # pragma: no cover - depends on the environment
    pass

SONG_SECONDS = 10  # sized to it: scenes of 6 s and 4 s (as few as cover 10 s, shortened while they still do)
CLIP_TIMEOUT_MS = 40_000
ANALYSIS_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 10 s sine-wave song, made with the ffmpeg bundled in imageio-ffmpeg."""
    path = tmp_path_factory.mktemp("song") / "song.wav"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:duration={SONG_SECONDS}",
            "-ac",
            "2",
            "-ar",
            "44100",
            str(path),
        ],
        check=True,
        timeout=30,
    )
    return path


@pytest.fixture(scope="module")
def project_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A sandboxed server whose simulated clips take about a second each."""
    yield from start_server(tmp_path_factory.mktemp("project-server"), {"MV_SANDBOX_VIDEO_SECONDS": "1"})


@pytest.fixture
def project_page(browser: Browser, project_server: str) -> Iterator[Page]:
    yield from open_page(browser, project_server, "/")


def _has_route(base: str, path: str) -> bool:
    """Whether the running server has the POST route ``path`` (its ids filled with a malformed one): a missing route
    answers 404/405, an existing one refuses the id with a 400."""
    request = urllib.request.Request(
        base + path.replace("{project_id}", "bad").replace("{scene_id}", "bad"),
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status < 400
    except urllib.error.HTTPError as exc:
        return exc.code not in (404, 405)


def _create_project(page: Page, song: Path | None) -> int:
    """Upload the song (if any), create the project and write its scenes; the number of scenes."""
    expect(page.get_by_test_id("sandbox-badge")).to_be_visible()
    expect(page.get_by_label("Style").locator("option")).not_to_have_count(1)  # the presets from health arrived
    if song is not None:
        page.get_by_label("Song file").set_input_files(str(song))
        page.get_by_test_id("upload-song").click()
        expect(page.get_by_test_id("song-info")).to_contain_text(f"{SONG_SECONDS:.1f} s")
        # The page follows the song's analysis (the server's first song also waits for its worker to start); a
        # project made meanwhile would wait for it too.
        expect(page.get_by_test_id("song-info")).not_to_have_attribute(
            "data-analysis", "pending", timeout=ANALYSIS_TIMEOUT_MS
        )
    page.get_by_label("Idea").fill("A synth-pop song about a lighthouse keeper who learns to dance")
    page.get_by_label("Character description").fill("a tall man with a red beard, a navy sweater and yellow boots")
    page.get_by_label("Style").select_option("synthwave")
    if song is None:
        page.get_by_label("Scenes without a song").fill("2")
    page.get_by_test_id("create-project").click()
    scenes = page.get_by_test_id("scenes").locator("li.scene")
    expect(scenes).to_have_count(2)
    expect(page.get_by_test_id("scene-1").locator(".scene-prompt")).to_contain_text("lighthouse keeper")
    return scenes.count()


def _pick_second_candidate(page: Page) -> None:
    page.get_by_test_id("generate-characters").click()
    expect(page.get_by_test_id("candidates").locator("li")).to_have_count(3)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#candidates img')].every((i) => i.complete && i.naturalWidth > 0)"
    )
    page.get_by_test_id("pick-candidate-2").click()
    expect(page.get_by_test_id("candidate-2")).to_have_attribute("aria-current", "true")
    expect(page.get_by_test_id("candidate-1")).to_have_attribute("aria-current", "false")


def _wait_clip(page: Page, index: int, versions: int = 1) -> None:
    """Wait until scene ``index`` has ``versions`` versions, its newest one succeeded and chosen, and a playable
    player."""
    status = page.get_by_test_id(f"job-status-{index}")
    expect(status).to_have_attribute("data-versions", str(versions), timeout=CLIP_TIMEOUT_MS)
    expect(status).to_contain_text("succeeded", timeout=CLIP_TIMEOUT_MS)
    expect(status).not_to_contain_text("regenerating", timeout=CLIP_TIMEOUT_MS)
    page.wait_for_function(
        "s => { const v = document.querySelector(s); return v && v.readyState >= 1; }",
        arg=f'[data-testid="video-{index}"]',
        timeout=CLIP_TIMEOUT_MS,
    )


def _scene_ids(page: Page) -> list[str]:
    return page.eval_on_selector_all("#scenes > li", "items => items.map((li) => li.dataset.sceneId)")


def _event_streams(page: Page) -> list[str]:
    return page.evaluate(
        "() => performance.getEntriesByType('resource').map((e) => e.name).filter((n) => n.includes('/api/mv/events?'))"
    )


@requires_browser
def test_project_flow_song_clips_reorder_trim_regenerate_assemble(
    project_page: Page, project_server: str, song: Path, tmp_path: Path
) -> None:
    page = project_page
    _create_project(page, song)
    expect(page.get_by_test_id("key-section")).to_be_hidden()  # health said no key is needed
    expect(page.get_by_test_id("project-summary")).to_contain_text(f"song {SONG_SECONDS:.1f} s")
    expect(page.get_by_test_id("scene-1")).to_contain_text("6.0 s")
    expect(page.get_by_test_id("scene-2")).to_contain_text("4.0 s")
    _pick_second_candidate(page)

    page.get_by_test_id("generate-clips").click()
    _wait_clip(page, 1)
    _wait_clip(page, 2)
    streams = _event_streams(page)
    assert streams and all("jobs=" in url for url in streams), streams
    assert any(url.count(",") >= 1 for url in streams), f"both clips followed on one stream: {streams}"

    before = _scene_ids(page)
    page.get_by_test_id("move-up-2").click()
    expect(page.get_by_test_id("scene-1")).to_have_attribute("data-scene-id", before[1])
    assert _scene_ids(page) == before[::-1]
    # Now scene 2 is the 6 s clip: keep 1.0–4.5 s of it; with the 4 s clip the video is 7.5 s.
    page.get_by_label("Trim in (s)").nth(1).fill("1")
    page.get_by_label("Trim out (s)").nth(1).fill("4.5")
    page.get_by_test_id("apply-trim-2").click()
    expect(page.get_by_test_id("scene-2")).to_contain_text("3.5 s")
    expect(page.get_by_test_id("total-seconds")).to_have_attribute("data-seconds", "7.5")

    page.get_by_test_id("regenerate-1").click()
    _wait_clip(page, 1, versions=2)
    versions = page.get_by_test_id("version-1").locator("option")
    expect(versions).to_have_count(2)
    first = versions.nth(0).get_attribute("value")
    page.get_by_test_id("version-1").select_option(first)  # pick the old version again
    expect(page.get_by_test_id("version-1").locator("option").nth(0)).to_contain_text("(chosen)")

    if not _has_route(project_server, "/api/mv/projects/{project_id}/assemble"):
        pytest.skip("POST /api/mv/projects/{project_id}/assemble does not exist on this server yet")
    expected = float(page.get_by_test_id("total-seconds").get_attribute("data-seconds"))
    page.get_by_test_id("assemble").click()
    video = page.get_by_test_id("final-video")
    expect(video).to_be_visible(timeout=CLIP_TIMEOUT_MS)
    page.wait_for_function("() => document.getElementById('final-video').readyState >= 2", timeout=15_000)
    duration = video.evaluate("v => v.duration")
    assert abs(duration - expected) < 0.25, (duration, expected)
    expect(page.get_by_test_id("assembly-status")).to_contain_text("succeeded")
    # The song timeline: a sine has no beat grid, so no grid lines; the playhead follows the assembled video.
    expect(page.get_by_test_id("timeline-info")).to_contain_text("no beat grid")
    assert page.locator("#timeline .tl-bar").count() == 0
    video.evaluate("v => { v.currentTime = 3; }")
    page.wait_for_function(
        "() => Math.abs(Number(document.querySelector('[data-testid=playhead]').dataset.time) - 3) < 0.05"
    )
    page.screenshot(path=str(tmp_path / "project-flow.png"), full_page=True)


@pytest.fixture(scope="module")
def drum_song_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Song]:
    """The benchmark's synthetic song: 12 bars of 4/4 at 123 BPM in sections A B A (four bars are 7.80 s)."""
    song = drum_song("123 BPM", bpm=123, form="ABA", bars_per_section=4, seed=11)
    path = tmp_path_factory.mktemp("drums") / "drums.wav"
    soundfile.write(path, song.samples, SR)
    return path, song


def _api(base: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.load(response)


@requires_browser
def test_the_song_timeline_shows_the_grid_and_a_moved_cut_snaps_to_a_bar(
    project_page: Page, project_server: str, drum_song_file: tuple[Path, Song]
) -> None:
    page = project_page
    path, song = drum_song_file
    page.get_by_label("Song file").set_input_files(str(path))
    page.get_by_test_id("upload-song").click()
    # The upload answers within MV_ANALYSIS_WAIT_SECONDS; the page asks again until the analysis is there (the
    # server's first song also waits for its analysis worker to start).
    expect(page.get_by_test_id("song-info")).to_contain_text("BPM", timeout=ANALYSIS_TIMEOUT_MS)
    page.get_by_label("Idea").fill("A lighthouse keeper learns to dance")
    page.get_by_label("Character description").fill("a tall man with a red beard and yellow boots")
    page.get_by_test_id("create-project").click()
    expect(page.get_by_test_id("timeline-info")).to_contain_text("scenes cut on the bar lines")
    expect(page.get_by_test_id("scene-1").locator(".scene-prompt")).to_contain_text("section A")  # Gemini heard it
    project_id = page.get_by_test_id("project-summary").get_attribute("data-project-id")
    project = _api(project_server, f"/api/mv/projects/{project_id}")
    analysis = _api(project_server, f"/api/mv/songs/{project['song']['audio_id']}")["analysis"]
    grid = analysis["grid"]
    # Drawn: the waveform, a line per beat (the bar lines stronger), a band per section, a block per scene.
    expect(page.locator("#timeline .tl-scene")).to_have_count(len(project["scenes"]))
    assert page.locator("#timeline .tl-bar").count() == len(grid["downbeats"])
    assert page.locator("#timeline .tl-beat").count() == len(grid["beats"]) - len(grid["downbeats"])
    labels = page.eval_on_selector_all("#timeline .tl-section", "bands => bands.map((b) => b.dataset.label)")
    assert labels == [s["label"] for s in analysis["sections"]] and labels[:3] == ["A", "B", "A"]
    inked = page.evaluate(
        "() => { const c = document.querySelector('#timeline .tl-wave');"
        " return c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".filter((v, i) => i % 4 === 3 && v > 0).length; }"
    )
    assert inked > 1000
    cut = page.get_by_test_id("cut-1")
    before = float(cut.get_attribute("data-time"))
    assert cut.get_attribute("data-cut") == "downbeat" and abs(before - 4 * 60 / 123 * 4) < 0.05

    # Drag the first cut 1.5 s to the left: it snaps to the nearest bar line, three bars in.
    track = page.get_by_test_id("timeline-track").bounding_box()
    length = max(project["song"]["duration"], analysis["duration"])
    handle = cut.bounding_box()
    start_x, y = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
    status = page.get_by_test_id("status")
    page.mouse.move(start_x, y)
    page.mouse.down()
    page.mouse.move(start_x - track["width"] * 1.5 / length, y, steps=5)
    page.mouse.up()
    expect(status).to_contain_text("Cut moved to")  # the server's answer is drawn
    project = _api(project_server, f"/api/mv/projects/{project_id}")
    moved = project["scenes"][0]["window"]
    assert moved["cut"] == "downbeat" and moved["end_bar"] == 3
    assert np.min(np.abs(song.downbeats - moved["end"])) <= 1 / 24 + 1e-6  # on the true bar line, within a frame
    assert project["scenes"][1]["window"]["start"] == moved["end"]
    expect(page.get_by_test_id("cut-1")).to_have_attribute("data-time", str(moved["end"]))
    # The keyboard moves it a bar later again.
    page.evaluate("() => { document.getElementById('status').textContent = ''; }")
    page.get_by_test_id("cut-1").focus()
    page.keyboard.press("ArrowRight")
    expect(status).to_contain_text("Cut moved to")
    assert float(page.get_by_test_id("cut-1").get_attribute("data-time")) > 7
    assert _api(project_server, f"/api/mv/projects/{project_id}")["scenes"][0]["window"]["end_bar"] == 4


@requires_browser
def test_project_lipsync_one_scene_adds_a_version(project_page: Page, project_server: str, song: Path) -> None:
    page = project_page
    _create_project(page, song)
    page.get_by_test_id("generate-clips").click()
    _wait_clip(page, 1)
    _wait_clip(page, 2)
    if not _has_route(project_server, "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync"):
        pytest.skip("POST /api/mv/projects/{project_id}/scenes/{scene_id}/lipsync does not exist on this server yet")
    page.get_by_test_id("lipsync-2").click()
    _wait_clip(page, 2, versions=2)
    expect(page.get_by_test_id("version-2").locator("option")).to_have_count(2)


@requires_browser
def test_project_edit_after_another_writer_reloads_and_reapplies(browser: Browser, project_server: str) -> None:
    # The first PATCH is refused on purpose (412): Chromium logs it.
    for page in open_page(browser, project_server, "/", expected=("412 (Precondition Failed)",)):
        _create_project(page, None)
        project_id = page.get_by_test_id("project-summary").get_attribute("data-project-id")
        before = _scene_ids(page)
        request = urllib.request.Request(
            f"{project_server}/api/mv/projects/{project_id}",
            method="PATCH",
            data=b'{"idea": "Another tab changed the idea"}',
            headers={"Content-Type": "application/json", "If-Match": "*"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        page.get_by_test_id("move-down-1").click()
        expect(page.get_by_test_id("scene-1")).to_have_attribute("data-scene-id", before[1])
        expect(page.get_by_test_id("status")).to_contain_text("changed elsewhere")
        with urllib.request.urlopen(f"{project_server}/api/mv/projects/{project_id}", timeout=5) as response:
            record = json.load(response)
        assert record["idea"] == "Another tab changed the idea"
        assert [scene["id"] for scene in record["scenes"]] == before[::-1]


# -- keys on ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A sandboxed server with API keys on and signed links; (base URL, the key)."""
    tmp = tmp_path_factory.mktemp("keyed-server")
    keys = {
        "MV_API_KEYS_FILE": str(tmp / "keys.yaml"),
        "MV_URL_SIGNING_SECRET": "demo-signing-secret-" + "x" * 24,
        "MV_SANDBOX_VIDEO_SECONDS": "1",
    }
    created = subprocess.run(
        [sys.executable, "-m", "mvserver", "keys", "create", "demo"],
        cwd=PROJECT,
        env={**os.environ, **keys},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = created.stdout.strip().splitlines()[-1]
    for base in start_server(tmp, keys):
        yield base, key


@requires_browser
def test_project_flow_with_api_keys(browser: Browser, keyed_server: tuple[str, str], song: Path) -> None:
    base, key = keyed_server
    # The first call without a key is refused on purpose: Chromium logs that 401.
    for page in open_page(browser, base, "/", expected=("401 (Unauthorized)",)):
        expect(page.get_by_test_id("key-section")).to_be_visible()  # health says a key is needed: asked at once
        page.get_by_label("Song file").set_input_files(str(song))
        page.get_by_test_id("upload-song").click()
        expect(page.get_by_test_id("song-error").locator(".error-code")).to_have_text("auth_required")
        expect(page.get_by_test_id("key-section")).to_be_visible()
        page.get_by_label("API key").fill(key)
        page.get_by_test_id("use-key").click()
        expect(page.get_by_test_id("key-section")).to_be_hidden()
        assert page.evaluate("() => sessionStorage.getItem('mvKey')") == key
        assert key not in page.url

        _create_project(page, song)
        _pick_second_candidate(page)
        page.get_by_test_id("generate-clips").click()
        _wait_clip(page, 1)
        _wait_clip(page, 2)
        src = page.get_by_test_id("video-1").get_attribute("src")
        assert "sig=" in src and key not in src, src
        for img in page.locator("#candidates img").all():
            assert key not in (img.get_attribute("src") or "")
        # Both clips were followed on one multi-job stream opened from a signed link, never by polling.
        streams = _event_streams(page)
        assert any(url.count(",") >= 1 and "sig=" in url for url in streams), streams
        assert all(key not in url for url in streams)
        assert page.evaluate("() => document.body.dataset.follow") == "stream"
        assert page.evaluate("() => document.body.dataset.polled") is None
        # The project and the events carry every signed link: no request per clip or per candidate image.
        fetched = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
        assert not [url for url in fetched if re.search(r"/api/mv/jobs/[0-9a-f-]{36}$", url.split("?")[0])], fetched
        assert all("sig=" in url for url in fetched if "/get_image/" in url or "/get_video/" in url), fetched
