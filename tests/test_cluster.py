"""Several real ``python -m mvserver`` processes on one private Redis, all pointed at one standalone simulator.

Short leases and claim intervals keep takeovers quick; the simulator's prediction records count creates.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    CLAIM_INTERVAL,
    CLUSTER_PROMPT,
    LEASE,
    PROJECT,
    Cluster,
    final,
    free_port,
    make_audio,
    nodes_up,
    read_sse,
    sim_up,
    state,
    until,
    with_signal,
)
from redis.asyncio import Redis

from mvserver.web.access.auth import KeyLimits, create_key

pytestmark = pytest.mark.cluster


async def submit(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/api/mv/generate_video", json={"prompt": CLUSTER_PROMPT, "duration": 4}) as response:
        assert response.status == 202, await response.text()
        return (await response.json())["job_id"]


async def follow(
    http: aiohttp.ClientSession, base: str, job_id: str, received: list[tuple[float, dict[str, Any]]] | None = None
) -> list[dict[str, Any]]:
    """Every event of a job from ``base``'s SSE stream until the final one (with arrival times, if asked)."""
    events = []
    async with http.get(f"{base}/api/mv/jobs/{job_id}/events", timeout=aiohttp.ClientTimeout(total=90)) as response:
        assert response.status == 200
        async for event in read_sse(response):
            events.append(event)
            if received is not None:
                received.append((time.monotonic(), event))
    return events


def assert_ids_exact(events: list[dict[str, Any]]) -> None:
    ids = [int(e["id"]) for e in events]
    assert ids == list(range(1, len(ids) + 1)), ids


async def test_submit_on_a_stream_on_b_cancel_on_c_and_every_node_answers_the_same(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    await sim_up(http, cluster)
    a, b, c = await nodes_up(http, cluster, 3)

    job_id = await submit(http, a)
    events = await follow(http, b, job_id)
    assert events[-1]["event"] == "succeeded", events[-1]
    assert_ids_exact(events)
    views = [await state(http, base, job_id) for base in (a, b, c)]
    assert views[0] == views[1] == views[2] and views[0]["status"] == "succeeded"
    videos = []
    for base in (a, b, c):
        async with http.get(f"{base}/api/mv/get_video/{job_id}") as response:
            assert response.status == 200
            videos.append(await response.read())
    assert videos[0][4:8] == b"ftyp" and videos[0] == videos[1] == videos[2]
    assert len(videos[0]) == views[0]["video_bytes"]

    doomed = await submit(http, a)
    stream = asyncio.ensure_future(follow(http, b, doomed))
    running = await until(http, c, doomed, lambda s: s["provider_prediction_id"] and s["stage"] == "generating")
    async with http.delete(f"{c}/api/mv/jobs/{doomed}") as response:
        assert response.status == 200
        canceled = await response.json()
    assert canceled["status"] == "canceled" and canceled["error"]["code"] == "job_canceled"
    followed = await asyncio.wait_for(stream, 30)
    assert followed[-1]["event"] == "canceled"
    assert_ids_exact(followed)
    assert cluster.predictions()[running["provider_prediction_id"]]["status"] == "canceled"
    for base in (a, b, c):
        assert (await state(http, base, doomed))["status"] == "canceled"
        async with http.get(f"{base}/api/mv/get_video/{doomed}") as response:
            assert response.status == 409 and (await response.json())["error"]["code"] == "job_canceled"


@pytest.mark.video_seconds(300)
async def test_events_reach_a_subscriber_on_another_node_as_they_are_written(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """Jobs running on node A, followed on node B: B subscribes to each job's event channel, which A's write script
    publishes to, so every event arrives at once (no blocking read over every followed job's log to restart, no
    wake stream written to Redis per job followed), all of them, in order."""
    await sim_up(http, cluster)
    [a] = await nodes_up(http, cluster, 1)
    jobs = [await submit(http, a) for _ in range(8)]
    for job_id in jobs:
        await until(http, a, job_id, lambda s: s["stage"] == "generating")  # all of them run on A
    [b] = await nodes_up(http, cluster, 1)
    received: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in jobs]
    connected = time.time()
    streams = asyncio.gather(*(follow(http, b, job_id, got) for job_id, got in zip(jobs, received)))
    async with asyncio.timeout(30):
        while not all(any(e["data"]["event_time"] > connected for _, e in got) for got in received):
            await asyncio.sleep(0.05)  # every stream is open and has had a live progress event
    cluster.fast_forward(1.0)
    followed = await asyncio.wait_for(streams, 60)
    delays = []
    for events, got in zip(followed, received):
        assert_ids_exact(events)
        assert events[-1]["event"] == "succeeded"
        offset = time.time() - time.monotonic()
        delays += [at + offset - e["data"]["event_time"] for at, e in got if e["data"]["event_time"] > connected]
    assert len(delays) >= len(jobs) * 2, delays  # live progress events and the final one, not only the history
    assert max(delays) < 1.0, sorted(delays)[-5:]
    redis = Redis.from_url(cluster.redis.url, decode_responses=True)
    try:
        assert await redis.keys("cluster:wake:*") == []  # following a job writes nothing
    finally:
        await redis.aclose()


@pytest.mark.video_seconds(300)
async def test_kill_9_of_the_owner_hands_its_jobs_to_the_survivors_with_the_same_predictions(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    await sim_up(http, cluster)
    [a] = await nodes_up(http, cluster, 1)
    owner = cluster.nodes[0][0]
    jobs = [await submit(http, a) for _ in range(10)]
    before = {
        job_id: await until(http, a, job_id, lambda s: s["provider_prediction_id"] and s["stage"] == "generating")
        for job_id in jobs
    }
    b, c = await nodes_up(http, cluster, 2)
    received: dict[str, list[tuple[float, dict[str, Any]]]] = {job_id: [] for job_id in jobs}
    streams = [asyncio.ensure_future(follow(http, b, job_id, received[job_id])) for job_id in jobs]
    await asyncio.sleep(0.3)  # the subscribers are following

    with_signal(owner, signal.SIGKILL)
    killed_at = time.monotonic()
    owner.wait(timeout=10)
    async with asyncio.timeout(LEASE + CLAIM_INTERVAL + 20):
        while not all(any(at > killed_at and e["event"] == "running" for at, e in received[j]) for j in jobs):
            await asyncio.sleep(0.05)
    cluster.fast_forward()
    followed = await asyncio.wait_for(asyncio.gather(*streams), 60)

    predictions = cluster.predictions()
    assert len(predictions) == len(jobs)  # exactly one create per job
    takeovers = []
    for job_id, events in zip(jobs, followed, strict=False):
        assert events[-1]["event"] == "succeeded", events[-1]
        assert_ids_exact(events)  # none repeated, none skipped, each seen once by the subscriber on B
        assert events[-1]["data"]["provider_prediction_id"] == before[job_id]["provider_prediction_id"]
        resumed = [at for at, event in received[job_id] if at > killed_at and event["event"] == "running"]
        assert resumed, f"{job_id} was not taken over"
        takeovers.append(resumed[0] - killed_at)
    assert max(takeovers) < LEASE + CLAIM_INTERVAL + 3.0, takeovers
    for base in (b, c):
        for job_id in jobs:
            assert (await state(http, base, job_id))["provider_prediction_id"] == before[job_id][
                "provider_prediction_id"
            ]
    runners = "\n".join(cluster.log(i) for i in (1, 2))
    assert runners.count("taken over from a node whose lease lapsed") == len(jobs)


@pytest.mark.video_seconds(300)
async def test_a_paused_owner_cannot_write_after_the_takeover(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    await sim_up(http, cluster)
    [a] = await nodes_up(http, cluster, 1)
    owner = cluster.nodes[0][0]
    job_id = await submit(http, a)
    first = await until(http, a, job_id, lambda s: s["provider_prediction_id"] and s["stage"] == "generating")
    [b] = await nodes_up(http, cluster, 1)
    received: list[tuple[float, dict[str, Any]]] = []
    stream = asyncio.ensure_future(follow(http, b, job_id, received))
    await asyncio.sleep(0.3)

    with_signal(owner, signal.SIGSTOP)
    stopped_at = time.monotonic()
    async with asyncio.timeout(LEASE + CLAIM_INTERVAL + 5):
        while not any(at > stopped_at and event["event"] == "running" for at, event in received):
            await asyncio.sleep(0.05)
    with_signal(owner, signal.SIGCONT)  # the paused owner wakes up believing it still runs the job
    async with asyncio.timeout(20):
        while "lease lost" not in cluster.log(0):
            await asyncio.sleep(0.1)
    cluster.fast_forward()
    events = await asyncio.wait_for(stream, 30)

    assert events[-1]["event"] == "succeeded"
    assert_ids_exact(events)
    assert [e["event"] for e in events].count("succeeded") == 1
    assert events[-1]["data"]["provider_prediction_id"] == first["provider_prediction_id"]
    assert len(cluster.predictions()) == 1
    assert cluster.predictions()[first["provider_prediction_id"]]["status"] == "succeeded"  # nobody canceled it
    assert owner.poll() is None  # it lives on, and serves
    assert (await state(http, a, job_id))["status"] == "succeeded"


async def test_a_redis_restart_mid_run_is_ridden_out(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    await sim_up(http, cluster)
    a, b = await nodes_up(http, cluster, 2)
    jobs = [await submit(http, base) for base in (a, b, a, b)]
    for job_id in jobs:
        await until(http, a, job_id, lambda s: s["provider_prediction_id"])
    cluster.redis.restart()
    finals = [await until(http, b, job_id, final, timeout=60) for job_id in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * len(jobs), [f["error"] for f in finals]
    assert len(cluster.predictions()) == len(jobs)
    for job_id in jobs:
        events = await follow(http, a, job_id)
        assert_ids_exact(events)
        assert events[-1]["event"] == "succeeded"


async def half_an_upload(
    base: str, data: bytes, audio_dir: Path
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader, Path]:
    """An upload to ``base`` that has sent half its body: its temporary exists and the node is writing it."""
    before = set(audio_dir.glob(".*.part"))
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /api/mv/upload_audio HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data[: len(data) // 2]
    )
    await writer.drain()
    async with asyncio.timeout(30):
        while not (set(audio_dir.glob(".*.part")) - before):
            await asyncio.sleep(0.02)
    [part] = set(audio_dir.glob(".*.part")) - before
    return writer, reader, part


async def test_a_starting_node_leaves_a_live_nodes_temporaries_and_removes_a_dead_ones(
    cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    audio_dir = tmp_path / "outputs" / "audio"
    data = make_audio(tmp_path / "song.wav", seconds=3.0).read_bytes()
    # A half-sent upload must outlast B's start-up, which takes tens of seconds on a loaded machine: past the
    # default 10 s idle limit, A drops the upload and its temporary, and there is nothing left for B to leave alone.
    cluster.extra_env.update(MV_UPLOAD_IDLE_SECONDS="600", MV_UPLOAD_MIN_BYTES_PER_SECOND="0")
    [a] = await nodes_up(http, cluster, 1)
    writer, reader, part = await half_an_upload(a, data, audio_dir)
    await nodes_up(http, cluster, 1)  # B starts, and cleans up, while A writes its temporary
    assert part.exists()
    writer.write(data[len(data) // 2 :])
    await writer.drain()
    async with asyncio.timeout(30):
        status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 201"), status
    assert not part.exists() and len(list(audio_dir.glob("*.wav"))) == 1

    _, _, orphan = await half_an_upload(a, data, audio_dir)
    owner = cluster.nodes[0][0]
    owner.kill()  # kill -9: its temporary stays behind, its process is gone
    owner.wait(timeout=10)
    assert orphan.exists()
    await nodes_up(http, cluster, 1)  # C's start-up removes what the dead node left
    assert not orphan.exists()


@pytest.mark.video_seconds(120)  # the admitted jobs stay running through the burst
async def test_the_running_jobs_cap_holds_across_nodes_under_a_burst(
    cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(keys_file, "burst", KeyLimits(jobs_per_minute=6000, jobs_burst=100, max_running_jobs=2))
    cluster.extra_env = {
        "MV_API_KEYS_FILE": str(keys_file),
        "MV_URL_SIGNING_SECRET": "cluster-signing-secret-0123456789abcdef",
    }
    await sim_up(http, cluster)
    a, b = await nodes_up(http, cluster, 2)
    auth = {"Authorization": f"Bearer {key}"}

    async def post(base: str) -> tuple[int, dict[str, Any]]:
        async with http.post(
            f"{base}/api/mv/generate_video", json={"prompt": CLUSTER_PROMPT, "duration": 4}, headers=auth
        ) as response:
            return response.status, await response.json()

    answers = await asyncio.gather(*(post((a, b)[n % 2]) for n in range(30)))
    assert sorted(status for status, _ in answers) == [202] * 30, answers  # none refused: beyond the cap they wait
    ids = {body["job_id"] for _, body in answers}

    async def places(base: str) -> dict[str, int]:
        async with http.get(f"{base}/api/mv/me", headers=auth) as response:
            return (await response.json())["jobs"]

    async def states() -> dict[str, str]:
        async with http.get(f"{a}/api/mv/jobs?limit=50", headers=auth) as response:
            return {job["job_id"]: job["status"] for job in (await response.json())["jobs"]}

    # Both nodes see the one count in Redis: the cap's 2 hold places, 28 wait; never more than 2 run.
    assert await places(a) == await places(b) == {"running": 2, "waiting": 28}
    async with asyncio.timeout(30):
        while list((await states()).values()).count("running") < 2:
            await asyncio.sleep(0.1)
    seen = await states()
    assert set(seen) == ids and list(seen.values()).count("running") == 2
    assert set(seen.values()) == {"queued", "running"}
    # A running job ends (cancelled on the other node): exactly one waiting job takes its place.
    first = next(job_id for job_id, status in seen.items() if status == "running")
    async with http.delete(f"{b}/api/mv/jobs/{first}", headers=auth) as response:
        assert response.status == 200
    async with asyncio.timeout(30):
        while await places(b) != {"running": 2, "waiting": 27}:
            await asyncio.sleep(0.1)
        while list((await states()).values()).count("running") < 2:
            await asyncio.sleep(0.1)
    after = await states()
    assert list(after.values()).count("running") == 2 and list(after.values()).count("queued") == 27


def test_a_redis_that_is_down_at_start_up_is_one_clear_line_and_exit_2(tmp_path: Path, settings_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MV_")}
    env.update(
        MV_REDIS_URL=f"redis://:secret@127.0.0.1:{free_port()}/0",
        MV_SANDBOX="true",
        MV_OUTPUT_DIR=str(tmp_path / "outputs"),
        MV_SETTINGS_DIR=str(settings_dir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, "-m", "mvserver", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "unavailable" in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("mvserver: job store unavailable: cannot reach Redis at")
    assert "secret" not in done.stderr
