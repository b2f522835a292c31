"""``python -m bench.run_server --port P [--stats]``: mvserver as ``python -m mvserver`` runs it, without the access log.

Settings and provider endpoints come from the environment (``MV_*``), as for the real command. ``--stats`` adds
``GET /_bench/stats`` (asyncio tasks, jobs by status, descriptors) and ``GET /_bench/timings`` (server-side time of
each request by route, from a first middleware; ``?reset=1`` clears it) for the benchmarks that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", action="store_true", help="add /_bench/stats and /_bench/timings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    app = create_app()
    if args.stats:
        app[TIMINGS] = collections.defaultdict(list)
        app.middlewares.insert(0, timing_middleware)
        app.router.add_get("/_bench/stats", stats)
        app.router.add_get("/_bench/timings", timings)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
