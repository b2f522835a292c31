"""SSE fan-out: 1,000 EventSource subscribers over 100 jobs (10 each), in separate client processes.

Jobs are held silent first (the simulator answers their create with 429 + Retry-After, which mvserver honours), so
the server's RSS is read before and with every subscriber connected while no events flow; then the jobs run.
Reported: events delivered (each subscriber's ids must equal the job's full event-id list, read afterwards by a
fresh subscription replaying the history), publish-to-receive latency from ``event_time`` for events published
after the subscriber connected, and server RSS growth per subscriber.

    python -m bench.sse_fanout [--jobs 100] [--subscribers 1000] [--clients 2] [--latency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    bench_settings,
    percentile,
    print_table,
    proc_status,
    processes,
    raise_open_files_limit,
    read_sse,
    start_server,
    start_simulator,
    workdir,
)

FINAL = {"succeeded", "failed", "canceled"}
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)


async def subscribe(
    session: aiohttp.ClientSession, url: str, connected: asyncio.Event, counter: list[int], total: int
) -> dict[str, Any]:
    """One EventSource: every event id received, and latencies of the events published after it connected."""
    ids, latencies = [], []
    async with session.get(url, headers={"Accept": "text/event-stream"}) as response:
        since = time.time()
        counter[0] += 1
        if counter[0] == total:
            connected.set()
        async for received, event in read_sse(response):
            ids.append(int(event["id"]))
            if event["data"]["event_time"] >= since:
                latencies.append(received - event["data"]["event_time"])
            if event.get("event") in FINAL:
                break
    return {"url": url, "ids": ids, "latencies": latencies}


async def client_main(urls: list[str], conn: Any) -> None:
    raise_open_files_limit()
    connected, counter = asyncio.Event(), [0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        tasks = [asyncio.ensure_future(subscribe(session, url, connected, counter, len(urls))) for url in urls]
        await connected.wait()
        conn.send("connected")
        results = await asyncio.gather(*tasks, return_exceptions=True)
    conn.send([r if isinstance(r, dict) else {"error": repr(r)} for r in results])


def client_process(urls: list[str], conn: Any) -> None:
    asyncio.run(client_main(urls, conn))


async def submit_jobs(base: str, sim: str, n: int, hold: float, spread: float) -> list[str]:
    """Submit ``n`` jobs evenly over ``spread`` seconds, each held ``hold`` seconds by a 429 on its create."""
    async with aiohttp.ClientSession() as session:
        fault = {"route": "replicate.create", "kind": "status", "status": 429, "retry_after": hold, "times": n}
        async with session.post(f"{sim}/_sim/faults", json=fault) as response:
            response.raise_for_status()
        ids = []
        started = time.monotonic()
        for k in range(n):
            await asyncio.sleep(max(0.0, started + spread * k / n - time.monotonic()))
            body = {"prompt": "bench: fan-out clip", "duration": 4, "seed": 3}
            async with session.post(f"{base}/api/mv/generate_video", json=body) as response:
                ids.append((await response.json())["job_id"])
        return ids


async def history(base: str, job_ids: list[str]) -> dict[str, list[int]]:
    """The full event-id list of each finished job, from a fresh subscription that replays it."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def one(job_id: str) -> list[int]:
            async with session.get(f"{base}/api/mv/jobs/{job_id}/events") as response:
                return [int(event["id"]) async for _, event in read_sse(response)]

        return dict(zip(job_ids, await asyncio.gather(*(one(j) for j in job_ids)), strict=False))


async def wait_final(base: str, job_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            statuses = []
            for job_id in job_ids:
                async with session.get(f"{base}/api/mv/jobs/{job_id}") as response:
                    statuses.append((await response.json())["status"])
            if all(s in FINAL for s in statuses):
                return
            await asyncio.sleep(0.5)
    raise TimeoutError("jobs did not finish")


def rss_now(pid: int, samples: int = 5) -> int:
    values = []
    for _ in range(samples):
        values.append(proc_status(pid)["VmRSS"])
        time.sleep(0.05)
    return int(statistics.median(values))


def run(args: argparse.Namespace) -> list[tuple[Any, ...]]:
    work = workdir("sse")
    with processes() as started:
        sim = start_simulator(started, work, video_latency=args.latency)
        settings = bench_settings(
            work,
            poll_interval_seconds=args.poll,
            max_concurrent=args.jobs,
            retry_max_delay_seconds=max(30.0, args.hold + 5),
            sse_ping_interval_seconds=15,
        )
        base = start_server(started, work, sim, settings)
        pid = started[-1].pid
        asyncio.run(warm_up(base))
        job_ids = asyncio.run(submit_jobs(base, sim, args.jobs, args.hold, args.spread))
        held_until = time.time() + args.hold - args.spread
        rss_before = rss_now(pid)
        urls = [f"{base}/api/mv/jobs/{job_ids[i % args.jobs]}/events" for i in range(args.subscribers)]
        context = multiprocessing.get_context("spawn")
        pipes, workers = [], []
        for k in range(args.clients):
            parent, child = context.Pipe()
            worker = context.Process(target=client_process, args=(urls[k :: args.clients], child), daemon=True)
            worker.start()
            pipes.append(parent)
            workers.append(worker)
        try:
            for pipe in pipes:
                if not pipe.poll(max(5.0, held_until - time.time())):
                    raise RuntimeError("subscribers did not all connect while the jobs were held; raise --hold")
                pipe.recv()
            connected_at = time.time()
            rss_with = rss_now(pid)
            if connected_at > held_until:
                raise RuntimeError("the jobs were released before all subscribers connected; raise --hold")
            results = [r for pipe in pipes for r in pipe.recv()]
        finally:
            for worker in workers:
                worker.join(5)
                if worker.is_alive():
                    worker.kill()
        asyncio.run(wait_final(base, job_ids, 60))
        expected = asyncio.run(history(base, job_ids))
    return summarize(args, results, expected, rss_before, rss_with, connected_at - (held_until - args.hold))


async def warm_up(base: str) -> None:
    """One job end to end, so first-use costs (client set-up, cached render) are not in the numbers."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(
            f"{base}/api/mv/generate_video", json={"prompt": "bench: fan-out clip", "duration": 4, "seed": 3}
        ) as response:
            job = await response.json()
        async with session.get(base + job["events_url"]) as response:
            async for _ in read_sse(response):
                pass


def summarize(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    expected: dict[str, list[int]],
    rss_before: int,
    rss_with: int,
    connect_seconds: float,
) -> list[tuple[Any, ...]]:
    errors = [r["error"] for r in results if "error" in r]
    delivered = sum(len(r["ids"]) for r in results if "ids" in r)
    wanted = sum(len(expected[r["url"].split("/")[-2]]) for r in results if "ids" in r) + 0
    complete = sum(1 for r in results if "ids" in r and r["ids"] == expected[r["url"].split("/")[-2]])
    latencies = [x * 1000 for r in results if "latencies" in r for x in r["latencies"]]
    per_sub = (rss_with - rss_before) / args.subscribers
    return [
        ("subscribers / jobs / client processes", f"{args.subscribers} / {args.jobs} / {args.clients}", ""),
        (
            "subscribers with every event, in order",
            f"{complete}/{args.subscribers}" + (f" ({len(errors)} errors)" if errors else ""),
            "all",
        ),
        ("events delivered / expected", f"{delivered}/{wanted}", "all"),
        ("all connected, s after first submit", round(connect_seconds, 2), ""),
        ("live events timed", len(latencies), ""),
        ("latency p50 (ms)", percentile(latencies, 50), ""),
        ("latency p99 (ms)", percentile(latencies, 99), "< 50"),
        ("latency max (ms)", max(latencies) if latencies else float("nan"), ""),
        ("server RSS before / with subscribers (MB)", f"{rss_before / 1024:.1f} / {rss_with / 1024:.1f}", ""),
        ("server RSS per subscriber (KB)", per_sub, ""),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_fanout", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--latency", type=float, default=8.0, help="simulated video latency in seconds (default 8)")
    parser.add_argument("--poll", type=float, default=0.25, help="provider poll interval (default 0.25)")
    parser.add_argument(
        "--spread",
        type=float,
        default=1.0,
        help="submit the jobs evenly over this many seconds, so their polls are not in lockstep "
        "(default 1; 0 = all at once, the worst case)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=10.0,
        help="seconds the jobs are held (429 Retry-After) while subscribers connect (default 10)",
    )
    args = parser.parse_args(argv)
    raise_open_files_limit()
    rows = run(args)
    print_table(
        f"SSE fan-out: {args.subscribers} subscribers over {args.jobs} jobs, poll {args.poll:g} s, "
        f"L = {args.latency:g} s, jobs submitted over {args.spread:g} s",
        ["measure", "value", "goal"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
