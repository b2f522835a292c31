"""Download memory: mvserver fetches a 500 MB simulated video from the provider, then serves it with get_video.

The simulator pads its MP4 with a ``free`` box to the size asked for. The server's VmRSS is sampled every 5 ms and
VmHWM read from /proc/<pid>/status before and after; the client reads the video in 1 MiB chunks and discards them.

    python -m bench.download_memory [--size-mb 500]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RssSampler,
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

MB = 1024 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)


def allow_output_size(settings: Path, size: int) -> Path:
    """The settings with ``limits.output_max_bytes`` raised to ``size`` (the default cap, 256 MiB, refuses 500 MiB)."""
    path = settings / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["limits"]["output_max_bytes"] = max(videos["limits"].get("output_max_bytes", 0), size)
    path.write_text(yaml.safe_dump(videos, sort_keys=False))
    return settings


async def generate(base: str) -> dict[str, Any]:
    """Run one job to its end; the final event's data."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(
            f"{base}/api/mv/generate_video", json={"prompt": "bench: big clip", "duration": 4}
        ) as r:
            job = await r.json()
        async with session.get(base + job["events_url"]) as response:
            final = None
            async for _, event in read_sse(response):
                final = event
        return final["data"] if final else {}


async def fetch(base: str, job_id: str) -> tuple[int, float]:
    """Read the video, discarding it; (bytes, seconds)."""
    size = 0
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        started = time.perf_counter()
        async with session.get(f"{base}/api/mv/get_video/{job_id}") as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(MB):
                size += len(chunk)
        return size, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.download_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="video size in MiB (default 500)")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    work = workdir("download")
    with processes() as started:
        sim = start_simulator(started, work, video_latency=1.0, pad_bytes=args.size_mb * MB)
        settings = allow_output_size(bench_settings(work, poll_interval_seconds=0.25), args.size_mb * MB + MB)
        base = start_server(started, work, sim, settings)
        pid = started[-1].pid
        time.sleep(1.0)
        before = proc_status(pid)
        with RssSampler(pid, 0.005) as download_peak:
            final = asyncio.run(generate(base))
        after_download = proc_status(pid)
        with RssSampler(pid, 0.005) as serve_peak:
            served, seconds = asyncio.run(fetch(base, final["job_id"]))
        after = proc_status(pid)
    stored = final.get("video_bytes") or 0
    growth = max(download_peak.peak_kb, serve_peak.peak_kb) - before["VmRSS"]
    hwm_growth = after["VmHWM"] - before["VmRSS"]
    rows = [
        ("job status / video bytes stored", f"{final.get('status')} / {stored}", ""),
        ("bytes served by get_video", f"{served} in {seconds:.2f} s ({served / MB / seconds:.0f} MiB/s)", "= stored"),
        ("server VmRSS before (MiB)", before["VmRSS"] / 1024, ""),
        (
            "peak VmRSS while downloading (MiB), samples",
            f"{download_peak.peak_kb / 1024:.1f}, {download_peak.samples}",
            "",
        ),
        ("peak VmRSS while serving (MiB), samples", f"{serve_peak.peak_kb / 1024:.1f}, {serve_peak.samples}", ""),
        (
            "VmHWM before / after download / after serving (MiB)",
            f"{before['VmHWM'] / 1024:.1f} / {after_download['VmHWM'] / 1024:.1f} / {after['VmHWM'] / 1024:.1f}",
            "",
        ),
        ("peak RSS growth, sampled (MiB)", growth / 1024, "< 64"),
        ("VmHWM after - VmRSS before (MiB, upper bound)", hwm_growth / 1024, "< 64"),
    ]
    print_table(
        f"Download memory: one {args.size_mb} MiB video, provider download then get_video",
        ["measure", "value", "goal"],
        rows,
    )
    return 0 if final.get("status") == "succeeded" and served == stored else 1


if __name__ == "__main__":
    sys.exit(main())
