"""Object storage: get_video of a large clip by redirect, by proxy and from the local directory, in one run.

Three servers share one simulator (its MP4 padded to ``--size-mb``) and, for the two object-storage ones, one moto S3
server (``python -m moto.server``, its own process). Each server runs one job (the provider download streamed into
its store; peak RSS growth sampled), then serves the clip ``--repeat`` times to a client that follows the redirect
and reads every byte. Reported: wall time per fetch, and the server process's CPU per GiB served (by redirect the
bytes come from the store, so the server's share is the 302 alone).

    python -m bench.object_storage [--size-mb 50] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Process,
    RssSampler,
    bench_settings,
    cpu_seconds,
    free_port,
    print_table,
    proc_status,
    processes,
    start_server,
    start_simulator,
    wait_http,
    workdir,
)
from bench.download_memory import MB, TIMEOUT, allow_output_size, generate

GIB = 1024 * MB
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


def start_moto(started: list[Process], work: Path) -> str:
    """moto's S3 server on a free port (auth off: it checks no signature), with one bucket ``mvbench``."""
    port = free_port()
    proc = Process("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], work / "moto.log")
    started.append(proc)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/", proc)
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/mvbench", method="PUT"), timeout=10):
        pass
    return endpoint


async def fetch(base: str, job_id: str) -> tuple[int, float, int]:
    """Read the clip once, following a redirect; (bytes, seconds, status of the server's own answer)."""
    size = 0
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        started = time.perf_counter()
        async with session.get(f"{base}/api/mv/get_video/{job_id}", allow_redirects=False) as first:
            status = first.status
            url = first.headers["Location"] if status == 302 else None
            if url is None:
                async for chunk in first.content.iter_chunked(MB):
                    size += len(chunk)
        if url is not None:
            async with session.get(url) as response:
                response.raise_for_status()
                async for chunk in response.content.iter_chunked(MB):
                    size += len(chunk)
        return size, time.perf_counter() - started, status


def measure(name: str, base: str, pid: int, repeat: int) -> list[Any]:
    before = proc_status(pid)
    with RssSampler(pid, 0.005) as stored_peak:
        final = asyncio.run(generate(base))
    assert final.get("status") == "succeeded", final
    cpu = cpu_seconds(pid)
    times, served, status = [], 0, 0
    for _ in range(repeat):
        size, seconds, status = asyncio.run(fetch(base, final["job_id"]))
        assert size == final["video_bytes"], (size, final["video_bytes"])
        served += size
        times.append(seconds)
    cpu = cpu_seconds(pid) - cpu
    return [
        name,
        status,
        f"{sum(times) / len(times) * 1000:.0f}",
        f"{served / MB / sum(times):.0f}",
        f"{cpu / (served / GIB):.2f}",
        f"{(stored_peak.peak_kb - before['VmRSS']) / 1024:.1f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.object_storage", description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=50, help="clip size in MiB (default 50)")
    parser.add_argument("--repeat", type=int, default=5, help="fetches per server (default 5)")
    args = parser.parse_args(argv)
    work = workdir("objects")
    rows = []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=1.0, pad_bytes=args.size_mb * MB)
        endpoint = start_moto(started, work)
        settings = allow_output_size(bench_settings(work, poll_interval_seconds=0.25), args.size_mb * MB + MB)
        for name, extra in (
            ("local file", {}),
            ("object store, redirect", {"MV_STORAGE_DELIVERY": "redirect"}),
            ("object store, proxy", {"MV_STORAGE_DELIVERY": "proxy"}),
        ):
            node = work / name.replace(" ", "-").replace(",", "")
            node.mkdir()
            env = dict(extra)
            if extra:
                env.update(CREDENTIALS, MV_STORAGE_URL=f"s3://mvbench/{node.name}", AWS_ENDPOINT_URL=endpoint)
                env["MV_SCRATCH_DIR"] = str(node / "scratch")
            base = start_server(started, node, sim, settings, extra_env=env)
            time.sleep(0.5)
            rows.append(measure(name, base, started[-1].pid, args.repeat))
    print_table(
        f"get_video of a {args.size_mb} MiB clip, {args.repeat} fetches each (client follows the redirect)",
        ["served from", "server answer", "ms per fetch", "MiB/s", "server CPU s per GiB", "RSS growth storing (MiB)"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
