"""kill -9 in the middle of a video job (or an assembly), then a restart on the same output directory.

The server runs as a real ``python -m mvserver`` process in sandbox mode; its built-in simulator keeps its state
under the output directory, so after the restart (on new ports) the provider prediction is still there to poll.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from helpers import exited, read_sse, sandbox_env, spawn_server, until, until_up

VIDEO_SECONDS = 3
PROMPT = "A night-shift baker kneads dough to a slow bassline while the city sleeps."


@pytest.fixture
def server_env(tmp_path: Path, settings_dir: Path) -> dict[str, str]:
    """Sandbox mode with blank provider keys (a .env cannot supply them), outputs and fast polling in tmp_path."""
    videos = yaml.safe_load((settings_dir / "videos.yaml").read_text())
    videos["jobs"]["poll_interval_seconds"] = 0.1
    (settings_dir / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
    return sandbox_env(tmp_path, settings_dir, MV_DEBUG_MODE="false", MV_SANDBOX_VIDEO_SECONDS=str(VIDEO_SECONDS))


@pytest.fixture
def launch(server_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen, str]]]:
    """``launch()`` starts a server process on a free port; every process started here is killed at the end."""
    started: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, str]:
        process, base = spawn_server(server_env, tmp_path, tmp_path / f"server-{len(started)}.log")
        started.append(process)
        return process, base

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def submit(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/api/mv/generate_video", json={"prompt": PROMPT, "duration": 4}) as response:
        assert response.status == 202, await response.text()
        return (await response.json())["job_id"]


async def video(http: aiohttp.ClientSession, base: str, job_id: str) -> bytes:
    async with http.get(f"{base}/api/mv/get_video/{job_id}") as response:
        assert response.status == 200, await response.text()
        return await response.read()


def kill9(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


async def test_kill_9_mid_job_resumes_the_same_prediction_after_restart(
    launch: Callable[[], tuple[subprocess.Popen, str]], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    first, base = launch()
    health = await until_up(http, first, f"{base}/api/mv/health")
    assert health["mode"] == "sandbox" and set(health["providers"].values()) == {"sandbox"}

    done_id = await submit(http, base)
    await until(http, base, done_id, lambda s: s["status"] == "succeeded")
    finished_video = await video(http, base, done_id)
    assert finished_video[4:8] == b"ftyp"

    job_id = await submit(http, base)
    running = await until(
        http,
        base,
        job_id,
        lambda s: s["status"] == "running" and s["provider_prediction_id"] and s["stage"] == "generating",
        timeout=5,
    )
    prediction_id = running["provider_prediction_id"]
    kill9(first)

    record = json.loads((outputs / "jobs" / f"{job_id}.json").read_text())
    assert record["status"] == "running" and record["prediction_id"] == prediction_id
    # What a kill during a download or a record rewrite leaves behind: temporaries next to the real files, named by
    # the dead node (whose heartbeat names its process, now gone).
    [dead] = [path.stem for path in (outputs / "nodes").glob("*.json")]
    stale = [
        outputs / "videos" / f".{job_id}.mp4.{dead}-{uuid.uuid4().hex[:8]}.part",
        outputs / "jobs" / f".{job_id}.json.{dead}-{uuid.uuid4().hex[:8]}.part",
    ]
    for path in stale:
        path.write_bytes(b"\x00" * 1000)

    second, base = launch()
    await until_up(http, second, f"{base}/api/mv/health")
    assert not any(path.exists() for path in stale)  # removed at start-up
    assert "resuming 1 unfinished job" in (tmp_path / "server-1.log").read_text()

    final = await until(http, base, job_id, lambda s: s["status"] in ("succeeded", "failed", "canceled"))
    assert final["status"] == "succeeded", final["error"]
    assert final["provider_prediction_id"] == prediction_id
    resumed_video = await video(http, base, job_id)
    assert resumed_video[4:8] == b"ftyp" and len(resumed_video) == final["video_bytes"]
    assert len(list((outputs / "sandbox" / "predictions").glob("*.json"))) == 2  # no second prediction was created

    assert await video(http, base, done_id) == finished_video
    async with http.get(f"{base}/api/mv/jobs/{job_id}/events") as response:
        events = [event async for event in read_sse(response)]
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))  # ids continue across the crash
    assert events[-1]["event"] == "succeeded"
    assert sorted(outputs.glob("*/.*.part")) == []


async def test_sigterm_with_an_open_event_stream_stops_at_once_and_the_job_resumes(
    launch: Callable[[], tuple[subprocess.Popen, str]], http: aiohttp.ClientSession, server_env: dict[str, str]
) -> None:
    server_env["MV_SANDBOX_VIDEO_SECONDS"] = "60"  # the job is still running when the server stops
    process, base = launch()
    await until_up(http, process, f"{base}/api/mv/health")
    job_id = await submit(http, base)
    running = await until(http, base, job_id, lambda s: s["stage"] == "generating", timeout=5)
    async with http.get(f"{base}/api/mv/jobs/{job_id}/events") as stream:
        first = await anext(read_sse(stream))
        assert first["event"] == "queued"
        started = asyncio.get_running_loop().time()
        process.send_signal(signal.SIGTERM)
        rest = [event async for event in read_sse(stream)]  # the server ends the stream instead of holding it
        ended = asyncio.get_running_loop().time() - started
    exit_code = await asyncio.to_thread(process.wait, 20)
    assert exit_code == 0
    assert ended < 5, f"the stream stayed open {ended:.1f} s after SIGTERM"
    assert all(event["event"] not in ("succeeded", "failed", "canceled") for event in rest)

    second, base = launch()  # the job was not canceled by the shutdown: it resumes
    await until_up(http, second, f"{base}/api/mv/health")
    state = await until(http, base, job_id, lambda s: s["status"] == "running")
    assert state["provider_prediction_id"] == running["provider_prediction_id"]


def ffmpeg_children(parent: int, *markers: str) -> list[int]:
    """Live ffmpeg processes whose parent is ``parent`` (0: any) and whose command line holds every marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state, ppid = (entry / "stat").read_text().rpartition(")")[2].split()[:2]
        except OSError:
            continue
        if "ffmpeg" in cmdline and all(m in cmdline for m in markers) and state != "Z" and parent in (0, int(ppid)):
            found.append(int(entry.name))
    return found


async def test_kill_9_mid_assembly_takes_its_ffmpeg_along_and_the_job_runs_again(
    launch: Callable[[], tuple[subprocess.Popen, str]],
    http: aiohttp.ClientSession,
    server_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """A killed server's ffmpeg used to run on with parent 1 (the crossfade of 24 clips here for another 15-40 s,
    while the restarted server ran the job again beside it). Now it dies with the server, at once."""
    from mvserver.media.run import ffmpeg_exe

    outputs = tmp_path / "outputs"
    server_env["MV_SANDBOX_VIDEO_SECONDS"] = "1"
    process, base = launch()
    await until_up(http, process, f"{base}/api/mv/health")
    async with http.post(f"{base}/api/mv/generate_video", json={"prompt": PROMPT, "duration": 8}) as response:
        assert response.status == 202, await response.text()
        clip = (await response.json())["job_id"]
    await until(http, base, clip, lambda s: s["status"] == "succeeded", timeout=60)
    song = tmp_path / "song.mp3"
    subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=f=220:d=200",
            "-ac",
            "2",
            "-b:a",
            "64k",
            str(song),
        ],
        check=True,
        timeout=120,
    )
    async with http.post(
        f"{base}/api/mv/upload_audio", data=song.read_bytes(), headers={"Content-Type": "audio/mpeg"}
    ) as response:
        assert response.status == 201, await response.text()
        audio_id = (await response.json())["audio_id"]
    body = {"clips": [{"job_id": clip}] * 24, "audio_id": audio_id, "clip_audio": "mix", "transition": "crossfade"}
    async with http.post(f"{base}/api/mv/assemble", json=body) as response:
        assert response.status == 202, await response.text()
        job_id = (await response.json())["job_id"]
    await until(http, base, job_id, lambda s: s["stage"] == "assembling", timeout=60)
    async with asyncio.timeout(60):  # an encoding run (a probe has no filter graph)
        while not (running := ffmpeg_children(process.pid, str(outputs / "videos"), "-filter_complex")):
            await asyncio.sleep(0.05)
    try:
        # the run is bounded as settings/media.yaml says: 1024 MiB of private memory, 2 threads per stage
        limits = Path(f"/proc/{running[0]}/limits").read_text()
        data = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max data size"))
        assert data == [str(1024 << 20)] * 2, limits
        cmdline = Path(f"/proc/{running[0]}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"-filter_complex_threads") + 1] == b"2"
        kill9(process)
        assert await exited(running[0], 5), "the assembly's ffmpeg outlived its server"
        assert ffmpeg_children(0, str(outputs)) == []
    finally:
        for pid in ffmpeg_children(0, str(outputs)):  # the old behaviour: orphans; end them
            os.kill(pid, signal.SIGKILL)

    second, base = launch()
    await until_up(http, second, f"{base}/api/mv/health")
    final = await until(http, base, job_id, lambda s: s["status"] in ("succeeded", "failed", "canceled"), timeout=180)
    assert final["status"] == "succeeded", final["error"]
    assert final["request"]["result"]["reencoded"] == list(range(24))
    assert final["request"]["expected_seconds"] == pytest.approx(24 * 8 - 23 * 0.5)
