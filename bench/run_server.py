"""``python -m bench.run_server --port P [--stats]``: mvserver as ``python -m mvserver`` runs it, without the access log.

Settings and provider endpoints come from the environment (``MV_*``), as for the real command. ``--stats`` adds
``GET /_bench/stats`` (asyncio tasks, jobs by status, descriptors) and ``GET /_bench/timings`` (server-side time of
each request by route, from a first middleware; ``?reset=1`` clears it) for the benchmarks that need them.
``--profile FILE`` runs the server under cProfile and writes its stats to ``FILE`` (pstats) and the top entries by
cumulative and self time (CPU time of the event loop's thread) to ``FILE.txt`` when it stops, with the CPU time
of each thread (``python -m bench.profile_report FILE`` prints them again).
The benchmarks pass it to every server they start when ``MVBENCH_PROFILE`` names a directory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import logging
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mvserver.app import create_app
from mvserver.appkeys import JOBS

TIMINGS = web.AppKey("bench_timings", dict)


@web.middleware
async def timing_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[TIMINGS][name].append(time.perf_counter() - started)


async def stats(request: web.Request) -> web.Response:
    manager = request.app[JOBS]
    store = manager.store
    statuses = collections.Counter(job.status for job in getattr(store, "_active", {}).values())
    return web.json_response(
        {
            "asyncio_tasks": len(asyncio.all_tasks()),
            "job_tasks": len(manager.tasks),
            "jobs": dict(statuses),
            "wakers": len(store._wakers),
            "write_locks": len(getattr(store, "_write_locks", {})),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "fds": dict(collections.Counter(_fd_kind(name) for name in os.listdir("/proc/self/fd"))),
        }
    )


def _fd_kind(name: str) -> str:
    try:
        target = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        return "gone"
    return "file" if target.startswith("/") else target.split(":")[0]


async def timings(request: web.Request) -> web.Response:
    recorded = request.app[TIMINGS]
    payload = {name: list(values) for name, values in recorded.items()}
    if request.query.get("reset"):
        recorded.clear()
    return web.json_response(payload)


def _thread_cpu() -> list[tuple[str, float]]:
    """CPU seconds of each thread of this process (the event loop's, the default executor's, ...)."""
    found = []
    for task in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{task}/stat").read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        found.append((f"{task} {name}", (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", action="store_true", help="add /_bench/stats and /_bench/timings")
    parser.add_argument("--profile", metavar="FILE", help="run under cProfile; write the stats to FILE at exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # as python -m mvserver: no line per provider call
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    app = create_app()
    if args.stats:
        app[TIMINGS] = collections.defaultdict(list)
        app.middlewares.insert(0, timing_middleware)
        app.router.add_get("/_bench/stats", stats)
        app.router.add_get("/_bench/timings", timings)
    # The event loop's thread CPU time, not wall time: on a busy machine wall time mostly measures the others' work.
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    finally:
        if profiler is not None:
            profiler.disable()
            from bench.profile_report import write_profile

            write_profile(profiler, args.profile, threads=_thread_cpu())
    return 0


if __name__ == "__main__":
    sys.exit(main())
