"""How good the ETA is: simulated jobs with a spread of run times go through the job store's real running estimate
(``FileUsageBook.learn`` / ``estimate``, the windowed mean the server keeps per model and kind of request) and the
server's own ``EtaEstimate``; at 25, 50 and 75 % of each job's true run the ETA (and the guessed progress a Veo
job gets) is compared with the truth.

    python -m bench.eta [--jobs 400] [--seed 7]

Scenarios: run times log-normal around a kind's median with spread sigma 0.1, 0.25 and 0.5; two kinds of request
mixed (4 s and 8 s clips: each has its own estimate); and a provider that slows down by half over the run
(drift, sigma 0.25), which the windowed mean must follow. The first 5 jobs of a kind have no ETA (or a poor one)
and are counted apart (``cold``). No server or simulator: jobs are simulated in time, so the run takes seconds.

Reported per scenario and point: median and p90 of |ETA error| in seconds and relative to the job's run time,
the mean signed error (bias: + means the ETA promised too long), and the median |progress guess - truth|.
Goal (report): median relative error at 50 % <= 0.5 x sigma-equivalent spread; no goal is enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, print_table
from mvserver.jobs.eta import EtaEstimate
from mvserver.jobs.model import Job
from mvserver.jobs.usage_store import FileUsageBook

POINTS = (0.25, 0.5, 0.75)
METHODS = ("server", "plain mean")  # the server's conditional log-normal median; the mean run minus the time run
WARM_UP = 5  # jobs of a kind before its estimate counts as warm


@dataclass
class Scenario:
    name: str
    kinds: dict[str, float]  # kind of request -> median run seconds
    sigma: float
    drift: float = 0.0  # the run times grow by this share from the first job to the last


SCENARIOS = [
    Scenario("one kind, sigma 0.10", {"4s": 45.0}, 0.10),
    Scenario("one kind, sigma 0.25", {"4s": 45.0}, 0.25),
    Scenario("one kind, sigma 0.50", {"4s": 45.0}, 0.50),
    Scenario("4 s and 8 s mixed, sigma 0.25", {"4s": 45.0, "8s": 80.0}, 0.25),
    Scenario("drift +50 %, sigma 0.25", {"4s": 45.0}, 0.25, drift=0.5),
]


@dataclass
class Sample:
    method: str
    point: float
    error: float  # ETA - true remaining, seconds
    relative: float  # |error| / the job's run time
    progress_error: float  # |guessed progress - point|
    cold: bool


async def run(scenario: Scenario, jobs: int, rng: random.Random, directory: Path) -> list[Sample]:
    book = FileUsageBook(directory)
    seen: dict[str, int] = {}
    samples: list[Sample] = []
    for n in range(jobs):
        kind = rng.choice(sorted(scenario.kinds))
        median = scenario.kinds[kind] * (1 + scenario.drift * n / max(1, jobs - 1))
        seconds = median * math.exp(rng.gauss(0.0, scenario.sigma))
        key = f"video|bench|{kind}"
        found = await book.estimate(key)
        if found is not None:
            job = Job(
                id="bench",
                backend="replicate",
                model="bench",
                sandbox=False,
                request={},
                created_at=0.0,
                started_at=0.0,
            )
            for method in METHODS:
                estimate = EtaEstimate(found, plain=method == "plain mean")
                for point in POINTS:
                    now = point * seconds
                    error = estimate.eta_seconds(job, now=now) - (seconds - now)
                    samples.append(
                        Sample(
                            method,
                            point,
                            error,
                            abs(error) / seconds,
                            abs(estimate.progress(job, now=now) - point),
                            seen.get(kind, 0) < WARM_UP,
                        )
                    )
        await book.learn(key, seconds)
        seen[kind] = seen.get(kind, 0) + 1
    return samples


def rows_of(name: str, samples: list[Sample], keep: Callable[[Sample], bool]) -> list[list[object]]:
    rows = []
    for method in METHODS:
        for point in POINTS:
            chosen = [s for s in samples if s.method == method and s.point == point and keep(s)]
            if chosen:
                rows.append(row(name, method, point, chosen))
    return rows


def row(name: str, method: str, point: float, chosen: list[Sample]) -> list[object]:
    absolute = [abs(s.error) for s in chosen]
    return [
        name,
        method,
        f"{point:.0%}",
        len(chosen),
        f"{percentile(absolute, 50):.1f}",
        f"{percentile(absolute, 90):.1f}",
        f"{percentile([s.relative for s in chosen], 50):.3f}",
        f"{sum(s.error for s in chosen) / len(chosen):+.1f}",
        f"{percentile([s.progress_error for s in chosen], 50):.3f}",
    ]


async def main_async(args: argparse.Namespace) -> None:
    rows: list[list[object]] = []
    for scenario in SCENARIOS:
        directory = Path(tempfile.mkdtemp(prefix="mvbench-eta-"))
        try:
            samples = await run(scenario, args.jobs, random.Random(args.seed), directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        rows += rows_of(scenario.name, samples, lambda s: not s.cold)
        rows += rows_of(scenario.name + " (cold)", samples, lambda s: s.cold)
    print_table(
        f"ETA error over {args.jobs} simulated jobs per scenario (warm: after {WARM_UP} runs of a kind)",
        ["scenario", "ETA", "at", "n", "|err| p50 s", "|err| p90 s", "|err|/run p50", "bias s", "|progress err| p50"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400, help="simulated jobs per scenario")
    parser.add_argument("--seed", type=int, default=7)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
