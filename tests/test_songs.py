"""Songs through the API with the analysis on: analysed at upload (or on first use), stored in the sidecar, served by
``GET /api/mv/songs/{id}``.

The songs are the benchmark's synthetic ones (``bench/songs.py``): drums, bass and chords with a known grid. One
app with one warm analysis worker is shared by the module (a worker's start costs ~3 s of CPU)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pytest
import pytest_asyncio
import soundfile
from aiohttp.test_utils import TestClient, TestServer

from bench.songs import SR, Song, drum_song
from mvserver import media
from mvserver.app import create_app
from mvserver.sandbox.simulator import Simulator, create_simulator_app
from mvserver.songs import SONGS
from mvserver.storage import STORE
from conftest import SIM_DEFAULTS, fast_settings, provider_env, read_sse

shared = pytest.mark.asyncio(loop_scope="module")
FPS = 24.0
FRAME = 1 / FPS
BASE = "/api/mv/projects"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[TestClient, Simulator]]:
    """An app with the song analysis on (one worker) and providers answered by a fast simulator."""
    root = tmp_path_factory.mktemp("songs")
    sim = Simulator(root / "simulator", **{**SIM_DEFAULTS, "video_latency": 0.1})
    async with TestServer(create_simulator_app(sim)) as sim_server:
        env = {**provider_env(sim_server, root / "outputs", fast_settings(root / "settings"), {}),
               "MV_ANALYSIS_WORKERS": "1", "MV_ANALYSIS_WAIT_SECONDS": "30"}
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
    raw = subprocess.run([media.ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-vf",
                          "scale=32:18:flags=area,format=gray", "-f", "rawvideo", "-"],
                         capture_output=True, timeout=120, check=True).stdout
    frames = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18 * 32).astype(np.float32)
    change = np.abs(np.diff(frames, axis=0)).mean(axis=1)
    threshold = max(8.0, 10 * float(np.median(change)))
    return [int(i) + 1 for i in np.flatnonzero(change > threshold)]


# -- the analysis at upload and on first use ---------------------------------------------------------------------


@shared
async def test_an_upload_is_analysed_stored_with_the_song_and_served(live: tuple[TestClient, Simulator],
                                                                     song_123: tuple[Song, bytes]) -> None:
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
    sidecar = json.loads(client.app[STORE].path("audio", audio_id, ".json").read_text())
    assert sidecar["analysis"] == served["analysis"]  # stored with the song


@shared
async def test_a_song_saved_before_analysis_existed_is_analysed_on_first_use(
        live: tuple[TestClient, Simulator], song_123: tuple[Song, bytes]) -> None:
    client, _ = live
    audio_id = (await upload(client, song_123[1]))["audio_id"]
    await client.app[SONGS].settled(audio_id)
    store = client.app[STORE]
    sidecar_path = store.path("audio", audio_id, ".json")
    sidecar = json.loads(sidecar_path.read_text())
    old = {k: v for k, v in sidecar.items() if k != "analysis"}  # as an upload wrote it before analysis existed
    sidecar_path.write_text(json.dumps(old))
    for suffix in (".aac.m4a", ".preview.mp3"):
        store.path("audio", audio_id, suffix).unlink()
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
    assert store.path("audio", audio_id, ".aac.m4a").is_file() and store.path("audio", audio_id, ".preview.mp3").is_file()


@shared
async def test_an_analysis_that_times_out_is_stored_as_failed_and_not_run_again(
        live: tuple[TestClient, Simulator], song_123: tuple[Song, bytes]) -> None:
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
