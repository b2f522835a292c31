"""Cluster: one Redis, one standalone simulator and three mvserver nodes sharing an output directory.

1. N jobs (default 600) at latency L, submitted round-robin over the nodes; each job's events are followed over SSE
   on *another* node than the one it was submitted to. Reports wall time / L (from the first submit to the last
   ``succeeded``), server CPU per job (three nodes together; Redis apart), and cross-node SSE latency (an event's
   ``event_time``, set by the node that wrote it, to its arrival at a subscriber of another node; live events only,
   not the history a new subscriber is sent first).
2. Takeover: K jobs (default 30) with a long latency; once they are generating, ``kill -9`` of one node; reports how
   long after the kill each of its jobs had a new ``running`` event (written by its new owner), with
   ``jobs.lease_seconds`` and ``jobs.claim_interval_seconds`` as given.

    python -m bench.cluster [--n 600] [--latency 5] [--poll 0.5] [--lease 5] [--claim-interval 1]

Goals: wall / L <= 1.25; cross-node SSE p99 < 50 ms; takeover within lease + claim interval.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    HOST,
    PROVIDER_ENV,
    Process,
    bench_settings,
    cpu_seconds,
    free_port,
    percentile,
    print_table,
    processes,
    profile_args,
    raise_open_files_limit,
    read_sse,
    spy,
    start_simulator,
    wait_http,
    workdir,
)

BODY = {"prompt": "bench: three drummers on three rooftops", "duration": 4, "seed": 7}
FINAL = {"succeeded", "failed", "canceled"}
NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30)
NODES = 3


def start_redis(started: list[Process], work: Path) -> tuple[str, Process]:
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
    return f"redis://{HOST}:{port}/0", proc


def start_node(started: list[Process], work: Path, index: int, env: dict[str, str]) -> tuple[str, Process]:
    port = free_port()
    proc = Process(
        f"node-{index}",
        [
            sys.executable,
            "-m",
            "bench.run_server",
            "--host",
            HOST,
            "--port",
            str(port),
            *profile_args(f"node-{index}", port),
        ],
        work / f"node-{index}.log",
        env=env,
    )
    started.append(proc)
    base = f"http://{HOST}:{port}"
    wait_http(f"{base}/api/mv/health", proc, timeout=60)
    spy(started, proc, f"node-{index}")
    return base, proc


async def run_job(
    session: aiohttp.ClientSession,
    submit_to: str,
    follow_on: str,
    latencies: list[float],
    seen: dict[str, list[tuple[float, str]]] | None = None,
) -> tuple[str, float]:
    """Submit on one node, follow on another; record each event's cross-node latency."""
    async with session.post(f"{submit_to}/api/mv/generate_video", json=BODY) as response:
        if response.status != 202:
            return f"http {response.status}", time.time()
        job = await response.json()
    async with session.get(follow_on + job["events_url"]) as response:
        connected = time.time()
        async for received, event in read_sse(response):
            written = event["data"].get("event_time")
            if written and written >= connected:  # live events only, not the history replayed at connect
                latencies.append(received - written)
            if seen is not None:
                seen.setdefault(job["job_id"], []).append((received, event.get("event", "")))
            if event.get("event") in FINAL:
                return event["event"], received
    return "stream ended", time.time()


async def throughput(nodes: list[str], n: int) -> tuple[float, list[str], list[float]]:
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=NO_TIMEOUT) as session:
        started = time.time()
        results = await asyncio.gather(
            *(run_job(session, nodes[i % NODES], nodes[(i + 1) % NODES], latencies) for i in range(n))
        )
    wall = max(at for _, at in results) - started
    return wall, [status for status, _ in results], latencies


async def takeover(nodes: list[str], procs: list[Process], k: int, settle: float) -> tuple[list[float], int, int]:
    """K jobs submitted on node 0 and followed on node 1; kill -9 node 0 once they generate."""
    latencies: list[float] = []
    seen: dict[str, list[tuple[float, str]]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=NO_TIMEOUT) as session:
        tasks = [asyncio.ensure_future(run_job(session, nodes[0], nodes[1], latencies, seen)) for _ in range(k)]
        await asyncio.sleep(settle)
        procs[0].popen.send_signal(signal.SIGKILL)
        killed = time.time()
        results = await asyncio.gather(*tasks)
    resumed = []
    for events in seen.values():
        after = [at for at, name in events if at > killed and name == "running"]
        if after:
            resumed.append(after[0] - killed)
    return resumed, sum(1 for status, _ in results if status == "succeeded"), len(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster")
    parser.add_argument("--n", type=int, default=600, help="jobs in the throughput run (default 600)")
    parser.add_argument("--latency", type=float, default=5.0, help="simulated video latency L (default 5 s)")
    parser.add_argument("--poll", type=float, default=0.5, help="provider poll interval (default 0.5 s)")
    parser.add_argument("--lease", type=float, default=5.0, help="jobs.lease_seconds (default 5)")
    parser.add_argument("--claim-interval", type=float, default=1.0, help="jobs.claim_interval_seconds (default 1)")
    parser.add_argument("--takeover-jobs", type=int, default=30)
    args = parser.parse_args(argv)
    raise_open_files_limit()
    work = workdir("cluster")
    with processes() as started:
        redis_url, redis_proc = start_redis(started, work)
        sim = start_simulator(started, work, video_latency=args.latency)
        settings = bench_settings(
            work,
            poll_interval_seconds=args.poll,
            max_concurrent=args.n,
            lease_seconds=args.lease,
            claim_interval_seconds=args.claim_interval,
        )
        env = {
            **PROVIDER_ENV,
            "MV_GEMINI_BASE_URL": f"{sim}/gemini",
            "MV_VERTEX_BASE_URL": f"{sim}/vertex",
            "MV_REPLICATE_BASE_URL": f"{sim}/replicate",
            "MV_OUTPUT_DIR": str(work / "outputs"),
            "MV_SETTINGS_DIR": str(settings),
            "MV_REDIS_URL": redis_url,
            "MV_REDIS_PREFIX": "bench:",
        }
        started_nodes = [start_node(started, work, i, env) for i in range(NODES)]
        nodes, procs = [b for b, _ in started_nodes], [p for _, p in started_nodes]
        sim_proc = started[1]

        before = [cpu_seconds(p.pid) for p in procs] + [cpu_seconds(redis_proc.pid), cpu_seconds(sim_proc.pid)]
        client_before = resource.getrusage(resource.RUSAGE_SELF)
        wall, statuses, latencies = asyncio.run(throughput(nodes, args.n))
        client_after = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
        after = [cpu_seconds(p.pid) for p in procs] + [cpu_seconds(redis_proc.pid), cpu_seconds(sim_proc.pid)]
        node_cpu = sum(after[:NODES]) - sum(before[:NODES])
        succeeded = statuses.count("succeeded")
        print_table(
            f"Cluster: {NODES} nodes on one Redis, {args.n} jobs at L = {args.latency:g} s, poll {args.poll:g} s, "
            "each followed over SSE on another node than it was submitted to",
            [
                "jobs",
                "succeeded",
                "wall",
                "wall / L",
                "node CPU per job",
                "Redis CPU",
                "simulator CPU",
                "client CPU",
                "SSE events",
                "cross-node SSE p50",
                "p99",
                "max",
            ],
            [
                [
                    args.n,
                    succeeded,
                    f"{wall:.2f} s",
                    f"{wall / args.latency:.2f}",
                    f"{node_cpu / args.n * 1000:.1f} ms",
                    f"{after[NODES] - before[NODES]:.1f} s",
                    f"{after[-1] - before[-1]:.1f} s",
                    f"{client_cpu:.1f} s",
                    len(latencies),
                    f"{percentile(latencies, 50) * 1000:.1f} ms",
                    f"{percentile(latencies, 99) * 1000:.1f} ms",
                    f"{max(latencies) * 1000:.1f} ms",
                ]
            ],
        )

        # A long latency keeps the jobs generating past the kill; the simulator's latency is set at start, so the
        # takeover run uses a second simulator.
        (work / "takeover").mkdir()
        sim2 = start_simulator(started, work / "takeover", video_latency=args.lease * 3)
        env2 = {
            **env,
            "MV_GEMINI_BASE_URL": f"{sim2}/gemini",
            "MV_VERTEX_BASE_URL": f"{sim2}/vertex",
            "MV_REPLICATE_BASE_URL": f"{sim2}/replicate",
            "MV_REDIS_PREFIX": "takeover:",
        }
        second = [start_node(started, work / "takeover", i, env2) for i in range(NODES)]
        for proc in procs:
            proc.stop()
        resumed, ok, total = asyncio.run(
            takeover([b for b, _ in second], [p for _, p in second], args.takeover_jobs, settle=2.0)
        )
        creates = len(list((work / "takeover" / "simulator" / "predictions").glob("*.json")))
        print_table(
            f"Takeover after kill -9 of the node running {args.takeover_jobs} jobs (lease {args.lease:g} s, "
            f"claim interval {args.claim_interval:g} s)",
            ["jobs", "succeeded", "taken over", "predictions created", "takeover p50", "max"],
            [
                [
                    total,
                    ok,
                    len(resumed),
                    creates,
                    f"{percentile(resumed, 50):.2f} s" if resumed else "-",
                    f"{max(resumed):.2f} s" if resumed else "-",
                ]
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
