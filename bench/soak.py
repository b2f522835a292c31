"""Soak: mixed traffic for a bounded time while the simulator injects faults; check mvserver stays healthy.

Workers submit video jobs (followed over SSE, polled, or canceled), fetch finished videos, write scenes and send
invalid requests; a fault task adds a random provider fault (``POST /_sim/faults``) every ``--fault-every`` seconds.
Checks: every 5xx from mvserver is a documented provider-mapped error (``provider_*`` code, error JSON shape); no
job fails with ``internal_error``; after the traffic stops every job reaches a final state, job tasks, wakers and
write locks drain to zero, asyncio tasks and descriptors return to their idle level; RSS growth is reported.

    python -m bench.soak [--seconds 300] [--workers 8] [--max-jobs 600]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    bench_settings,
    print_table,
    proc_status,
    processes,
    raise_open_files_limit,
    read_sse,
    start_server,
    start_simulator,
    workdir,
)

TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)
FAULTS: list[dict[str, Any]] = [
    {"route": "replicate.get", "kind": "status", "status": 500, "times": 3},
    {"route": "replicate.get", "kind": "status", "status": 429, "retry_after": 1},
    {"route": "replicate.get", "kind": "reset", "times": 2},
    {"route": "replicate.get", "kind": "invalid_json"},
    {"route": "replicate.get", "kind": "hang"},
    {"route": "replicate.create", "kind": "status", "status": 503},
    {"route": "replicate.create", "kind": "status", "status": 422},
    {"route": "replicate.create", "kind": "fail_prediction"},
    {"route": "replicate.files.get", "kind": "truncate"},
    {"route": "replicate.files.get", "kind": "status", "status": 404},
    {"route": "gemini.generate", "kind": "status", "status": 500},
    {"route": "gemini.generate", "kind": "status", "status": 429, "retry_after": 2},
    {"route": "gemini.generate", "kind": "invalid_json"},
    {"route": "gemini.generate", "kind": "reset"},
]
VIDEO = {"prompt": "bench: soak clip", "duration": 4}
SCENES = {"idea": "a drummer on rooftops", "character_description": "a tall woman in a red coat", "number_of_scenes": 2}


class Soak:
    """Traffic, tallies and the problems found."""

    def __init__(self, base: str, sim: str, deadline: float, max_jobs: int, rng: random.Random):
        self.base, self.sim, self.deadline, self.max_jobs, self.rng = base, sim, deadline, max_jobs, rng
        self.jobs: list[str] = []
        self.answers: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.final: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []
        self.tracebacks = (0, 0)  # after an "unexpected <provider> failure" log line / elsewhere

    async def check(self, response: aiohttp.ClientResponse, what: str) -> Any:
        """Tally the answer; a 5xx must be a provider-mapped error in the documented shape."""
        body = await response.read()
        self.answers[f"{what} {response.status}"] += 1
        payload = None
        if response.content_type == "application/json":
            payload = await response.json()
        if response.status >= 500:
            code = (payload or {}).get("error", {}).get("code", "") if isinstance(payload, dict) else ""
            if not code.startswith("provider_"):
                self.problems.append(f"{what}: {response.status} {body[:300]!r}")
        return payload

    async def video(self, session: aiohttp.ClientSession) -> None:
        if len(self.jobs) >= self.max_jobs:
            return await self.scenes(session)
        async with session.post(f"{self.base}/api/mv/generate_video", json=VIDEO) as response:
            job = await self.check(response, "generate_video")
        if response.status != 202:
            return
        self.jobs.append(job["job_id"])
        mode = self.rng.choice(["sse", "sse", "poll", "cancel"])
        if mode == "cancel":
            await asyncio.sleep(self.rng.uniform(0, 2))
            async with session.post(f"{self.base}/api/mv/jobs/{job['job_id']}/cancel") as response:
                await self.check(response, "cancel")
        elif mode == "sse":
            async with session.get(self.base + job["events_url"]) as response:
                async for _, event in read_sse(response):
                    if event.get("event") in ("succeeded", "failed", "canceled"):
                        break
        else:
            for _ in range(60):
                async with session.get(self.base + job["status_url"]) as response:
                    status = (await self.check(response, "job_status"))["status"]
                if status in ("succeeded", "failed", "canceled"):
                    break
                await asyncio.sleep(0.5)
        async with session.get(f"{self.base}/api/mv/get_video/{job['job_id']}") as response:
            await self.check(response, "get_video")

    async def scenes(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"{self.base}/api/mv/create_scenes", json=SCENES) as response:
            await self.check(response, "create_scenes")

    async def invalid(self, session: aiohttp.ClientSession) -> None:
        requests = [
            ("GET", "/api/mv/jobs/not-an-id", None),
            ("POST", "/api/mv/generate_video", {"prompt": ""}),
            ("GET", f"/api/mv/get_video/{self.rng.choice(self.jobs or ['x'])}", None),
            ("GET", "/api/mv/health", None),
        ]
        method, path, body = self.rng.choice(requests)
        async with session.request(method, self.base + path, json=body) as response:
            await self.check(response, f"{method} {path.split('/')[3]}")

    async def worker(self) -> None:
        actions = [self.video] * 5 + [self.scenes] * 3 + [self.invalid] * 2
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            while time.monotonic() < self.deadline:
                try:
                    await self.rng.choice(actions)(session)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    self.problems.append(f"client error: {exc!r}")

    async def inject(self, every: float) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            while time.monotonic() < self.deadline:
                fault = self.rng.choice(FAULTS)
                async with session.post(f"{self.sim}/_sim/faults", json=fault) as response:
                    response.raise_for_status()
                self.faults[f"{fault['route']} {fault['kind']} {fault.get('status', '')}".strip()] += 1
                await asyncio.sleep(every)
            async with session.delete(f"{self.sim}/_sim/faults") as response:
                response.raise_for_status()


async def stats(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.get(f"{base}/_bench/stats") as response:
            return await response.json()


async def drain(base: str, timeout: float) -> dict[str, Any]:
    """Wait until no job task is left; the stats then."""
    deadline = time.monotonic() + timeout
    while True:
        current = await stats(base)
        if current["job_tasks"] == 0 or time.monotonic() > deadline:
            return current
        await asyncio.sleep(1)


async def final_statuses(soak: Soak) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for job_id in soak.jobs:
            async with session.get(f"{soak.base}/api/mv/jobs/{job_id}") as response:
                job = await response.json()
            soak.final[job["status"]] += 1
            if job["status"] not in ("succeeded", "failed", "canceled"):
                soak.problems.append(f"job {job_id} still {job['status']} after the drain")
            elif (job.get("error") or {}).get("code") == "internal_error":
                soak.problems.append(f"job {job_id} failed with internal_error: {job['error']}")


async def run(args: argparse.Namespace, base: str, sim: str, pid: int) -> tuple[Soak, dict[str, Any], list[Any]]:
    idle = await stats(base)
    idle["rss_kb"] = proc_status(pid)["VmRSS"]
    soak = Soak(base, sim, time.monotonic() + args.seconds, args.max_jobs, random.Random(args.seed))
    rss: list[tuple[float, int]] = []

    async def sample() -> None:
        started = time.monotonic()
        while time.monotonic() < soak.deadline:
            rss.append((time.monotonic() - started, proc_status(pid)["VmRSS"]))
            await asyncio.sleep(5)

    await asyncio.gather(sample(), soak.inject(args.fault_every), *(soak.worker() for _ in range(args.workers)))
    after = await drain(base, 90)
    await final_statuses(soak)
    after["rss_kb"] = proc_status(pid)["VmRSS"]
    return soak, {"idle": idle, "after": after}, rss


def report(args: argparse.Namespace, soak: Soak, stats_: dict[str, Any], rss: list[Any]) -> bool:
    idle, after = stats_["idle"], stats_["after"]
    if after["job_tasks"] or after["wakers"] or after["write_locks"]:
        soak.problems.append(f"left after the drain: {after}")
    files = idle["fds"].get("file", 0), after["fds"].get("file", 0)
    if after["asyncio_tasks"] > idle["asyncio_tasks"] + 2 or files[1] > files[0]:
        soak.problems.append(f"tasks or open files above idle: idle {idle}, after {after}")
    quarter = max(1, len(rss) // 4)
    early = sorted(v for _, v in rss[:quarter])[quarter // 2] / 1024
    late = sorted(v for _, v in rss[-quarter:])[quarter // 2] / 1024
    fivexx = sum(n for key, n in soak.answers.items() if key.rsplit(" ", 1)[1].startswith("5"))
    rows = [
        ("duration / workers / seed", f"{args.seconds:g} s / {args.workers} / {args.seed}", ""),
        ("requests answered", sum(soak.answers.values()), ""),
        ("5xx answers (all provider_*)", fivexx, "only provider_*"),
        ("faults injected", sum(soak.faults.values()), ""),
        ("jobs: " + ", ".join(f"{k} {v}" for k, v in sorted(soak.final.items())), len(soak.jobs), "all final"),
        (
            "job tasks / wakers / write locks after drain",
            f"{after['job_tasks']} / {after['wakers']} / {after['write_locks']}",
            "0 / 0 / 0",
        ),
        ("asyncio tasks idle -> after", f"{idle['asyncio_tasks']} -> {after['asyncio_tasks']}", "<= idle + 2"),
        ("open files idle -> after", f"{files[0]} -> {files[1]}", "<= idle"),
        (
            "sockets idle -> after (kept-alive provider connections)",
            f"{idle['fds'].get('socket', 0)} -> {after['fds'].get('socket', 0)}",
            "",
        ),
        (
            "server log: 'unexpected provider failure' tracebacks / other tracebacks",
            f"{soak.tracebacks[0]} / {soak.tracebacks[1]}",
            "- / 0",
        ),
        (
            "RSS idle / first-quarter median / last-quarter median / end (MiB)",
            f"{idle['rss_kb'] / 1024:.1f} / {early:.1f} / {late:.1f} / {after['rss_kb'] / 1024:.1f}",
            "stable",
        ),
        ("RSS growth per job, late - early (KiB)", (late - early) * 1024 / max(1, len(soak.jobs)), ""),
        ("problems", len(soak.problems), "0"),
    ]
    print_table(
        f"Soak: {args.seconds:g} s of mixed traffic with a provider fault every {args.fault_every:g} s",
        ["measure", "value", "goal"],
        rows,
    )
    print("answers:", dict(sorted(soak.answers.items())))
    print("faults:", dict(sorted(soak.faults.items())))
    for problem in soak.problems[:20]:
        print("PROBLEM:", problem)
    return not soak.problems


def count_tracebacks(log: str) -> tuple[int, int]:
    """Tracebacks logged right after "unexpected <provider> failure" (a provider answer the SDK could not parse,
    mapped to 502 provider_error), and all others."""
    lines = log.splitlines()
    provider = sum(
        1
        for i, line in enumerate(lines)
        if line.startswith("Traceback") and i and "unexpected" in lines[i - 1] and "failure" in lines[i - 1]
    )
    return provider, sum(1 for line in lines if line.startswith("Traceback")) - provider


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="traffic duration (default 300)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent client loops (default 8)")
    parser.add_argument("--max-jobs", type=int, default=600, help="stop submitting video jobs after this many")
    parser.add_argument("--fault-every", type=float, default=2.0, help="seconds between injected faults (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    raise_open_files_limit()
    work = workdir("soak")
    with processes() as started:
        sim = start_simulator(started, work, video_latency=2.0, image_latency=0.2, scenes_latency=0.0)
        settings = bench_settings(
            work,
            poll_interval_seconds=0.25,
            request_timeout_seconds=5,
            timeout_seconds=60,
            retry_attempts=3,
            retry_initial_delay_seconds=0.1,
            retry_max_delay_seconds=2.0,
            max_concurrent=50,
        )
        base = start_server(started, work, sim, settings, stats=True)
        soak, stats_, rss = asyncio.run(run(args, base, sim, started[-1].pid))
        server_log = started[-1].tail(200_000)
    soak.tracebacks = count_tracebacks(server_log)
    if soak.tracebacks[1]:
        soak.problems.append(f"{soak.tracebacks[1]} unexplained traceback(s) in the server log")
    return 0 if report(args, soak, stats_, rss) else 1


if __name__ == "__main__":
    sys.exit(main())
