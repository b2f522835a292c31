"""Object storage: the issue's numbers in one run, artefacts in an S3 bucket (moto) against the local directory.

Every part starts its own simulator and servers (``python -m bench.run_server``); the object-storage servers share
one moto S3 server (``python -m moto.server``, its own process, auth off), each under its own prefix and with its
own scratch directory. The load average is printed next to each number (the machine's other work shows there).

- ``serve``: ``get_video`` of a ``--size-mb`` clip (the simulator pads its MP4) from a local file, by redirect and
  by proxy. Each server runs one job (the provider download streamed into its store; peak RSS growth sampled),
  then serves the clip ``--repeat`` times to a client that follows the redirect and reads every byte: wall time
  per fetch and the server process's CPU per GiB served (by redirect the bytes come from the store, so the
  server's share is the 302 alone).
- ``assembly``: ``--clips`` video jobs of ``--seconds`` (the simulator renders each prompt once; both servers get
  the same bytes), then a cut-only assembly job of them, twice, on a local-files server and on an object-storage
  server. The object-storage server makes its clips (and their posters, which fetch each clip into scratch) and is
  then restarted on a fresh scratch directory, as if another node assembled them: the first assembly fetches every
  clip (cold), the second finds them there (warm). Wall time from ``POST /api/mv/assemble`` (whose plan probes the
  clips, so it is the one that fetches them) to ``succeeded``, the job's own run, the bytes fetched into scratch
  (the new files in the directory), and the CPU of the server process and of its finished children (ffmpeg).
- ``memory``: on an object-storage server, a client uploads a ``--song-mb`` WAV song (raw body, streamed from
  disk), then a video job stores a ``--video-mb`` provider output (the simulator pads the MP4; the server streams
  it from the provider into the bucket and cuts its poster before ``succeeded``, as every clip goes). The server's
  peak RSS growth, sampled every 5 ms and from VmHWM (reset with ``clear_refs`` before each step).

    python -m bench.object_storage [--parts serve,assembly,memory] [--size-mb 50] [--repeat 5] [--clips 12]
        [--seconds 8] [--song-mb 50] [--video-mb 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Process,
    RssSampler,
    bench_settings,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    loadavg,
    print_table,
    proc_status,
    processes,
    reset_peak_rss,
    start_server,
    start_simulator,
    wait_http,
    workdir,
)
from bench.download_memory import MB, TIMEOUT, allow_output_size, generate
from mvserver.core.objects import ObjectStorage
from mvserver.media.run import run_ffmpeg

GIB = 1024 * MB
BUCKET = "mvbench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
PARTS = ("serve", "assembly", "memory")
WAV_HEADER = 44
WAV_BYTES_PER_SECOND = 44100 * 2 * 2  # 16-bit stereo at 44.1 kHz


def start_moto(started: list[Process], work: Path) -> str:
    """moto's S3 server on a free port (auth off: it checks no signature), with one bucket ``mvbench``."""
    port = free_port()
    proc = Process("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], work / "moto.log")
    started.append(proc)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/", proc)
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=10):
        pass
    return endpoint


def object_env(endpoint: str, prefix: str, scratch: Path, **extra: str) -> dict[str, str]:
    """The environment of a server whose artefacts are under ``prefix`` in the bench bucket."""
    return {
        **CREDENTIALS,
        "MV_STORAGE_URL": f"s3://{BUCKET}/{prefix}",
        "AWS_ENDPOINT_URL": endpoint,
        "MV_SCRATCH_DIR": str(scratch),
        **extra,
    }


async def object_size(endpoint: str, prefix: str, key: str) -> int | None:
    """The size of a stored object, asked with the server's own client; None when it is absent."""
    storage = ObjectStorage.from_url(f"s3://{BUCKET}/{prefix}", {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    try:
        return (await storage.stat(key)).size
    except FileNotFoundError:
        return None


# -- serve: get_video by redirect, proxy and local file ----------------------------------------------------------


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


def measure_serving(name: str, base: str, pid: int, repeat: int) -> list[Any]:
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
        loadavg(),
    ]


def serve_part(args: argparse.Namespace, work: Path) -> None:
    rows = []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=1.0, pad_bytes=args.size_mb * MB)
        endpoint = start_moto(started, work)
        settings = allow_output_size(bench_settings(work, poll_interval_seconds=0.25), args.size_mb * MB + MB)
        for name, delivery in (
            ("local file", None),
            ("object store, redirect", "redirect"),
            ("object store, proxy", "proxy"),
        ):
            node = work / name.replace(" ", "-").replace(",", "")
            node.mkdir()
            env = (
                {}
                if delivery is None
                else object_env(endpoint, node.name, node / "scratch", MV_STORAGE_DELIVERY=delivery)
            )
            base = start_server(started, node, sim, settings, extra_env=env)
            time.sleep(0.5)
            rows.append(measure_serving(name, base, started[-1].pid, args.repeat))
    print_table(
        f"get_video of a {args.size_mb} MiB clip, {args.repeat} fetches each (client follows the redirect)",
        [
            "served from",
            "server answer",
            "ms per fetch",
            "MiB/s",
            "server CPU s per GiB",
            "RSS growth storing (MiB)",
            "load 1/5/15",
        ],
        rows,
    )


# -- assembly: 12 clips from the object store (scratch cold, warm) and from local files ------------------------


async def wait_job(session: aiohttp.ClientSession, base: str, job_id: str, timeout: float = 300) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            async with session.get(f"{base}/api/mv/jobs/{job_id}") as response:
                state: dict[str, Any] = await response.json()
            if state["status"] in ("succeeded", "failed", "canceled"):
                return state
            await asyncio.sleep(0.1)


async def make_clips(base: str, count: int, seconds: float) -> list[str]:
    """``count`` video jobs (one prompt each, so every server gets the simulator's same renders), to their end."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        ids = []
        for i in range(count):
            body = {"prompt": f"bench scene {i + 1}: the singer walks through the rain", "duration": seconds}
            async with session.post(f"{base}/api/mv/generate_video", json=body) as response:
                assert response.status == 202, await response.text()
                ids.append((await response.json())["job_id"])
        for job_id in ids:
            state = await wait_job(session, base, job_id)
            assert state["status"] == "succeeded", state
        return ids


async def assemble(base: str, clips: list[str]) -> tuple[float, dict[str, Any]]:
    """One cut-only assembly job of ``clips``: (seconds from the POST to its end, its final state)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        started = time.perf_counter()
        body = {"clips": [{"job_id": job_id} for job_id in clips], "transition": "cut"}
        async with session.post(f"{base}/api/mv/assemble", json=body) as response:
            assert response.status == 202, await response.text()
            job_id = (await response.json())["job_id"]
        state = await wait_job(session, base, job_id)
        wall = time.perf_counter() - started
        async with session.get(f"{base}/api/mv/jobs/{job_id}") as response:
            full: dict[str, Any] = await response.json()
        assert state["status"] == "succeeded", state
        return wall, {**full, **state}


def scratch_files(root: Path | None) -> dict[str, int]:
    """The copies in a scratch directory, by name (unfinished downloads and ffmpeg outputs left out)."""
    if root is None or not root.is_dir():
        return {}
    return {
        p.name: p.stat().st_size
        for p in root.iterdir()
        if p.is_file() and p.name != ".lock" and not p.name.endswith(".part") and not p.name.startswith("out-")
    }


def measure_assembly(name: str, base: str, pid: int, clips: list[str], scratch: Path | None) -> list[Any]:
    files_before = scratch_files(scratch)
    cpu, children = cpu_seconds(pid), children_cpu_seconds(pid)
    wall, state = asyncio.run(assemble(base, clips))
    cpu, children = cpu_seconds(pid) - cpu, children_cpu_seconds(pid) - children
    fetched = [size for n, size in scratch_files(scratch).items() if n not in files_before]
    output = [size for size in fetched if size == state["video_bytes"]]  # the assembled video, back for its poster
    clip_bytes = sum(fetched) - sum(output)
    result = (state.get("request") or {}).get("result") or {}
    return [
        name,
        f"{wall:.2f}",
        f"{state['finished_at'] - state['started_at']:.2f}",
        "-" if scratch is None else f"{len(fetched) - len(output)} / {clip_bytes / MB:.1f}",
        "-" if scratch is None else f"{sum(output) / MB:.1f}",
        f"{cpu:.2f}",
        f"{children:.2f}",
        f"{len(result.get('copied', []))} / {result.get('seconds', 0):.1f}",
        loadavg(),
    ]


def assembly_part(args: argparse.Namespace, work: Path) -> None:
    rows = []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=0.5, pad_bytes=int(args.clip_pad_mb * MB))
        endpoint = start_moto(started, work)
        settings = bench_settings(work, poll_interval_seconds=0.25)

        local = work / "assembly-local"
        local.mkdir()
        base = start_server(started, local, sim, settings)
        made = time.perf_counter()
        clips = asyncio.run(make_clips(base, args.clips, args.seconds))
        print(f"{args.clips} clips of {args.seconds:g} s made in {time.perf_counter() - made:.1f} s", flush=True)
        pid = started[-1].pid
        for run in ("first", "second"):
            rows.append(measure_assembly(f"local files, {run} run", base, pid, clips, None))

        node = work / "assembly-objects"
        node.mkdir()
        base = start_server(started, node, sim, settings, extra_env=object_env(endpoint, node.name, node / "made"))
        clips = asyncio.run(make_clips(base, args.clips, args.seconds))
        started[-1].stop()  # the clips were made on "another node": this one starts on a fresh scratch directory
        scratch = node / "scratch"
        base = start_server(started, node, sim, settings, extra_env=object_env(endpoint, node.name, scratch))
        pid = started[-1].pid
        for run in ("scratch cold", "scratch warm"):
            rows.append(measure_assembly(f"object store, {run}", base, pid, clips, scratch))
    print_table(
        f"Assembly job of {args.clips} x {args.seconds:g} s clips (sandbox 360p, padded by {args.clip_pad_mb:g} MiB "
        "each; cut, the clips' audio), twice on each server",
        [
            "clips from",
            "wall s (POST to succeeded)",
            "job run s",
            "clips fetched into scratch (files / MiB)",
            "output fetched back for its poster (MiB)",
            "server CPU s",
            "ffmpeg CPU s",
            "clips copied / output s",
            "load 1/5/15",
        ],
        rows,
    )


# -- memory: a 50 MB song uploaded, a 500 MiB video stored -------------------------------------------------------


@contextlib.contextmanager
def peak_growth(pid: int) -> Iterator[dict[str, float]]:
    """The peak RSS growth of ``pid`` over the block, in MiB: sampled every 5 ms and from VmHWM (reset first)."""
    found: dict[str, float] = {}
    before = proc_status(pid)["VmRSS"]
    reset_peak_rss(pid)
    with RssSampler(pid, 0.005) as sampler:
        yield found
    found["sampled"] = (sampler.peak_kb - before) / 1024
    found["hwm"] = (proc_status(pid)["VmHWM"] - before) / 1024
    found["samples"] = sampler.samples


async def make_wav(path: Path, size: int) -> Path:
    """A 16-bit stereo 44.1 kHz WAV of about ``size`` bytes: two tones, so it is not silence."""
    seconds = (size - WAV_HEADER) / WAV_BYTES_PER_SECOND
    graph = f"sine=f=220:d={seconds:.3f}:r=44100[a];sine=f=330:d={seconds:.3f}:r=44100[b];[a][b]join=inputs=2"
    await run_ffmpeg(["-f", "lavfi", "-i", graph, "-c:a", "pcm_s16le", "-y", str(path)], duration=seconds)
    return path


async def upload_song(base: str, song: Path) -> tuple[float, dict[str, Any]]:
    """POST the song as a raw body streamed from disk; (seconds to the answer, the answer)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        started = time.perf_counter()
        with song.open("rb") as body:
            async with session.post(
                f"{base}/api/mv/upload_audio", data=body, headers={"Content-Type": "audio/wav"}
            ) as response:
                answer: dict[str, Any] = await response.json()
                assert response.status == 201, answer
        return time.perf_counter() - started, answer


async def song_settled(base: str, endpoint: str, prefix: str, audio_id: str, timeout: float = 300) -> dict[str, Any]:
    """Wait until the song's analysis is no longer pending and its AAC copy is in the bucket."""
    from mvserver.audio.songs import aac_copy

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, asyncio.timeout(timeout):
        while True:
            async with session.get(f"{base}/api/mv/songs/{audio_id}") as response:
                song: dict[str, Any] = await response.json()
            copied = await object_size(endpoint, prefix, aac_copy(audio_id))
            if song.get("analysis_status") != "pending" and copied is not None:
                return song
            await asyncio.sleep(0.25)


def memory_row(what: str, size: int, seconds: float, growth: dict[str, float]) -> list[Any]:
    return [
        what,
        f"{size / MB:.1f}",
        f"{seconds:.1f}",
        f"{growth['sampled']:.1f} ({growth['samples']:.0f} samples)",
        f"{growth['hwm']:.1f}",
        loadavg(),
    ]


def memory_part(args: argparse.Namespace, work: Path) -> None:
    song = asyncio.run(make_wav(work / "song.wav", args.song_mb * 1_000_000))
    rows = []
    with processes() as started:
        sim = start_simulator(started, work, video_latency=0.5, pad_bytes=args.video_mb * MB)
        endpoint = start_moto(started, work)
        settings = allow_output_size(bench_settings(work, poll_interval_seconds=0.25), args.video_mb * MB + MB)
        node = work / "memory"
        node.mkdir()
        base = start_server(started, node, sim, settings, extra_env=object_env(endpoint, node.name, node / "scratch"))
        pid = started[-1].pid
        time.sleep(1.0)

        size = song.stat().st_size
        with peak_growth(pid) as with_copies:
            with peak_growth(pid) as upload:
                seconds, answer = asyncio.run(upload_song(base, song))
            settling = time.perf_counter()
            settled = asyncio.run(song_settled(base, endpoint, node.name, answer["audio_id"]))
            settled_after = seconds + time.perf_counter() - settling
        stored = asyncio.run(object_size(endpoint, node.name, f"audio/{answer['audio_id']}.wav"))
        assert stored == size, (stored, size)
        rows.append(memory_row("song upload (WAV, raw body): POST to 201", size, seconds, upload))
        status = settled.get("analysis_status")
        rows.append(
            memory_row(
                f"  and on until its AAC copy and analysis ({status}) are stored", size, settled_after, with_copies
            )
        )

        began = time.perf_counter()
        with peak_growth(pid) as growth:
            final = asyncio.run(generate(base))
        assert final.get("status") == "succeeded", final
        size = final["video_bytes"]
        stored = asyncio.run(object_size(endpoint, node.name, f"videos/{final['job_id']}.mp4"))
        assert stored == size, (stored, size)
        rows.append(
            memory_row(
                "provider video streamed into the bucket (job to succeeded, poster included)",
                size,
                time.perf_counter() - began,
                growth,
            )
        )
    print_table(
        f"Server RSS on object storage: a {args.song_mb} MB song uploaded, a {args.video_mb} MiB video stored",
        ["step", "MiB", "s", "peak RSS growth, sampled (MiB)", "VmHWM growth (MiB)", "load 1/5/15"],
        rows,
    )
    print("goal: < 64 MiB growth", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.object_storage", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts (default {','.join(PARTS)})")
    parser.add_argument("--size-mb", type=int, default=50, help="serve: clip size in MiB (default 50)")
    parser.add_argument("--repeat", type=int, default=5, help="serve: fetches per server (default 5)")
    parser.add_argument("--clips", type=int, default=12, help="assembly: clips (default 12)")
    parser.add_argument("--seconds", type=int, default=8, help="assembly: seconds per clip (default 8)")
    parser.add_argument(
        "--clip-pad-mb",
        type=float,
        default=5.0,
        help="assembly: MiB of MP4 free box the simulator appends to each clip, to the size of an 8 s 720p clip "
        "(default 5)",
    )
    parser.add_argument("--song-mb", type=int, default=50, help="memory: song size in MB (default 50)")
    parser.add_argument("--video-mb", type=int, default=500, help="memory: video size in MiB (default 500)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})")
    print(f"{os.cpu_count()} CPUs; load average at the start: {loadavg()}", flush=True)
    for part in parts:
        work = workdir(f"objects-{part}")
        {"serve": serve_part, "assembly": assembly_part, "memory": memory_part}[part](args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
