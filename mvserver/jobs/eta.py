"""How long a job has left: a running estimate of each model's run time per kind of request, kept in the job
store's usage book (``usage_store``), turned into ``eta_seconds`` and, where the provider reports no progress, a
``progress`` guess. Veo reports no percentage; Replicate's models often do (from their logs)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import NormalDist

from mvserver.jobs.model import Job
from mvserver.jobs.usage_store import Durations

_NORMAL = NormalDist()

PROGRESS_GUESS_MAX = 0.95  # a guessed progress never claims to be done: the job may simply run longer


def duration_key(job: Job) -> str:
    """What a job's run time depends on: its model and kind, and for a clip its length and shape (for Veo on
    Vertex, the configured resolution rides on the model), for a lip-sync its window rounded to 5 s."""
    request = job.request
    parts = [job.kind, job.model]
    if job.kind == "video":
        parts += [
            f"{request.get('duration')}s",
            str(request.get("aspect_ratio")),
            "audio" if request.get("generate_audio") else "mute",
        ]
    elif job.kind == "lipsync":
        window = request.get("window") or {}
        parts.append(f"{5 * round(float(window.get('seconds') or 0) / 5)}s")
    return "|".join(parts)


@dataclass(frozen=True)
class EtaEstimate:
    """A job's time left from the run times of its kind (from the job's start, ``started_at``, to its end).

    Run times are skewed and spread, so they are fitted as log-normal (mean and spread of their logarithm); the ETA
    is the median of the time left *given the job has run this long*: a job past the typical run still gets an
    honest, growing estimate instead of 0. With one run seen (no spread yet) it is the typical run minus the time
    run. ``plain`` turns the conditioning off (the mean run minus the time run, the baseline of ``bench/eta.py``).
    """

    durations: Durations
    plain: bool = False

    def elapsed(self, job: Job, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - (job.started_at or job.created_at))

    def total_seconds(self, elapsed: float) -> float:
        """The median run time of a job that has run ``elapsed`` seconds so far."""
        d = self.durations
        if self.plain:
            return d.mean_seconds
        spread = math.sqrt(max(0.0, d.log_square_mean - d.log_mean**2))
        if d.runs < 2 or spread < 1e-6 or elapsed <= 0:
            return max(math.exp(d.log_mean), elapsed)
        survived = 1.0 - _NORMAL.cdf((math.log(elapsed) - d.log_mean) / spread)  # P(a run lasts this long)
        quantile = min(1.0 - 0.5 * survived, 1.0 - 1e-12)  # half of the runs this long end before it
        return max(elapsed, math.exp(d.log_mean + spread * _NORMAL.inv_cdf(quantile)))

    def eta_seconds(self, job: Job, now: float | None = None) -> float:
        elapsed = self.elapsed(job, now)
        return round(max(0.0, self.total_seconds(elapsed) - elapsed), 1)

    def progress(self, job: Job, now: float | None = None) -> float:
        elapsed = self.elapsed(job, now)
        total = self.total_seconds(elapsed)
        if total <= 0:
            return PROGRESS_GUESS_MAX
        return round(min(PROGRESS_GUESS_MAX, elapsed / total), 4)
