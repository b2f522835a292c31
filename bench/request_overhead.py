"""Request overhead: create_scenes against an instant simulator (scenes latency 0), the server on one core.

mvserver is pinned to CPU 0; the client (closed loop: C requests in flight) and the simulator share CPU 1. The
server-side latency is the time from a first middleware's entry to the handler's return (``bench.run_server
--stats``); the client latency adds the socket and client. Each level runs after a warm-up.

    python -m bench.request_overhead [--concurrency 1 32] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (bench_settings, cpu_seconds, percentile, print_table, processes, raise_open_files_limit,
                          start_server, start_simulator, workdir)

SERVER_CPU, CLIENT_CPU = {0}, {1}
ROUTE = "/api/mv/create_scenes"
BODY = {"idea": "a drummer who plays on rooftops at dusk", "character_description": "a tall woman in a red coat"}


async def load(base: str, concurrency: int, duration: float) -> tuple[int, int, list[float]]:
    """Closed loop for ``duration`` seconds: (requests answered 200, other answers, client latencies in s)."""
    latencies: list[float] = []
    failures = [0]
    deadline = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(base + ROUTE, json=BODY) as response:
                await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[0] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return len(latencies), failures[0], latencies


async def server_timings(base: str) -> list[float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/_bench/timings?reset=1") as response:
            return (await response.json()).get(ROUTE, [])


def run_level(base: str, pid: int, concurrency: int, duration: float) -> tuple[Any, ...]:
    asyncio.run(load(base, concurrency, min(2.0, duration)))  # warm-up
    asyncio.run(server_timings(base))
    cpu_before = cpu_seconds(pid)
    ok, failed, client = asyncio.run(load(base, concurrency, duration))
    cpu = cpu_seconds(pid) - cpu_before
    server = asyncio.run(server_timings(base))
    ms = lambda values, p: percentile(values, p) * 1000  # noqa: E731
    return (concurrency, ok, failed, ok / duration, ms(server, 50), ms(server, 99), ms(client, 50), ms(client, 99),
            f"{cpu / duration * 100:.0f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.request_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="requests in flight (default 1 32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    os.sched_setaffinity(0, CLIENT_CPU)
    work = workdir("overhead")
    rows = []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=1.0, scenes_latency=0.0, cpus=CLIENT_CPU)
        base = start_server(started, work, sim, bench_settings(work), cpus=SERVER_CPU, stats=True)
        pid = started[-1].pid
        for concurrency in args.concurrency:
            rows.append(run_level(base, pid, concurrency, args.duration))
    print_table(f"Request overhead: POST {ROUTE} (4 scenes), simulator answers at once; server on CPU 0, client and "
                f"simulator on CPU 1, {args.duration:g} s per level",
                ["in flight", "answered 200", "other", "requests/s", "server p50 (ms)", "server p99 (ms)",
                 "client p50 (ms)", "client p99 (ms)", "server CPU"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
