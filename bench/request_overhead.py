"""Request overhead: create_scenes against an instant simulator (scenes latency 0), the server on one core.

mvserver is pinned to CPU 0; the client (closed loop: C requests in flight) and the simulator share CPU 1. The
server-side latency is the time from a first middleware's entry to the handler's return (``bench.run_server
--stats``); the client latency adds the socket and client. Each level runs after a warm-up.

    python -m bench.request_overhead [--concurrency 1 32] [--duration 10]

``--access`` runs two servers in the same run, one as shipped (keys, quotas and metrics off) and one with API keys,
per-key quotas (limits high enough never to refuse) and ``/metrics`` on, and alternates ``--rounds`` measurements
between them at each level; it reports both and the overhead at p50 and p99.

    python -m bench.request_overhead --access [--concurrency 1 32] [--duration 5] [--rounds 3]
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

from bench.common import (
    bench_settings,
    cpu_seconds,
    percentile,
    print_table,
    processes,
    raise_open_files_limit,
    start_server,
    start_simulator,
    workdir,
)
from mvserver.web.access.auth import KeyLimits, create_key

SERVER_CPU, CLIENT_CPU = {0}, {1}
ROUTE = "/api/mv/create_scenes"
BODY = {"idea": "a drummer who plays on rooftops at dusk", "character_description": "a tall woman in a red coat"}
# (label, method, path, body, expected status, route template for the server timings)
SCENES_TARGET = ("create_scenes", "POST", ROUTE, BODY, 200, ROUTE)
# A near-empty handler (an unknown job id: one dict lookup, 404), so the fixed cost per request shows fully.
LIGHT_TARGET = (
    "job 404",
    "GET",
    "/api/mv/jobs/00000000-0000-4000-8000-000000000000",
    None,
    404,
    "/api/mv/jobs/{job_id}",
)


async def load(
    base: str,
    concurrency: int,
    duration: float,
    headers: dict[str, str] | None = None,
    target: tuple[Any, ...] = SCENES_TARGET,
) -> tuple[int, int, list[float]]:
    """Closed loop for ``duration`` seconds: (requests answered as expected, other answers, client latencies in s)."""
    _, method, path, body, expected, _ = target
    latencies: list[float] = []
    failures = [0]
    deadline = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.request(method, base + path, json=body, headers=headers) as response:
                await response.read()
                if response.status == expected:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures[0] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return len(latencies), failures[0], latencies


async def server_timings(base: str, route: str = ROUTE) -> list[float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/_bench/timings?reset=1") as response:
            return (await response.json()).get(route, [])


def run_level(base: str, pid: int, concurrency: int, duration: float) -> tuple[Any, ...]:
    asyncio.run(load(base, concurrency, min(2.0, duration)))  # warm-up
    asyncio.run(server_timings(base))
    cpu_before = cpu_seconds(pid)
    ok, failed, client = asyncio.run(load(base, concurrency, duration))
    cpu = cpu_seconds(pid) - cpu_before
    server = asyncio.run(server_timings(base))
    ms = lambda values, p: percentile(values, p) * 1000  # noqa: E731
    return (
        concurrency,
        ok,
        failed,
        ok / duration,
        ms(server, 50),
        ms(server, 99),
        ms(client, 50),
        ms(client, 99),
        f"{cpu / duration * 100:.0f}%",
    )


def measure(
    base: str, pid: int, concurrency: int, duration: float, headers: dict[str, str] | None, target: tuple[Any, ...]
) -> tuple[int, int, list[float], list[float], float]:
    """One measured round after a short warm-up: (ok, other, client latencies, server latencies, server CPU s)."""
    asyncio.run(load(base, concurrency, min(1.0, duration), headers, target))
    asyncio.run(server_timings(base, target[-1]))
    cpu_before = cpu_seconds(pid)
    ok, failed, client = asyncio.run(load(base, concurrency, duration, headers, target))
    cpu = cpu_seconds(pid) - cpu_before
    return ok, failed, client, asyncio.run(server_timings(base, target[-1])), cpu


def access_comparison(args: argparse.Namespace) -> int:
    """Off and on in the same run, rounds alternating, so machine load hits both alike."""
    work = workdir("overhead-access")
    keys_file = work / "keys.yaml"
    unlimited = KeyLimits(blocking_per_minute=6e9, blocking_burst=10**9, jobs_per_minute=6e9, jobs_burst=10**9)
    _, key = create_key(keys_file, "bench", unlimited)
    access_env = {
        "MV_API_KEYS_FILE": str(keys_file),
        "MV_URL_SIGNING_SECRET": "bench-signing-secret-" + "x" * 32,
        "MV_METRICS": "true",
    }
    modes = {"off": (None, {}), "on": ({"Authorization": f"Bearer {key}"}, access_env)}
    rows, overhead = [], []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=1.0, scenes_latency=0.0, cpus=CLIENT_CPU)
        servers = {}
        for mode, (_, env) in modes.items():
            base = start_server(
                started, work / mode, sim, bench_settings(work / mode), cpus=SERVER_CPU, stats=True, extra_env=env
            )
            servers[mode] = (base, started[-1].pid)
        for target in (SCENES_TARGET, LIGHT_TARGET):
            for concurrency in args.concurrency:
                pooled: dict[str, list[Any]] = {mode: [0, 0, [], [], 0.0] for mode in modes}
                for _ in range(args.rounds):
                    for mode, (headers, _) in modes.items():
                        base, pid = servers[mode]
                        for i, part in enumerate(measure(base, pid, concurrency, args.duration, headers, target)):
                            pooled[mode][i] += part
                p50 = {}
                for mode, (ok, failed, client, server, cpu) in pooled.items():
                    seconds = args.duration * args.rounds
                    ms = lambda values, p: percentile(values, p) * 1000  # noqa: E731
                    p50[mode] = (ms(server, 50), ms(server, 99), ms(client, 50), ms(client, 99))
                    rows.append(
                        (
                            target[0],
                            concurrency,
                            mode,
                            ok,
                            failed,
                            ok / seconds,
                            *p50[mode],
                            f"{cpu / seconds * 100:.0f}%",
                        )
                    )
                overhead.append(
                    (
                        target[0],
                        concurrency,
                        *(f"{(on / off - 1) * 100:+.1f}%" for on, off in zip(p50["on"], p50["off"], strict=False)),
                    )
                )
    print_table(
        f"Request overhead of access control: POST {ROUTE} and GET {LIGHT_TARGET[2]} (404), keys + quotas "
        f"+ metrics off vs on, {args.rounds} alternating rounds of {args.duration:g} s per level and mode; "
        f"server on CPU 0, client and simulator on CPU 1",
        [
            "request",
            "in flight",
            "access",
            "answered 200",
            "other",
            "requests/s",
            "server p50 (ms)",
            "server p99 (ms)",
            "client p50 (ms)",
            "client p99 (ms)",
            "server CPU",
        ],
        rows,
    )
    print_table(
        "Overhead (on vs off)",
        ["request", "in flight", "server p50", "server p99", "client p50", "client p99"],
        overhead,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.request_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="requests in flight (default 1 32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    parser.add_argument("--access", action="store_true", help="compare keys + quotas + metrics off vs on")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode with --access (default 3)")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    os.sched_setaffinity(0, CLIENT_CPU)
    if args.access:
        return access_comparison(args)
    work = workdir("overhead")
    rows = []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=1.0, scenes_latency=0.0, cpus=CLIENT_CPU)
        base = start_server(started, work, sim, bench_settings(work), cpus=SERVER_CPU, stats=True)
        pid = started[-1].pid
        for concurrency in args.concurrency:
            rows.append(run_level(base, pid, concurrency, args.duration))
    print_table(
        f"Request overhead: POST {ROUTE} (4 scenes), simulator answers at once; server on CPU 0, client and "
        f"simulator on CPU 1, {args.duration:g} s per level",
        [
            "in flight",
            "answered 200",
            "other",
            "requests/s",
            "server p50 (ms)",
            "server p99 (ms)",
            "client p50 (ms)",
            "client p99 (ms)",
            "server CPU",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
