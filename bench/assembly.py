"""Assembly: 12 sandbox clips of 8 s and a 96 s song joined into one MP4 with ``mvserver.media.assemble.assemble``.

Measured in one run, on the same files: cut-only assembly (whole clips with matching codec parameters, so the
video is stream-copied) twice, as before the song's AAC copy existed (the song encoded in the final run) and with
the copy made at upload (its packets copied, only the faded last second encoded), with what making the copy costs
(once per song, at upload); crossfade assembly (everything decoded and encoded again), and
the full re-encode a MoviePy-style port does (decode every clip and encode the whole video again): here one ffmpeg
``concat`` filter re-encode at libx264's default preset, which is cheaper than MoviePy's Python frame pipe, so the
speed-up it shows is a lower bound. Peak RSS growth of this process (which runs the asyncio side) is sampled every
5 ms during each assembly; ffmpeg's own peak (a separate process) is read from ``getrusage`` of the children.

Then the job engine part: mvserver (file job store) and the provider simulator, each in its own process on
127.0.0.1, run a crossfade assembly job of the same length while other video jobs stream their progress over SSE
to this process; the delay of each of their events (receipt time minus the event's ``event_time``) is measured
with and without the assembly running.

``--worst`` measures instead the memory of the largest requests the settings accept (``settings/media.yaml``,
``projects.yaml``): the most clips (``assembly_clips_max``), crossfaded, every other clip of another aspect ratio
(letterboxed), the clips' audio mixed under a song; and the most clips one filter graph may decode at once
(``graph_clips_max`` clips joined by a crossfade longer than half of each). Each runs in a fresh process with the
ffmpeg limits of the settings, so ``getrusage(RUSAGE_CHILDREN)`` gives the peak RSS of its largest ffmpeg; the
private memory the limit counts (``VmData``) is sampled from /proc. ``--height 1080`` scales the clips first.

    python -m bench.assembly [--clips 12] [--seconds 8] [--repeat 3] [--sse-jobs 6] [--sse-only | --no-sse]
    python -m bench.assembly --worst [--height 360|720|1080] [--worst-clips N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    RssSampler,
    bench_settings,
    percentile,
    print_table,
    proc_status,
    processes,
    read_sse,
    start_server,
    start_simulator,
    workdir,
)
from mvserver.core.artefacts import temp_path
from mvserver.core.config import EnvSettings, load_config
from mvserver.media.assemble import AssemblyResult, Clip, assemble
from mvserver.media.probe import MediaInfo, probe
from mvserver.media.run import ffmpeg_exe, run_ffmpeg
from mvserver.media.song import SongCopy, encode_song_copies
from mvserver.sandbox.render import render_video


async def render_clips(directory: Path, count: int, seconds: float) -> list[Path]:
    """Sandbox clips with audio, two renders at a time (the machine has few cores)."""
    gate = asyncio.Semaphore(2)
    paths = [directory / f"clip{i:02d}.mp4" for i in range(count)]

    async def one(i: int, path: Path) -> None:
        async with gate:
            await render_video(path, prompt=f"bench scene {i + 1}: the singer walks through the rain", duration=seconds)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(paths)))
    return paths


async def make_song(path: Path, seconds: float) -> Path:
    await run_ffmpeg(
        [
            "-f",
            "lavfi",
            "-i",
            f"sine=f=220:d={seconds}:r=44100",
            "-f",
            "lavfi",
            "-i",
            f"sine=f=330:d={seconds}:r=44100",
            "-filter_complex",
            "amix=inputs=2",
            "-ac",
            "2",
            "-b:a",
            "192k",
            "-y",
            str(path),
        ]
    )
    return path


async def baseline(clips: list[Path], song: Path, out: Path, total: float) -> None:
    """Decode everything and encode it all again in one pass, as a MoviePy-style port does."""
    inputs = [arg for clip in clips for arg in ("-i", str(clip))]
    graph = "".join(f"[{i}:v]" for i in range(len(clips))) + f"concat=n={len(clips)}:v=1:a=0[v]"
    await run_ffmpeg(
        [
            *inputs,
            "-i",
            str(song),
            "-filter_complex",
            graph,
            "-map",
            "[v]",
            "-map",
            f"{len(clips)}:a",
            "-c:v",
            "libx264",
            "-preset",
            "medium",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "192k",
            "-t",
            f"{total:.3f}",
            "-movflags",
            "+faststart",
            "-y",
            str(out),
        ],
        duration=total,
    )


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Timing:
    wall: list[float]  # seconds per run
    cpu: float  # ffmpeg CPU seconds per run (user + sys of the finished children), robust to a busy machine
    rss_growth_mib: float  # peak RSS growth of this process over the runs
    result: object

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


async def timed(run: Callable[[], Awaitable[object]], repeat: int) -> Timing:
    """Run ``repeat`` times, sampling this process's RSS every 5 ms."""
    before = proc_status(os.getpid())["VmRSS"]
    cpu_before = children_cpu()
    times, result = [], None
    with RssSampler(os.getpid(), 0.005) as sampler:
        for _ in range(repeat):
            started = time.perf_counter()
            result = await run()
            times.append(time.perf_counter() - started)
    return Timing(times, (children_cpu() - cpu_before) / repeat, max(0, sampler.peak_kb - before) / 1024, result)


async def video_copy_only(clips: list[Path], out: Path) -> None:
    """The video part of a cut-only assembly alone: the concat demuxer copying every clip, no audio."""
    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"file '{clip}'\n" for clip in clips))
    await run_ffmpeg(
        [
            "-f",
            "concat",
            "-safe",
            "0",
            "-i",
            str(listing),
            "-map",
            "0:v",
            "-c",
            "copy",
            "-movflags",
            "+faststart",
            "-y",
            str(out),
        ]
    )


async def bench(args: argparse.Namespace) -> int:
    work = workdir("assembly")
    started = time.perf_counter()
    clips = await render_clips(work, args.clips, args.seconds)
    total = args.clips * args.seconds
    song = await make_song(work / "song.mp3", total)
    print(
        f"rendered {args.clips} clips of {args.seconds:g} s and a {total:g} s song in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    edit = [Clip(path) for path in clips]

    aac, preview = work / "song.aac.m4a", work / "song.preview.mp3"
    copies = await timed(lambda: encode_song_copies(song, aac, preview, temp_name=temp_path, duration=total), 1)
    song_copy = SongCopy(aac, total)
    load_before = os.getloadavg()
    encoded = await timed(lambda: assemble(edit, work / "cut-encoded.mp4", temp_name=temp_path, song=song), args.repeat)
    cut = await timed(
        lambda: assemble(edit, work / "cut.mp4", temp_name=temp_path, song=song, song_copy=song_copy), args.repeat
    )
    video_only = await timed(lambda: video_copy_only(clips, work / "video-only.mp4"), args.repeat)
    xfade = await timed(
        lambda: assemble(
            edit, work / "xfade.mp4", temp_name=temp_path, song=song, transition="crossfade", crossfade_seconds=0.5
        ),
        1,
    )
    base = await timed(lambda: baseline(clips, song, work / "baseline.mp4", total), 1)
    load_after = os.getloadavg()
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    cut_info = await probe(work / "cut.mp4")
    encoded_info = await probe(work / "cut-encoded.mp4")
    xfade_info = await probe(work / "xfade.mp4")
    base_info = await probe(work / "baseline.mp4")
    expected_xfade = total - (args.clips - 1) * 0.5
    assembled, crossfaded, before = cut.result, xfade.result, encoded.result
    assert isinstance(assembled, AssemblyResult) and isinstance(crossfaded, AssemblyResult)
    assert isinstance(before, AssemblyResult)

    def streams(info: MediaInfo) -> str:
        v, a = info.first_video, info.first_audio
        return f"{v.codec if v else '-'} + {a.codec if a else '-'}, {info.duration:.2f} s"

    def runs(timing: Timing) -> str:
        return f"{timing.median:.2f} ({', '.join(f'{t:.2f}' for t in timing.wall)}); ffmpeg CPU {timing.cpu:.2f}"

    rows = [
        (
            "load average (1 min) before / after the measures",
            f"{load_before[0]:.1f} / {load_after[0]:.1f}",
            f"report ({os.cpu_count()} CPUs)",
        ),
        ("the song's AAC + preview copies (once, at upload): wall s; ffmpeg CPU s", runs(copies), "report"),
        ("cut-only, song encoded (before): wall s, median (runs); ffmpeg CPU s", runs(encoded), "report"),
        ("cut-only, song's AAC copied (after): wall s, median (runs); ffmpeg CPU s", runs(cut), "< 0.5"),
        ("  audio copied / encoded, before and after", f"{before.audio} / {assembled.audio}", "encoded / copied"),
        ("  of which the video concat copy alone", runs(video_only), "report"),
        (
            "cut-only: clips stream-copied / re-encoded",
            f"{len(assembled.copied)} / {len(assembled.reencoded)}",
            f"{args.clips} / 0",
        ),
        (
            "cut-only: output, before / after",
            f"{streams(encoded_info)} / {streams(cut_info)}",
            f"h264 + aac, {total:g} s",
        ),
        ("crossfade 0.5 s: wall s; ffmpeg CPU s", runs(xfade), "report"),
        ("crossfade: output", streams(xfade_info), f"h264 + aac, {expected_xfade:g} s"),
        ("full re-encode baseline: wall s; ffmpeg CPU s", runs(base), "report"),
        ("baseline: output", streams(base_info), f"h264 + aac, {total:g} s"),
        (
            "speed-up vs baseline, before: wall / ffmpeg CPU",
            f"{base.median / encoded.median:.1f}x / {base.cpu / encoded.cpu:.1f}x",
            "report",
        ),
        (
            "speed-up vs baseline, after: wall / ffmpeg CPU",
            f"{base.median / cut.median:.1f}x / {base.cpu / cut.cpu:.1f}x",
            ">= 10x",
        ),
        (
            "peak RSS growth of this process, cut / crossfade / baseline (MiB)",
            f"{cut.rss_growth_mib:.1f} / {xfade.rss_growth_mib:.1f} / {base.rss_growth_mib:.1f}",
            "< 64",
        ),
        ("peak RSS of the largest ffmpeg child (MiB)", children_peak, "report"),
    ]
    print_table(
        f"Assembly: {args.clips} sandbox clips x {args.seconds:g} s + a {total:g} s song",
        ["measure", "value", "goal"],
        rows,
    )
    ok = (
        len(assembled.copied) == args.clips
        and abs(cut_info.duration - total) <= 0.1
        and assembled.audio == "copied"
        and abs(encoded_info.duration - total) <= 0.1
        and abs(xfade_info.duration - expected_xfade) <= 0.1
        and abs(crossfaded.duration - expected_xfade) <= 0.01
    )
    return 0 if ok else 1


async def _wait(session: aiohttp.ClientSession, base: str, job_id: str, timeout: float) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            async with session.get(f"{base}/api/mv/jobs/{job_id}") as response:
                state = await response.json()
            if state["status"] in ("succeeded", "failed", "canceled"):
                return state
            await asyncio.sleep(0.1)


async def _video_jobs(session: aiohttp.ClientSession, base: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        async with session.post(
            f"{base}/api/mv/generate_video", json={"prompt": f"bench scene {i}: the singer in the rain", "duration": 8}
        ) as response:
            assert response.status == 202, await response.text()
            ids.append((await response.json())["job_id"])
    return ids


async def _event_delays(session: aiohttp.ClientSession, base: str, job_id: str, delays: list[float]) -> None:
    """Follow one job's events to its end; record how long each event written after the subscription took from
    its write to this client (events replayed from before the subscription are not counted)."""
    subscribed = time.time()
    async with session.get(f"{base}/api/mv/jobs/{job_id}/events") as response:
        async for received, event in read_sse(response):
            written = (event.get("data") or {}).get("event_time")
            if written is not None and written >= subscribed:
                delays.append((received - written) * 1000)
            if event.get("event") in ("succeeded", "failed", "canceled"):
                return


async def _follow_others(session: aiohttp.ClientSession, base: str, count: int) -> list[float]:
    delays: list[float] = []
    ids = await _video_jobs(session, base, count)
    async with asyncio.timeout(300):
        await asyncio.gather(*(_event_delays(session, base, job_id, delays) for job_id in ids))
    return delays


async def sse_bench(args: argparse.Namespace) -> list[tuple[object, ...]]:
    """SSE delays of other jobs' events while an assembly job runs, and without it (same app, same load)."""
    work = workdir("assembly-sse")
    settings = bench_settings(work, poll_interval_seconds=0.2)
    with processes() as started:
        sim = start_simulator(started, work, video_latency=8.0)
        base = start_server(started, work, sim, settings)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            inputs = await _video_jobs(session, base, 2)
            for job_id in inputs:
                assert (await _wait(session, base, job_id, 300))["status"] == "succeeded"
            song = await make_song(work / "song.mp3", args.clips * args.seconds)
            async with session.post(
                f"{base}/api/mv/upload_audio", data=song.read_bytes(), headers={"Content-Type": "audio/mpeg"}
            ) as response:
                assert response.status == 201, await response.text()
                audio_id = (await response.json())["audio_id"]
            idle = await _follow_others(session, base, args.sse_jobs)
            body = {
                "clips": [{"job_id": inputs[i % 2]} for i in range(args.clips)],
                "audio_id": audio_id,
                "transition": "crossfade",
                "crossfade_seconds": 0.5,
                "clip_audio": "mix",
            }
            async with session.post(f"{base}/api/mv/assemble", json=body) as response:
                assert response.status == 202, await response.text()
                assembly_id = (await response.json())["job_id"]
            busy_started = time.perf_counter()
            busy = await _follow_others(session, base, args.sse_jobs)
            others_done = time.perf_counter() - busy_started
            state = await _wait(session, base, assembly_id, 600)
            assembly_seconds = state["finished_at"] - state["started_at"]
    return [
        (
            "assembly job (crossfade, mixed audio): status, run s",
            f"{state['status']}, {assembly_seconds:.1f}",
            "report",
        ),
        ("other jobs' events followed while it ran: count, s", f"{len(busy)} in {others_done:.1f}", "report"),
        (
            "SSE event delay of other jobs, idle: p50 / p99 / max ms",
            f"{percentile(idle, 50):.1f} / {percentile(idle, 99):.1f} / {max(idle):.1f}",
            "report",
        ),
        (
            "SSE event delay of other jobs, assembly running: p50 / p99 / max ms",
            f"{percentile(busy, 50):.1f} / {percentile(busy, 99):.1f} / {max(busy):.1f}",
            "p99 < 50",
        ),
    ]


# -- the largest accepted requests: peak memory of their ffmpeg ----------------------------------------------------

WORST_RUN = """
import asyncio, json, resource, sys, time
from pathlib import Path
from mvserver.core.artefacts import temp_path
from mvserver.media.assemble import Clip, assemble
from mvserver.media.limits import FfmpegLimits
spec = json.loads(sys.argv[1])
clips = [Clip(Path(p)) for p in spec["clips"]]
started = time.perf_counter()
result = asyncio.run(assemble(
    clips, Path(spec["out"]), temp_name=temp_path, song=Path(spec["song"]), transition="crossfade",
    crossfade_seconds=spec["crossfade"], clip_audio="mix", fit="letterbox", limits=FfmpegLimits(**spec["limits"]),
    graph_clips_max=spec["graph_clips_max"]))
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": time.perf_counter() - started, "cpu": usage.ru_utime + usage.ru_stime,
                  "maxrss_kib": usage.ru_maxrss, "seconds": result.duration}))
"""


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _run_worst(spec: dict, interval: float = 0.05) -> dict:
    """One assembly in a fresh process; the peak VmData of its ffmpeg children sampled meanwhile."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", WORST_RUN, json.dumps(spec)], env=env, stdout=subprocess.PIPE)
    peak_data = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_data
        while not done.is_set():
            for pid in _descendants(proc.pid):
                try:
                    peak_data = max(peak_data, proc_status(pid).get("VmData", 0))
                except (OSError, KeyError):
                    pass
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"the assembly failed (exit {proc.returncode})")
    return {**json.loads(out), "vmdata_kib": peak_data}


async def _scaled(path: Path, height: int) -> Path:
    """The clip re-encoded at ``height`` lines (the short side), with its audio."""
    if height == 360:
        return path
    out = path.with_name(f"{path.stem}-{height}.mp4")
    info = await probe(path)
    video = info.first_video
    assert video is not None
    size = f"-2:{height}" if video.width >= video.height else f"{height}:-2"
    await run_ffmpeg(
        [
            "-i",
            str(path),
            "-vf",
            f"scale={size}",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-c:a",
            "copy",
            "-y",
            str(out),
        ],
        duration=8.0,
    )
    return out


async def worst(args: argparse.Namespace) -> int:
    config = load_config(EnvSettings())
    ffmpeg, caps = config.media.ffmpeg, config.media.assembly
    limits = ffmpeg.model_dump(exclude={"concurrency"})
    count = args.worst_clips or config.projects.limits.assembly_clips_max
    work = workdir("assembly-worst")
    wide, tall = work / "wide.mp4", work / "tall.mp4"
    await asyncio.gather(
        render_video(wide, prompt="the widest request: a wide clip", duration=8.0),
        render_video(tall, prompt="the widest request: a tall clip", duration=8.0, aspect_ratio="9:16"),
    )
    wide, tall = await _scaled(wide, args.height), await _scaled(tall, args.height)
    song = await make_song(work / "song.mp3", count * 8.0)
    cases = [
        (
            f"{count} clips{' (the most)' if count == config.projects.limits.assembly_clips_max else ''}, crossfade "
            "0.5 s, every other one letterboxed, clip audio mixed under a song",
            [wide, tall] * (count // 2) + [wide] * (count % 2),
            0.5,
        ),
        (
            f"{caps.graph_clips_max} clips in one filter graph (the most): crossfade 4.5 s over 8 s clips",
            [wide, tall] * (caps.graph_clips_max // 2) + [wide] * (caps.graph_clips_max % 2),
            4.5,
        ),
    ]
    rows = []
    binary_mib = os.path.getsize(ffmpeg_exe()) / 2**20
    ok = True
    for name, clips, crossfade in cases:
        spec = {
            "clips": [str(c) for c in clips],
            "out": str(work / "worst.mp4"),
            "song": str(song),
            "crossfade": crossfade,
            "limits": limits,
            "graph_clips_max": caps.graph_clips_max,
        }
        measured = await asyncio.to_thread(_run_worst, spec)
        rss, data = measured["maxrss_kib"] / 1024, measured["vmdata_kib"] / 1024
        ok = ok and data <= ffmpeg.memory_mb and rss <= ffmpeg.memory_mb + binary_mib
        rows.append(
            (
                name,
                f"{measured['seconds']:.1f}",
                f"{measured['wall']:.1f}",
                f"{measured['cpu']:.1f}",
                f"{rss:.0f}",
                f"{data:.0f}",
            )
        )
    print_table(
        f"The largest accepted assembly requests, {args.height}p clips of 8 s: memory of the largest ffmpeg "
        f"(limit: memory_mb {ffmpeg.memory_mb} MiB of VmData + the {binary_mib:.0f} MiB binary; threads "
        f"{ffmpeg.threads}; at most {ffmpeg.concurrency} such runs per node)",
        ["request", "output s", "wall s", "ffmpeg CPU s", "peak RSS MiB", "peak VmData MiB"],
        rows,
    )
    return 0 if ok else 1


async def bench_all(args: argparse.Namespace) -> int:
    if args.worst:
        return await worst(args)
    code = 0 if args.sse_only else await bench(args)
    if args.no_sse:
        return code
    rows = await sse_bench(args)
    print_table(
        f"SSE of {args.sse_jobs} other jobs while an assembly job of {args.clips} x {args.seconds:g} s runs",
        ["measure", "value", "goal"],
        rows,
    )
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.assembly", description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=12, help="number of clips (default 12)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each clip (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="cut-only runs; the median is reported (default 3)")
    parser.add_argument("--sse-jobs", type=int, default=6, help="other video jobs followed over SSE (default 6)")
    parser.add_argument("--sse-only", action="store_true", help="only the job engine part (SSE delays)")
    parser.add_argument("--no-sse", action="store_true", help="only the assembly part (no job engine)")
    parser.add_argument(
        "--worst", action="store_true", help="only the peak memory of the largest requests the settings accept"
    )
    parser.add_argument(
        "--height",
        type=int,
        default=360,
        choices=(360, 720, 1080),
        help="--worst: clip height (the sandbox renders 360; others are scaled first)",
    )
    parser.add_argument(
        "--worst-clips",
        type=int,
        default=0,
        help="--worst: clips of the first request (default: projects.limits.assembly_clips_max)",
    )
    return asyncio.run(bench_all(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
