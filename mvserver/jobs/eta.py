"""How long a job has left: a running estimate of each model's run time per kind of request, kept in the job
store's usage book (``usage_store``), turned into ``eta_seconds`` and, where the provider reports no progress, a
``progress`` guess. Veo reports no percentage; Replicate's models often do (from their logs)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .model import Job

PROGRESS_GUESS_MAX = 0.95  # a guessed progress never claims to be done: the job may simply run longer


def duration_key(job: Job) -> str:
    """What a job's run time depends on: its model and kind, and for a clip its length and shape (for Veo on
    Vertex, the configured resolution rides on the model), for a lip-sync its window rounded to 5 s."""
    request = job.request
    parts = [job.kind, job.model]
    if job.kind == "video":
        parts += [f"{request.get('duration')}s", str(request.get("aspect_ratio")),
                  "audio" if request.get("generate_audio") else "mute"]
    elif job.kind == "lipsync":
        window = request.get("window") or {}
        parts.append(f"{5 * round(float(window.get('seconds') or 0) / 5)}s")
    return "|".join(parts)


@dataclass(frozen=True)
class EtaEstimate:
    """(runs seen, mean run seconds) of a job's kind: from the job's start (``started_at``) to its end."""

    runs: int
    mean_seconds: float

    def elapsed(self, job: Job, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - (job.started_at or job.created_at))

    def eta_seconds(self, job: Job, now: float | None = None) -> float:
        """Seconds left if this run takes as long as the mean; 0 once past it (then the job is late, not done)."""
        return round(max(0.0, self.mean_seconds - self.elapsed(job, now)), 1)

    def progress(self, job: Job, now: float | None = None) -> float:
        if self.mean_seconds <= 0:
            return PROGRESS_GUESS_MAX
        return round(min(PROGRESS_GUESS_MAX, self.elapsed(job, now) / self.mean_seconds), 4)
