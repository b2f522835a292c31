"""Song limits against a real ``python -m mvserver`` process in sandbox mode, with the bundled ffmpeg.

What an outside attack did: a lip-sync window of 1e-9 s (``atrim=duration=0.000000``, read by ffmpeg as "no limit")
made the job decode a whole 10 h song to disk; an upload of an ffconcat list was followed to the song it named; a
120 KB FLAC was accepted as a 10 h song. Each is now refused with a 400 before any job or file exists.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from helpers import final, lavfi, sandbox_env, spawn_server, until, until_up

from mvserver.lipsync.service import max_cut_bytes

PROMPT = "A singer on a rooftop at dusk, mouthing the words of a slow song."


def make_flac(path: Path, seconds: float, source: str = "sine=f=440:r=44100") -> bytes:
    return lavfi(path, source, "-t", str(seconds), "-c:a", "flac").read_bytes()


@pytest.fixture
def server(tmp_path: Path, settings_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """One sandboxed server process (blank provider keys, outputs in tmp_path, fast polling); killed at the end."""
    videos = yaml.safe_load((settings_dir / "videos.yaml").read_text())
    videos["jobs"]["poll_interval_seconds"] = 0.1
    (settings_dir / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
    env = sandbox_env(tmp_path, settings_dir, MV_SANDBOX_VIDEO_SECONDS="1")
    process, base = spawn_server(env, tmp_path, tmp_path / "server.log")
    try:
        yield process, base
    finally:
        process.kill()
        process.wait(timeout=10)


async def post(http: aiohttp.ClientSession, url: str, status: int, **kwargs: Any) -> dict[str, Any]:
    async with http.post(url, **kwargs) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def test_a_zero_length_window_a_listing_and_an_over_long_song_are_400_and_write_nothing(
    server: tuple[subprocess.Popen, str], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    process, base = server
    outputs = tmp_path / "outputs"
    await until_up(http, process, f"{base}/api/mv/health")
    flac = {"headers": {"Content-Type": "audio/flac"}}
    song = await post(http, f"{base}/api/mv/upload_audio", 201, data=make_flac(tmp_path / "song.flac", 30), **flac)
    clip = await post(
        http, f"{base}/api/mv/generate_video", 202, json={"prompt": PROMPT, "duration": 4, "generate_audio": False}
    )
    assert (await until(http, base, clip["job_id"], final))["status"] == "succeeded"
    jobs_before = sorted(
        p.name for p in (outputs / "jobs").iterdir() if not p.name.startswith(".")
    )  # not a write in flight

    # 1. the window of the attack, and one just under the minimum
    window = {"video_job_id": clip["job_id"], "audio_id": song["audio_id"], "audio_start": 10.0}
    for end in (10.0 + 1e-9, 10.49):
        error = (await post(http, f"{base}/api/mv/lipsync", 400, json={**window, "audio_end": end}))["error"]
        assert (error["code"], error["field"]) == ("window_too_short", "audio_end") and "0.5 s" in error["message"]
    assert (
        sorted(p.name for p in (outputs / "jobs").iterdir() if not p.name.startswith(".")) == jobs_before
    )  # no job, no cut

    # 11. an ffconcat list naming the song just uploaded reads as no audio at all, like one naming nothing
    audio_before = sorted(p.name for p in (outputs / "audio").iterdir())
    messages = set()
    for target in (song["audio_id"], str(uuid.uuid4())):
        listing = f"ffconcat version 1.0\nfile {target}.flac\n".encode()
        error = (await post(http, f"{base}/api/mv/upload_audio", 400, data=listing, **flac))["error"]
        assert (error["code"], error["field"]) == ("invalid_audio", "body")
        messages.add(error["message"])
    assert len(messages) == 1

    # 17. 25 minutes of silence in about 160 kB is over the default 20 minutes
    long_song = make_flac(tmp_path / "long.flac", 25 * 60, "anullsrc=r=8000:cl=mono")
    error = (await post(http, f"{base}/api/mv/upload_audio", 400, data=long_song, **flac))["error"]
    assert (error["code"], error["field"]) == ("audio_too_long", "body") and "MV_MAX_AUDIO_SECONDS" in error["message"]
    assert sorted(p.name for p in (outputs / "audio").iterdir()) == audio_before

    # the shortest window allowed runs, and the window the simulated model received is bounded by the clip
    job = await post(http, f"{base}/api/mv/lipsync", 202, json={**window, "audio_end": 10.5})
    state = await until(http, base, job["job_id"], final)
    assert state["status"] == "succeeded", state.get("error")
    sent = [p for p in (outputs / "sandbox" / "files").rglob("*.wav")]
    assert len(sent) == 1 and sent[0].stat().st_size <= max_cut_bytes(state["request"]["clip_seconds"])
    assert sorted(outputs.glob("*/.*.part")) == []
