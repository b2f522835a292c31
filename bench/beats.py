"""Song analysis: beats, downbeats, tempo, the no-beat verdict, CPU and memory, and scene cuts on the true grid.

Synthetic songs with known grids (``bench/songs.py``: 4/4 and 3/4 at several tempi, swing, a silent intro, a
slow tempo drift, and two songs without a beat) are written as FLAC and analysed by ``mvserver.analysis`` exactly
as the server does it: one warm worker process of ``AnalysisPool``, decoding with ffmpeg. Measured per song:

- beat and downbeat F-measure with ``mir_eval`` (±70 ms window; by convention beats in the first 5 s are left
  out of both lists);
- tempo error of the fitted tempo against the mean tempo of the true beats;
- CPU seconds of the analysis (worker plus its ffmpeg decode) per minute of song, and the worker's peak RSS;
- the grid planner (4/6/8 s clips, 24 fps): every cut between two scenes must lie within one frame of a true
  downbeat;
- section boundaries found within 0.5 s of the true ones (reported, no goal).

Then a long song (``--long-minutes``, 10 by default) for CPU and memory at length. Exits 1 when a goal is missed.

    python -m bench.beats [--scale 1.0] [--long-minutes 10] [--fps 24]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, workdir
from bench.songs import SR, Song, drum_song, suite
from mvserver.analysis import AnalysisPool, SongAnalysis, plan_scenes

GOALS = {"beat_f": 0.95, "downbeat_f": 0.90, "tempo_error": 0.02, "cpu_per_minute": 1.5}


def write_flac(song: Song, path: Path) -> Path:
    import soundfile

    soundfile.write(path, song.samples, SR, format="FLAC")
    return path


def f_measures(song: Song, analysis: SongAnalysis) -> tuple[float, float]:
    import mir_eval

    grid = analysis.grid
    assert grid is not None
    trim = mir_eval.beat.trim_beats
    beat = mir_eval.beat.f_measure(trim(song.beats), trim(np.array(grid.beats)), f_measure_threshold=0.07)
    down = mir_eval.beat.f_measure(trim(song.downbeats), trim(np.array(grid.downbeats)), f_measure_threshold=0.07)
    return float(beat), float(down)


def section_hits(song: Song, analysis: SongAnalysis) -> str:
    """True section boundaries (after the first) found within 0.5 s, and found boundaries that match none."""
    found = np.array([s.start for s in analysis.sections[1:]])
    truth = song.sections[1:]
    hits = sum(bool(len(found)) and np.min(np.abs(found - t)) <= 0.5 for t in truth)
    extra = sum(np.min(np.abs(song.sections - f)) > 0.5 for f in found)
    return f"{hits}/{len(truth)}" + (f", {extra} extra" if extra else "")


def cuts_off_grid(song: Song, analysis: SongAnalysis, fps: float) -> tuple[int, int, float]:
    """Planned cuts (ends of all windows but the last) and how many lie more than one frame from a true downbeat;
    also the largest distance in frames."""
    windows = plan_scenes(analysis, song.duration, (4, 6, 8), fps)
    cuts = np.array([w.end_frame / fps for w in windows[:-1]])
    if len(cuts) == 0:
        return 0, 0, 0.0
    distance = np.min(np.abs(cuts[:, None] - song.downbeats[None, :]), axis=1) * fps
    return len(cuts), int(np.sum(distance > 1.0 + 1e-9)), float(distance.max())


async def run(args: argparse.Namespace) -> int:
    directory = workdir("beats")
    started = time.process_time()
    songs = suite(args.scale)
    if args.long_minutes > 0:
        bars = int(args.long_minutes * 60 / (4 * 60 / 124)) // 5
        songs.append(
            drum_song(f"4/4 124 BPM, {args.long_minutes:g} min", bpm=124, form="ABCAB", bars_per_section=bars, seed=20)
        )
    print(f"generated {len(songs)} songs in {time.process_time() - started:.1f} s CPU", flush=True)
    pool = AnalysisPool(workers=1, max_seconds=max(1200.0, args.long_minutes * 60 + 60))
    rows, failures = [], []
    try:
        for index, song in enumerate(songs):
            path = write_flac(song, directory / f"song{index}.flac")
            analysis = await pool.analyse(path, timeout=120)
            cpu = pool.stats.cpu_seconds[-1]
            if index == 0:
                print(
                    f"worker start: {pool.stats.last_start_cpu_seconds:.2f} s CPU (import, numba cache, warm-up), "
                    f"peak RSS {pool.stats.start_peak_rss_mb:.0f} MB"
                )
            row: list[object] = [
                song.name,
                f"{song.duration:.0f}",
                f"{cpu / song.duration * 60:.2f}",
                f"{pool.stats.peak_rss_mb[-1]:.0f}",
            ]
            if cpu / song.duration * 60 > GOALS["cpu_per_minute"]:
                failures.append(f"{song.name}: CPU per minute")
            if song.tempo is None:
                detected = analysis.grid is None
                row += ["—", "—", "—", "—", "no grid" if detected else "GRID (wrong)", "—", "—"]
                if not detected:
                    failures.append(f"{song.name}: a grid was invented")
            elif analysis.grid is None:
                row += ["—", "—", "—", "—", f"NO GRID: {analysis.no_grid_reason}", "—", "—"]
                failures.append(f"{song.name}: no grid found")
            else:
                beat_f, down_f = f_measures(song, analysis)
                error = (analysis.grid.tempo - song.tempo) / song.tempo
                cuts, off, worst = cuts_off_grid(song, analysis, args.fps)
                meter = analysis.grid.meter
                row += [
                    f"{beat_f:.3f}",
                    f"{down_f:.3f}",
                    f"{analysis.grid.tempo:.2f} ({error * 100:+.2f} %)",
                    f"{meter if meter else '?'} (true {song.meter})",
                    f"pulse {analysis.grid.evidence.pulse_clarity:.2f}, downbeat conf "
                    f"{analysis.grid.downbeat_confidence:.2f}",
                    f"{cuts - off}/{cuts} (max {worst:.2f} fr)",
                    section_hits(song, analysis),
                ]
                for ok, what in (
                    (beat_f >= GOALS["beat_f"], "beat F"),
                    (down_f >= GOALS["downbeat_f"], "downbeat F"),
                    (abs(error) <= GOALS["tempo_error"], "tempo"),
                    (off == 0, "cuts off the downbeats"),
                    (meter == song.meter, "meter"),
                ):
                    if not ok:
                        failures.append(f"{song.name}: {what}")
            rows.append(row)
    finally:
        await pool.close()
    print_table(
        "Song analysis (one warm worker; CPU = worker + ffmpeg decode)",
        [
            "song",
            "s",
            "CPU s/min",
            "peak RSS MB",
            "beat F",
            "downbeat F",
            "tempo BPM (error)",
            "meter",
            "evidence",
            f"cuts on a downbeat (±1 frame at {args.fps:g} fps)",
            "section bounds ±0.5 s",
        ],
        rows,
    )
    print(
        "\ngoals: beat F >= 0.95, downbeat F >= 0.90, tempo within 2 %, no-beat songs without a grid, "
        "<= 1.5 s CPU per minute, every cut within one frame of a true downbeat"
    )
    for failure in failures:
        print(f"MISSED: {failure}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="song length factor (1.0: 8 bars per section)")
    parser.add_argument("--long-minutes", type=float, default=10.0, help="length of the long song (0: none)")
    parser.add_argument("--fps", type=float, default=24.0)
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
