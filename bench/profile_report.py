"""``python -m bench.profile_report FILE [--top N]``: the top entries of a server profile by cumulative and self time.

``FILE`` is either a cProfile dump (``bench.run_server --profile``) or py-spy's collapsed stacks (``py-spy record
--format raw``). Times are given per job when ``--jobs`` says how many jobs the profile covers.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
from pathlib import Path


def write_profile(
    profiler: cProfile.Profile, path: str, top: int = 40, threads: list[tuple[str, float]] | None = None
) -> None:
    """Dump the stats to ``path`` and the readable top entries next to it (``path.txt``), after the CPU seconds of
    each thread (the profile covers only the event loop's)."""
    profiler.dump_stats(path)
    lines = [f"thread {name}: {cpu:.2f} s CPU" for name, cpu in threads or []]
    Path(path + ".txt").write_text("\n".join(lines) + "\n" + report(path, top))


def report(path: str, top: int = 40, jobs: int | None = None) -> str:
    out = io.StringIO()
    try:
        stats = pstats.Stats(path, stream=out)
    except (ValueError, EOFError, TypeError):  # not marshalled stats: py-spy's collapsed stacks
        return _collapsed_report(path, top, jobs)
    total = stats.total_tt  # type: ignore[attr-defined]
    out.write(f"{path}: {total:.2f} s profiled" + (f", {1000 * total / jobs:.2f} ms per job" if jobs else "") + "\n")
    for key in ("cumulative", "tottime"):
        out.write(f"\n== top {top} by {key} ==\n")
        stats.sort_stats(key).print_stats(top)
    return out.getvalue()


def _collapsed_report(path: str, top: int, jobs: int | None) -> str:
    """Self and cumulative samples per function from py-spy's ``frame;frame;... count`` lines."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{path}: {samples} samples" + (f" over {jobs} jobs" if jobs else "")]
    for title, counter in (("cumulative", total), ("self", own)):
        lines.append(f"\n== top {top} by {title} (share of samples) ==")
        lines += [f"{100 * n / samples:6.1f} %  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_report", description=__doc__.split("\n")[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--jobs", type=int, help="jobs the profile covers (adds ms per job)")
    args = parser.parse_args(argv)
    print(report(args.file, args.top, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
