"""Start-up and memory with many finished jobs: N finished jobs (default 100,000) already in the store, then a
server starts; report the time until it answers, its RSS, and ``GET /api/mv/jobs/{id}`` latency for old jobs.

Both stores: the file store (records and event logs under ``outputs/jobs``, written here in the store's own
format) and Redis (a private ``redis-server``, filled with the store's own keys through a pipeline).

    python -m bench.startup [--jobs 100000] [--stores file redis] [--gets 2000]

A run with no jobs first shows what start-up costs anyway (imports, provider clients); the server's CPU time at
the moment it first answers is given beside the wall time, which other load on the machine stretches.

Goals: start-up under 3 s, RSS under 150 MB, p50 of ``GET /jobs/{id}`` for an old job under 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    HOST,
    Process,
    bench_settings,
    cpu_seconds,
    free_port,
    percentile,
    print_table,
    proc_status,
    processes,
    start_simulator,
    wait_http,
    workdir,
)
from mvserver.jobs.model import Event, Job

PROMPT = "bench: a drummer on a rooftop at dusk\n\nRules: no subtitles, captions or on-screen text."


def finished_job(created: float) -> tuple[Job, list[Event]]:
    """A finished job as the engine leaves it: record plus the usual queued/running/progress/.../succeeded events."""
    job = Job(
        id=str(uuid.uuid4()),
        backend="replicate",
        model="google/veo-3.1",
        sandbox=False,
        request={
            "prompt": PROMPT,
            "full_prompt": PROMPT,
            "duration": 8,
            "aspect_ratio": "16:9",
            "generate_audio": True,
            "seed": None,
            "negative_prompt": "",
            "defaults_applied": ["seed"],
        },
        created_at=created,
        started_at=created + 0.01,
        prediction_id=uuid.uuid4().hex[:26],
    )
    events = []
    for name, stage, progress in (
        ("queued", "queued", None),
        ("running", "submitting", None),
        ("progress", "generating", 0.3),
        ("progress", "generating", 0.8),
        ("progress", "downloading", 1.0),
        ("succeeded", "done", 1.0),
    ):
        job.stage, job.progress = stage, progress
        if name == "succeeded":
            job.status, job.finished_at, job.video_bytes = "succeeded", created + 60, 4_000_000
        elif name != "queued":
            job.status = "running"
        events.append(Event(len(events) + 1, name, {**job.state(), "event_time": created}))
    job.last_event_id = len(events)
    return job, events


def fill_files(outputs: Path, count: int) -> list[str]:
    jobs_dir = outputs / "jobs"
    (jobs_dir / "active").mkdir(parents=True, exist_ok=True)
    ids = []
    now = time.time() - 3600
    for i in range(count):
        job, events = finished_job(now + i * 0.001)
        (jobs_dir / f"{job.id}.json").write_text(json.dumps(job.record(), indent=2))
        (jobs_dir / f"{job.id}.events.jsonl").write_text("".join(e.log_line() for e in events))
        ids.append(job.id)
    return ids


def fill_redis(url: str, prefix: str, count: int) -> list[str]:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    ids = []
    now = time.time() - 3600
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        job, events = finished_job(now + i * 0.001)
        pipe.hset(
            f"{prefix}job:{job.id}",
            mapping={"rec": json.dumps(job.record()), "status": job.status, "last": job.last_event_id},
        )
        for event in events:
            pipe.xadd(f"{prefix}ev:{job.id}", {"e": event.event, "d": event.data_json}, id=f"0-{event.id}")
        pipe.zadd(f"{prefix}finished", {job.id: job.finished_at})
        ids.append(job.id)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    used = client.info("memory")["used_memory"]
    client.close()
    print(f"redis: {count} finished jobs, {used / 2**20:.0f} MiB used", flush=True)
    return ids


async def get_latencies(base: str, ids: list[str], gets: int) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as session:
        for job_id in random.sample(ids, min(gets, len(ids))):
            started = time.perf_counter()
            async with session.get(f"{base}/api/mv/jobs/{job_id}") as response:
                assert response.status == 200, await response.text()
                await response.read()
            latencies.append(time.perf_counter() - started)
    return latencies


def start_redis(started: list[Process], work: Path) -> str:
    port = free_port()
    proc = Process(
        "redis",
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(work)],
        work / "redis.log",
    )
    started.append(proc)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        if time.monotonic() > deadline:
            raise RuntimeError(proc.tail())
        time.sleep(0.05)
    return f"redis://{HOST}:{port}/0"


def measure(store: str, count: int, gets: int) -> list[object]:
    work = workdir(f"startup-{store}")
    with processes() as started:
        sim_url = start_simulator(started, work, video_latency=1.0)
        settings = bench_settings(work)
        env = {
            "GEMINI_API_KEY": "b",
            "REPLICATE_API_TOKEN": "r8_b",
            "GOOGLE_VERTEX_API_KEY": "b",
            "MV_GEMINI_BASE_URL": f"{sim_url}/gemini",
            "MV_VERTEX_BASE_URL": f"{sim_url}/vertex",
            "MV_REPLICATE_BASE_URL": f"{sim_url}/replicate",
            "MV_OUTPUT_DIR": str(work / "outputs"),
            "MV_SETTINGS_DIR": str(settings),
        }
        filled = time.monotonic()
        if store == "redis":
            env["MV_REDIS_URL"] = start_redis(started, work)
            env["MV_REDIS_PREFIX"] = "bench:"
            ids = fill_redis(env["MV_REDIS_URL"], "bench:", count)
        else:
            ids = fill_files(work / "outputs", count)
        print(f"{store}: {count} finished jobs written in {time.monotonic() - filled:.1f} s", flush=True)
        port = free_port()
        began = time.monotonic()
        proc = Process(
            "mvserver",
            [sys.executable, "-m", "bench.run_server", "--host", HOST, "--port", str(port)],
            work / "mvserver.log",
            env=env,
        )
        started.append(proc)
        base = f"http://{HOST}:{port}"
        wait_http(f"{base}/api/mv/health", proc, timeout=120)
        startup = time.monotonic() - began
        startup_cpu = cpu_seconds(proc.pid)
        rss_start = proc_status(proc.pid)["VmRSS"] / 1024
        latencies = asyncio.run(get_latencies(base, ids, gets)) if ids else [0.0]
        rss_after = proc_status(proc.pid)["VmRSS"] / 1024
    if store == "file":
        shutil.rmtree(work / "outputs", ignore_errors=True)
    return [
        store,
        count,
        f"{startup:.2f} s",
        f"{startup_cpu:.2f} s",
        f"{rss_start:.0f} MB",
        f"{rss_after:.0f} MB",
        f"{percentile(latencies, 50) * 1000:.2f} ms",
        f"{percentile(latencies, 99) * 1000:.2f} ms",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--stores", nargs="+", choices=["file", "redis"], default=["file", "redis"])
    parser.add_argument("--gets", type=int, default=2000)
    args = parser.parse_args(argv)
    rows = [measure(store, count, args.gets) for store in args.stores for count in (0, args.jobs)]
    print_table(
        f"start-up with {args.jobs} finished jobs (goals: < 3 s, RSS < 150 MB, GET p50 < 5 ms)",
        [
            "store",
            "jobs",
            "start-up (wall)",
            "start-up (server CPU)",
            "RSS at start",
            f"RSS after {args.gets} GETs",
            "GET p50",
            "GET p99",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
