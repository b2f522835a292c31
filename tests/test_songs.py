"""Songs through the API with the analysis on: analysed at upload (or on first use), stored in the sidecar, served by
``GET /api/mv/songs/{id}``; a project sized on the song's bars; Gemini hearing the song and its timeline; snapped
trims; and the end to end check that the assembled MP4's cuts fall on the song's downbeats (in the decoded video).

The songs are the benchmark's synthetic ones (``bench/songs.py``): drums, bass and chords with a known grid. One
app with one warm analysis worker is shared by the module (a worker's start costs ~3 s of CPU)."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile
from aiohttp.test_utils import TestClient, TestServer
from helpers import (
    SIM_DEFAULTS,
    artefact,
    artefact_json,
    artefacts_of,
    fast_settings,
    has_artefact,
    provider_env,
    read_sse,
)

from bench.songs import SR, Song, drum_song
from mvserver.app import create_app
from mvserver.appkeys import SONGS
from mvserver.media.probe import probe
from mvserver.media.run import ffmpeg_exe
from mvserver.sandbox.app import Simulator, create_simulator_app

pytestmark = pytest.mark.both_stores
shared = pytest.mark.asyncio(loop_scope="module")
FPS = 24.0
FRAME = 1 / FPS
BASE = "/api/mv/projects"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(
    shared_store_kind: str,
    shared_artefact_env: dict[str, str],
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[TestClient, Simulator]]:
    """An app with the song analysis on (one worker) and providers answered by a fast simulator, on the job and
    project store and the artefact backend under test."""
    root = tmp_path_factory.mktemp("songs")
    store_env: dict[str, str] = {**shared_artefact_env}
    if shared_store_kind == "redis":
        store_env.update(
            {
                "MV_REDIS_URL": request.getfixturevalue("redis_url"),
                "MV_REDIS_PREFIX": f"mvtest:{uuid.uuid4().hex[:10]}:",
            }
        )
    sim = Simulator(root / "simulator", **{**SIM_DEFAULTS, "video_latency": 0.1})
    async with TestServer(create_simulator_app(sim)) as sim_server:
        env = {
            **provider_env(sim_server, root / "outputs", fast_settings(root / "settings"), store_env),
            "MV_ANALYSIS_WORKERS": "1",
            "MV_ANALYSIS_WAIT_SECONDS": "30",
        }
        async with TestClient(TestServer(create_app(env))) as client:
            yield client, sim


@pytest.fixture(scope="module")
def song_123(tmp_path_factory: pytest.TempPathFactory) -> tuple[Song, bytes]:
    """12 bars of 4/4 at 123 BPM in three 4-bar sections (A B A), then a 1 s ring-out: four bars are 7.80 s, so
    8 s clips are not whole bars. As WAV bytes."""
    song = drum_song("123 BPM", bpm=123, form="ABA", bars_per_section=4, seed=11)
    path = tmp_path_factory.mktemp("song") / "song123.wav"
    soundfile.write(path, song.samples, SR)
    return song, path.read_bytes()


async def upload(client: TestClient, data: bytes) -> dict[str, Any]:
    response = await client.post("/api/mv/upload_audio", data=data, headers={"Content-Type": "audio/wav"})
    assert response.status == 201, await response.text()
    return await response.json()


async def song_of(client: TestClient, audio_id: str, status: int = 200) -> dict[str, Any]:
    response = await client.get(f"/api/mv/songs/{audio_id}")
    assert response.status == status, await response.text()
    return await response.json()


def off_the_grid(times: list[float], downbeats: np.ndarray) -> list[tuple[float, float]]:
    """The times farther than one frame from every true downbeat, with their distance."""
    far = [(t, float(np.min(np.abs(downbeats - t)))) for t in times]
    return [(t, d) for t, d in far if d > FRAME + 1e-6]


async def until_final(client: TestClient, job_id: str) -> dict[str, Any]:
    async with client.get(f"/api/mv/jobs/{job_id}/events") as response:
        events = [event async for event in read_sse(response)]
    assert events[-1]["event"] in ("succeeded", "failed", "canceled")
    return await (await client.get(f"/api/mv/jobs/{job_id}")).json()


def cut_frames(path: Path) -> list[int]:
    """The frames where the decoded picture changes at once (a cut): each frame, shrunk to 32x18 grey, against the
    one before; a cut changes it many times more than the sandbox clips' progress bar moving within a clip."""
    raw = subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-v",
            "error",
            "-i",
            str(path),
            "-map",
            "0:v:0",
            "-vf",
            "scale=32:18:flags=area,format=gray",
            "-f",
            "rawvideo",
            "-",
        ],
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    frames = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18 * 32).astype(np.float32)
    change = np.abs(np.diff(frames, axis=0)).mean(axis=1)
    threshold = max(8.0, 10 * float(np.median(change)))
    return [int(i) + 1 for i in np.flatnonzero(change > threshold)]


# -- the analysis at upload and on first use ---------------------------------------------------------------------


@pytest.mark.both_backends
@shared
async def test_an_upload_is_analysed_stored_with_the_song_and_served(
    live: tuple[TestClient, Simulator], song_123: tuple[Song, bytes]
) -> None:
    client, _ = live
    song, data = song_123
    uploaded = await upload(client, data)
    audio_id = uploaded["audio_id"]
    assert uploaded["song_url"] == f"/api/mv/songs/{audio_id}"
    assert uploaded["analysis_status"] == "ready", uploaded  # the upload waited for it (MV_ANALYSIS_WAIT_SECONDS)
    grid = uploaded["analysis"]["grid"]
    assert abs(grid["tempo"] - 123) / 123 < 0.02 and grid["meter"] == 4
    truth = song.downbeats
    assert np.mean([np.min(np.abs(np.array(grid["downbeats"]) - t)) <= 0.07 for t in truth[1:]]) >= 0.9
    assert [s["label"] for s in uploaded["analysis"]["sections"]][:3] == ["A", "B", "A"]
    served = await song_of(client, audio_id)
    assert served == uploaded  # the upload answer and the GET are one description
    sidecar = await artefact_json(client, f"audio/{audio_id}.json")
    assert sidecar["analysis"] == served["analysis"]  # stored with the song


@pytest.mark.both_backends
@shared
async def test_a_song_saved_before_analysis_existed_is_analysed_on_first_use(
    live: tuple[TestClient, Simulator], song_123: tuple[Song, bytes]
) -> None:
    client, _ = live
    audio_id = (await upload(client, song_123[1]))["audio_id"]
    await client.app[SONGS].settled(audio_id)
    store = artefacts_of(client)
    sidecar = await artefact_json(client, f"audio/{audio_id}.json")
    old = {k: v for k, v in sidecar.items() if k != "analysis"}  # as an upload wrote it before analysis existed
    await store.put_json(f"audio/{audio_id}.json", old)
    await store.delete(f"audio/{audio_id}.aac.m4a", f"audio/{audio_id}.preview.mp3")
    work = client.app[SONGS]
    work.env = dataclasses.replace(work.env, analysis_wait_seconds=0.0)
    try:
        first = await song_of(client, audio_id)
    finally:
        work.env = dataclasses.replace(work.env, analysis_wait_seconds=30.0)
    assert first["analysis_status"] == "pending" and first["analysis"] is None
    await work.settled(audio_id)
    again = await song_of(client, audio_id)
    assert again["analysis_status"] == "ready" and again["analysis"] == sidecar["analysis"]
    assert await has_artefact(client, f"audio/{audio_id}.aac.m4a")
    assert await has_artefact(client, f"audio/{audio_id}.preview.mp3")


@shared
async def test_an_analysis_that_times_out_is_stored_as_failed_and_not_run_again(
    live: tuple[TestClient, Simulator], song_123: tuple[Song, bytes]
) -> None:
    client, _ = live
    work = client.app[SONGS]
    work.env = dataclasses.replace(work.env, analysis_timeout_seconds=0.001)
    try:
        uploaded = await upload(client, song_123[1])
    finally:
        work.env = dataclasses.replace(work.env, analysis_timeout_seconds=60.0)
    assert uploaded["analysis_status"] == "failed"
    assert uploaded["analysis_error"]["code"] == "analysis_timeout", uploaded
    analysed = work.pool.stats.analysed + work.pool.stats.killed
    served = await song_of(client, uploaded["audio_id"])
    assert served["analysis_status"] == "failed" and served["analysis_error"] == uploaded["analysis_error"]
    assert work.pool.stats.analysed + work.pool.stats.killed == analysed  # not tried again


@shared
async def test_unknown_and_malformed_song_ids(live: tuple[TestClient, Simulator]) -> None:
    client, _ = live
    missing = await song_of(client, "4adfcc62-0cb0-44fc-9ab2-745c4c944eb4", 404)
    assert missing["error"]["code"] == "not_found"
    malformed = await song_of(client, "nope", 400)
    assert malformed["error"] == {**malformed["error"], "code": "invalid_id", "field": "audio_id"}


async def test_without_analysis_the_song_says_off_and_a_project_is_sized_by_length(
    make_client: Any, store_env: dict[str, str], tmp_path: Path
) -> None:
    client = await make_client(**store_env)
    song = drum_song("120 BPM", bpm=120, form="A", bars_per_section=4, seed=3)
    soundfile.write(tmp_path / "s.wav", song.samples, SR)
    uploaded = await upload(client, (tmp_path / "s.wav").read_bytes())
    assert (uploaded["analysis_status"], uploaded["analysis"]) == ("off", None)
    response = await client.post(
        BASE, json={"idea": "x", "character_description": "y", "audio_id": uploaded["audio_id"]}
    )
    project = await response.json()
    assert project["song"]["sized_by"] == "length"
    assert project["song"]["sizing_note"] == "song analysis is off (MV_ANALYSIS_WORKERS=0)"
    assert [s["duration"] for s in project["scenes"]] == [6, 4]  # 9 s: sized by length, whole clips
    assert [s["window"]["start"] for s in project["scenes"]] == [0.0, 6.0]


# -- a project on the song's grid, end to end ----------------------------------------------------------------------


@pytest.mark.both_backends
@shared
async def test_a_project_on_the_song_s_bars_cuts_the_assembled_video_on_its_downbeats(
    live: tuple[TestClient, Simulator], song_123: tuple[Song, bytes], tmp_path: Path
) -> None:
    client, sim = live
    song, data = song_123
    audio_id = (await upload(client, data))["audio_id"]
    response = await client.post(
        BASE,
        json={
            "idea": "a lighthouse keeper learns to dance",
            "character_description": "a tall man in yellow boots",
            "audio_id": audio_id,
        },
    )
    assert response.status == 201, await response.text()
    project = await response.json()
    pid, scenes = project["project_id"], project["scenes"]
    assert project["song"]["sized_by"] == "bars" and project["song"]["sizing_note"] is None
    assert all(s["duration"] in (4, 6, 8) for s in scenes)
    # Every boundary between scenes is on a downbeat of the true grid, within one frame, and a whole frame.
    boundaries = [s["song_start"] for s in scenes[1:]]
    assert len(boundaries) >= 2 and not off_the_grid(boundaries, song.downbeats)
    assert all(abs(b * FPS - round(b * FPS)) < 1e-3 for b in boundaries)
    assert any(s["trim_out"] < s["duration"] - FRAME for s in scenes[:-1])  # 8 s clips trimmed to the bar line
    assert scenes[-1]["window"]["end"] == pytest.approx(song.duration, abs=FRAME)
    assert [s["window"]["cut"] for s in scenes] == ["downbeat"] * (len(scenes) - 1) + ["end"]
    assert [s["window"]["section_label"] for s in scenes[:3]] == ["A", "B", "A"]
    assert scenes[1]["window"]["first_bar"] == scenes[0]["window"]["end_bar"]

    # Gemini hears the song (the small MP3 made at upload, inline) and reads each scene's window and section.
    response = await client.post(f"{BASE}/{pid}/write_scenes")
    assert response.status == 200, await response.text()
    project = await response.json()
    preview = await artefact(client, f"audio/{audio_id}.preview.mp3")
    [audio] = sim.inline_parts[-1]
    assert audio == {"mime_type": "audio/mp3", "bytes": len(preview), "sha256": hashlib.sha256(preview).hexdigest()}
    prompt = sim.prompts[-1]
    assert "Sections (sections with the same letter sound alike):" in prompt
    first = project["scenes"][0]["window"]
    assert f"- Scene 1: {first['start']:.2f}-{first['end']:.2f} s, bars 1-{first['end_bar']}, section A" in prompt
    for scene in project["scenes"]:  # the simulator names the section each window falls in
        assert f"section {scene['window']['section_label']}, " in scene["prompt"], scene["prompt"]

    # Clips, then a cut-only assembly: the song's AAC packets are copied, and the video cuts where the plan cut.
    response = await client.post(f"{BASE}/{pid}/clips", json={"generate_audio": False})
    assert response.status == 202, await response.text()
    for job in (await response.json())["jobs"]:
        assert (await until_final(client, job["job_id"]))["status"] == "succeeded"
    response = await client.post(f"{BASE}/{pid}/assemble", json={"transition": "cut"})
    assert response.status == 202, await response.text()
    state = await until_final(client, (await response.json())["job_id"])
    assert state["status"] == "succeeded", state
    assert state["request"]["result"]["audio"] == "copied"
    out = tmp_path / "final.mp4"
    out.write_bytes(await (await client.get(state["video_url"])).read())
    cuts = [frame / FPS for frame in cut_frames(out)]
    assert cuts == pytest.approx(boundaries, abs=FRAME + 1e-6), (cuts, boundaries)
    assert not off_the_grid(cuts, song.downbeats)
    info = await probe(out)
    assert info.duration == pytest.approx(song.duration, abs=0.05)


@shared
async def test_a_trim_snaps_its_cut_to_a_bar_and_a_reorder_moves_the_windows(
    live: tuple[TestClient, Simulator], song_123: tuple[Song, bytes]
) -> None:
    client, _ = live
    song, data = song_123
    audio_id = (await upload(client, data))["audio_id"]
    project = await (
        await client.post(BASE, json={"idea": "x", "character_description": "y", "audio_id": audio_id})
    ).json()
    pid, first = project["project_id"], project["scenes"][0]
    bar = 4 * 60 / 123

    async def patch(body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        response = await client.patch(f"{BASE}/{pid}", json=body, headers={"If-Match": project["etag"]})
        assert response.status == status, await response.text()
        return await response.json()

    # Ask for a cut at 6.0 s with snap "bar": it lands on the bar line at 5.85 s (three bars), a whole frame.
    project = await patch({"scenes": [{"id": first["id"], "trim_out": 6.0, "snap": "bar"}]})
    scene = project["scenes"][0]
    assert scene["trim_out"] == pytest.approx(round(3 * bar * FPS) / FPS, abs=1e-6)
    assert scene["window"]["cut"] == "downbeat" and scene["window"]["end_bar"] == 3
    assert not off_the_grid([scene["window"]["end"]], song.downbeats)
    assert project["scenes"][1]["song_start"] == pytest.approx(scene["trim_out"], abs=1e-6)
    # "beat" snaps to a beat; "none" keeps the trim as sent (and the window says it is off the grid).
    project = await patch({"scenes": [{"id": first["id"], "trim_out": 6.25, "snap": "beat"}]})
    assert project["scenes"][0]["window"]["cut"] == "beat"
    assert project["scenes"][0]["trim_out"] == pytest.approx(round(13 * bar / 4 * FPS) / FPS, abs=1e-6)
    project = await patch({"scenes": [{"id": first["id"], "trim_out": 6.1, "snap": "none"}]})
    assert project["scenes"][0]["trim_out"] == 6.1 and project["scenes"][0]["window"]["cut"] == "time"
    # A cut the clip cannot reach on the grid is a 400 naming the field.
    error = (await patch({"scenes": [{"id": first["id"], "trim_in": 7.5, "trim_out": 8.0, "snap": "bar"}]}, 400))[
        "error"
    ]
    assert (error["code"], error["field"]) == ("invalid_field", "scenes.0.snap")
    bad = (await patch({"scenes": [{"id": first["id"], "snap": "octave"}]}, 400))["error"]
    assert bad["field"] == "scenes.0.snap"
    # A reorder moves the windows with the scenes: the second scene now starts the song.
    ids = [s["id"] for s in project["scenes"]]
    project = await patch({"order": [ids[1], ids[0], *ids[2:]]})
    assert project["scenes"][0]["id"] == ids[1] and project["scenes"][0]["window"]["start"] == 0.0
    assert project["scenes"][1]["window"]["start"] == pytest.approx(project["scenes"][0]["window"]["end"])
