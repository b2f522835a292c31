"""Assembly: 12 sandbox clips of 8 s and a 96 s song joined into one MP4 with ``mvserver.media.assemble``.

Measured in one run, on the same files: cut-only assembly (whole clips with matching codec parameters, so the
video is stream-copied; only the song is encoded), crossfade assembly (everything decoded and encoded again), and
the full re-encode a MoviePy-style port does (decode every clip and encode the whole video again): here one ffmpeg
``concat`` filter re-encode at libx264's default preset, which is cheaper than MoviePy's Python frame pipe, so the
speed-up it shows is a lower bound. Peak RSS growth of this process (which runs the asyncio side) is sampled every
5 ms during each assembly; ffmpeg's own peak (a separate process) is read from ``getrusage`` of the children.

    python -m bench.assembly [--clips 12] [--seconds 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RssSampler, print_table, proc_status, workdir
from mvserver import media
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
    await media.run_ffmpeg(["-f", "lavfi", "-i", f"sine=f=220:d={seconds}:r=44100", "-f", "lavfi", "-i",
                            f"sine=f=330:d={seconds}:r=44100", "-filter_complex", "amix=inputs=2", "-ac", "2",
                            "-b:a", "192k", "-y", str(path)])
    return path


async def baseline(clips: list[Path], song: Path, out: Path, total: float) -> None:
    """Decode everything and encode it all again in one pass, as a MoviePy-style port does."""
    inputs = [arg for clip in clips for arg in ("-i", str(clip))]
    graph = "".join(f"[{i}:v]" for i in range(len(clips))) + f"concat=n={len(clips)}:v=1:a=0[v]"
    await media.run_ffmpeg([*inputs, "-i", str(song), "-filter_complex", graph, "-map", "[v]",
                            "-map", f"{len(clips)}:a", "-c:v", "libx264", "-preset", "medium", "-pix_fmt", "yuv420p",
                            "-c:a", "aac", "-b:a", "192k", "-t", f"{total:.3f}", "-movflags", "+faststart",
                            "-y", str(out)], duration=total)


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
    await media.run_ffmpeg(["-f", "concat", "-safe", "0", "-i", str(listing), "-map", "0:v", "-c", "copy",
                            "-movflags", "+faststart", "-y", str(out)])


async def bench(args: argparse.Namespace) -> int:
    work = workdir("assembly")
    started = time.perf_counter()
    clips = await render_clips(work, args.clips, args.seconds)
    total = args.clips * args.seconds
    song = await make_song(work / "song.mp3", total)
    print(f"rendered {args.clips} clips of {args.seconds:g} s and a {total:g} s song in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    edit = [media.Clip(path) for path in clips]

    cut = await timed(lambda: media.assemble(edit, work / "cut.mp4", song=song), args.repeat)
    video_only = await timed(lambda: video_copy_only(clips, work / "video-only.mp4"), args.repeat)
    xfade = await timed(lambda: media.assemble(edit, work / "xfade.mp4", song=song, transition="crossfade",
                                               crossfade_seconds=0.5), 1)
    base = await timed(lambda: baseline(clips, song, work / "baseline.mp4", total), 1)
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    cut_info = await media.probe(work / "cut.mp4")
    xfade_info = await media.probe(work / "xfade.mp4")
    base_info = await media.probe(work / "baseline.mp4")
    expected_xfade = total - (args.clips - 1) * 0.5
    assembled, crossfaded = cut.result, xfade.result
    assert isinstance(assembled, media.AssemblyResult) and isinstance(crossfaded, media.AssemblyResult)

    def streams(info: media.MediaInfo) -> str:
        v, a = info.first_video, info.first_audio
        return f"{v.codec if v else '-'} + {a.codec if a else '-'}, {info.duration:.2f} s"

    def runs(timing: Timing) -> str:
        return f"{timing.median:.2f} ({', '.join(f'{t:.2f}' for t in timing.wall)}); ffmpeg CPU {timing.cpu:.2f}"

    rows = [
        ("cut-only: wall s, median (runs); ffmpeg CPU s", runs(cut), "< 2"),
        ("  of which the video concat copy alone", runs(video_only), "report"),
        ("cut-only: clips stream-copied / re-encoded", f"{len(assembled.copied)} / {len(assembled.reencoded)}",
         f"{args.clips} / 0"),
        ("cut-only: output", streams(cut_info), f"h264 + aac, {total:g} s"),
        ("crossfade 0.5 s: wall s; ffmpeg CPU s", runs(xfade), "report"),
        ("crossfade: output", streams(xfade_info), f"h264 + aac, {expected_xfade:g} s"),
        ("full re-encode baseline: wall s; ffmpeg CPU s", runs(base), "report"),
        ("baseline: output", streams(base_info), f"h264 + aac, {total:g} s"),
        ("speed-up cut-only vs baseline, wall / ffmpeg CPU",
         f"{base.median / cut.median:.1f}x / {base.cpu / cut.cpu:.1f}x", ">= 10x"),
        ("peak RSS growth of this process, cut / crossfade / baseline (MiB)",
         f"{cut.rss_growth_mib:.1f} / {xfade.rss_growth_mib:.1f} / {base.rss_growth_mib:.1f}", "< 64"),
        ("peak RSS of the largest ffmpeg child (MiB)", children_peak, "report"),
    ]
    print_table(f"Assembly: {args.clips} sandbox clips x {args.seconds:g} s + a {total:g} s song",
                ["measure", "value", "goal"], rows)
    ok = (len(assembled.copied) == args.clips and abs(cut_info.duration - total) <= 0.1
          and abs(xfade_info.duration - expected_xfade) <= 0.1 and abs(crossfaded.duration - expected_xfade) <= 0.01)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.assembly", description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=12, help="number of clips (default 12)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each clip (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="cut-only runs; the median is reported (default 3)")
    return asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
