"""Concurrency: N video jobs submitted at once, simulated provider latency L; report wall time / L.

mvserver is measured from the first submit to the last ``succeeded`` event (each job watched over SSE). The naive
baseline (``bench/naive_server.py``: sync client, ``time.sleep`` poll loop inside the handler) serves one request
at a time, so it costs about N x L: it is run in full only when N x L fits ``--baseline-budget``; otherwise it runs
for ``--baseline-cap`` seconds and the total is extrapolated from the jobs that finished (labelled as such).
With ``--webhooks`` a second mvserver, whose predictions push Replicate webhooks to it (safety poll 30 s), runs the
same job counts after the polling one, in the same run; CPU per job is compared. Events per job counts what each
job's stream carried (a webhook job: one ``progress`` event per delivery applied). ``--provider-logs``: the jobs ask
for the provider's log lines (with webhooks, Replicate's ``logs`` deliveries every 500 ms), as every job did before
that option existed.

    python -m bench.concurrency [--n 50 200] [--latency 5] [--webhooks] [--provider-logs] [--baseline-budget 300]
        [--baseline-cap 30]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    print_table,
    processes,
    raise_open_files_limit,
    read_sse,
    start_server,
    start_simulator,
    wait_http,
    workdir,
)

BODY = {"prompt": "bench: a drummer on a rooftop at dusk", "duration": 4, "seed": 7}
FINAL = {"succeeded", "failed", "canceled"}
NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30)


@dataclass
class Run:
    server: str
    n: int
    wall: float  # seconds from the first submit to the last success (extrapolated when capped)
    succeeded: int
    cpu: float  # CPU seconds of the server process during the run
    sim_cpu: float  # CPU seconds of the simulator process during the run
    how: str
    events: int = 0  # events the jobs' streams carried (mvserver)


async def watch_job(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> tuple[str, float, int]:
    """Submit one job and follow its events to the end; (final status, time it was received, events received)."""
    async with session.post(f"{base}/api/mv/generate_video", json=body) as response:
        if response.status != 202:
            return f"http {response.status}", time.time(), 0
        job = await response.json()
    # with webhooks on, the server's public base URL makes its links absolute
    events = 0
    async with session.get(urllib.parse.urljoin(base, job["events_url"])) as response:
        async for received, event in read_sse(response):
            events += 1
            if event.get("event") in FINAL:
                return event["event"], received, events
    return "stream ended", time.time(), events


async def run_mvserver(base: str, n: int, pid: int, sim_pid: int, body: dict[str, Any] = BODY) -> Run:
    cpu_before, sim_before = cpu_seconds(pid), cpu_seconds(sim_pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=NO_TIMEOUT) as session:
        started = time.time()
        results = await asyncio.gather(*(watch_job(session, base, body) for _ in range(n)))
    ok = [at for status, at, _ in results if status == "succeeded"]
    wall = max(at for _, at, _ in results) - started
    cpu, sim_cpu = cpu_seconds(pid) - cpu_before, cpu_seconds(sim_pid) - sim_before
    return Run("mvserver", n, wall, len(ok), cpu, sim_cpu, "measured", sum(events for _, _, events in results))


async def naive_request(session: aiohttp.ClientSession, base: str) -> float:
    async with session.post(f"{base}/api/mv/generate_video", json=BODY) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"naive server answered {response.status}")
    return time.time()


async def run_naive(base: str, n: int, cap: float | None, pid: int, sim_pid: int) -> Run:
    cpu_before, sim_before = cpu_seconds(pid), cpu_seconds(sim_pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=NO_TIMEOUT) as session:
        started = time.time()
        tasks = [asyncio.ensure_future(naive_request(session, base)) for _ in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=cap)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finished = sorted(task.result() - started for task in done if not task.exception())
    cpu, sim_cpu = cpu_seconds(pid) - cpu_before, cpu_seconds(sim_pid) - sim_before
    if not pending:
        return Run("naive", n, finished[-1], len(finished), cpu, sim_cpu, "measured")
    if not finished:
        return Run("naive", n, float("nan"), 0, cpu, sim_cpu, f"none finished in {cap:g} s")
    per_job = finished[-1] / len(finished)
    return Run(
        "naive",
        n,
        n * per_job,
        len(finished),
        cpu,
        sim_cpu,
        f"EXTRAPOLATED: {len(finished)}/{n} done in {finished[-1]:.1f} s -> {n} x {per_job:.2f} s",
    )


def start_naive(started: list[Process], work: Path, sim: str, poll: float) -> tuple[str, int]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--output-dir",
        str(work / f"naive-{port}"),
        "--poll-seconds",
        str(poll),
    ]
    env = {**PROVIDER_ENV, "MV_REPLICATE_BASE_URL": f"{sim}/replicate"}
    proc = Process("naive", args, work / f"naive-{port}.log", env=env)
    started.append(proc)
    base = f"http://{HOST}:{port}"
    wait_http(f"{base}/health", proc)
    return base, proc.pid


async def main_async(args: argparse.Namespace) -> list[Run]:
    work = workdir("concurrency")
    runs: list[Run] = []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=args.latency)
        sim_pid = started[-1].pid
        settings = bench_settings(work, poll_interval_seconds=args.poll, max_concurrent=max(args.n))
        for webhooks in ((False,) if not args.skip_polling else ()) + ((True,) if args.webhooks else ()):
            base = start_server(
                started,
                work,
                sim,
                settings,
                webhooks=webhooks,
                extra_env={"MV_OUTPUT_DIR": str(work / f"outputs-{int(webhooks)}")},
            )
            server_pid = started[-1].pid
            body = {**BODY, "provider_logs": True} if args.provider_logs else BODY
            await run_mvserver(
                base, 1, server_pid, sim_pid, body
            )  # warm-up: renders the cached clip, opens connections
            for n in args.n:
                run = await run_mvserver(base, n, server_pid, sim_pid, body)
                run.server = "mvserver webhooks" if webhooks else "mvserver polling"
                runs.append(run)
            started.pop().stop()
        if not args.skip_baseline:
            for n in args.n:
                naive, naive_pid = start_naive(started, work, sim, args.poll)
                await run_naive(naive, 1, None, naive_pid, sim_pid)  # warm-up
                full = n * args.latency <= args.baseline_budget
                runs.append(await run_naive(naive, n, None if full else args.baseline_cap, naive_pid, sim_pid))
                started.pop().stop()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[50, 200], help="job counts (default 50 200)")
    parser.add_argument("--latency", type=float, default=5.0, help="simulated video latency L in seconds (default 5)")
    parser.add_argument(
        "--poll", type=float, default=0.25, help="provider poll interval of both servers (default 0.25)"
    )
    parser.add_argument(
        "--baseline-budget",
        type=float,
        default=300.0,
        help="run the baseline in full when N x L is at most this many seconds (default 300)",
    )
    parser.add_argument(
        "--baseline-cap", type=float, default=30.0, help="otherwise run it this long and extrapolate (default 30)"
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--webhooks", action="store_true", help="also run mvserver with Replicate webhooks on")
    parser.add_argument("--skip-polling", action="store_true", help="with --webhooks: run only the webhooks server")
    parser.add_argument(
        "--provider-logs", action="store_true", help="mvserver jobs ask for the provider's logs (provider_logs)"
    )
    args = parser.parse_args(argv)
    raise_open_files_limit()
    runs = asyncio.run(main_async(args))
    rows = [
        (
            r.server,
            r.n,
            args.latency,
            r.wall,
            r.wall / args.latency,
            f"{r.succeeded}/{r.n}",
            r.cpu,
            1000 * r.cpu / r.n,
            r.sim_cpu,
            r.events / r.n if r.events else "",
            r.how,
        )
        for r in runs
    ]
    print_table(
        f"Concurrency: N jobs at once, simulated latency L = {args.latency:g} s, poll {args.poll:g} s "
        "(goal: mvserver wall/L <= 1.2)",
        [
            "server",
            "N",
            "L (s)",
            "wall (s)",
            "wall / L",
            "succeeded",
            "server CPU (s)",
            "CPU/job (ms)",
            "sim CPU (s)",
            "events/job",
            "how",
        ],
        rows,
    )
    return 0 if all(r.succeeded == r.n for r in runs if r.server.startswith("mvserver")) else 1


if __name__ == "__main__":
    sys.exit(main())
