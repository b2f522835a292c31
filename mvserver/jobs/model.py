"""Jobs as plain data: the record, its events, statuses and URLs. No I/O here."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
STATUSES: tuple[str, ...] = get_args(JobStatus)
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})

# Events are kept small whatever the request: free text in them is clipped (the whole request and error stay in
# the job record and ``GET /jobs/{id}``).
EVENT_TEXT_MAX_CHARS = 1000


@dataclass
class Event:
    """One job event; ``data_json`` is ``data`` serialised once, for the log and every subscriber."""

    id: int
    event: str
    data: dict[str, Any]
    data_json: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.data_json:
            self.data_json = json.dumps(self.data, separators=(",", ":"))

    @property
    def final(self) -> bool:
        return self.event in FINAL_STATUSES

    def log_line(self) -> str:
        return f'{{"id":{self.id},"event":{json.dumps(self.event)},"data":{self.data_json}}}\n'

    @classmethod
    def from_line(cls, line: bytes | str) -> Event:
        raw = json.loads(line)
        return cls(id=raw["id"], event=raw["event"], data=raw["data"])


@dataclass
class Job:
    """One job (a video today; other kinds share the same life cycle); :meth:`public` is what clients see."""

    id: str
    backend: str
    model: str
    sandbox: bool
    request: dict[str, Any]
    kind: str = "video"
    owner: str | None = None
    reference_mime_type: str | None = None
    status: JobStatus = "queued"
    stage: str = "queued"
    progress: float | None = None
    prediction_id: str | None = None
    error: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    video_bytes: int | None = None
    # The stored clip as ffmpeg read it (length in seconds, frame size) and whether its poster was made.
    video_seconds: float | None = None
    video_width: int | None = None
    video_height: int | None = None
    poster: bool = False
    last_event_id: int = 0
    cancel_requested: bool = False
    running_cap: int | None = None  # the owner key's max_running_jobs when the job was made (None: no cap)
    deadline_seconds: float | None = None  # the client's deadline, counted from created_at (queue time included)
    webhook_url: str | None = None  # where the job's status changes are sent (mvserver.jobs.webhooks_out)
    webhook_events: str | None = None  # "completed" (the final event) or "all" (every status change)
    # The client asked for the provider's log lines on progress events (Replicate webhooks then include ``logs``
    # deliveries); a record written before the option existed reads as false.
    provider_logs: bool = False
    retries: int = 0  # provider calls retried after a transient error (usage)
    provider_metrics: dict[str, Any] | None = None  # what the provider reported of its run (Replicate's metrics)
    usage: dict[str, Any] | None = None  # measured when the job ends (jobs.usage.measure): null until then
    held_micros: int = 0  # its estimated cost, held on its key's monthly budget when it was created

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def deadline_at(self) -> float | None:
        """When the job must be over (the client's ``deadline_seconds``), or None."""
        return None if self.deadline_seconds is None else self.created_at + self.deadline_seconds

    def seconds_left(self) -> float | None:
        """Seconds until the client's deadline (0 once past), or None without one: what a provider that
        enforces deadlines itself is given when its prediction is created."""
        deadline = self.deadline_at
        return None if deadline is None else max(0.0, deadline - time.time())

    def elapsed(self) -> float:
        end = self.finished_at or time.time()
        return round(end - self.created_at, 3)

    def state(self) -> dict[str, Any]:
        """What changes while a job runs: the body of every event, small whatever the request."""
        urls = job_urls(self.id)
        return {
            "job_id": self.id,
            "kind": self.kind,
            "status": self.status,
            "stage": self.stage,
            "progress": self.progress,
            "backend": self.backend,
            "model": self.model,
            "sandbox": self.sandbox,
            "provider_prediction_id": self.prediction_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "elapsed_seconds": self.elapsed(),
            "error": _clip_error(self.error),
            "video_url": urls["video_url"] if self.status == "succeeded" else None,
            "video_bytes": self.video_bytes,
            "video_seconds": self.video_seconds,
            "video_width": self.video_width,
            "video_height": self.video_height,
            "poster_url": urls["poster_url"] if self.status == "succeeded" and self.poster else None,
            "usage": self.usage,
        }

    def progress_state(self) -> dict[str, Any]:
        """The body of a ``progress`` event: only what moves while a job runs (clients merge it onto the last
        full state they received)."""
        return {
            "job_id": self.id,
            "status": self.status,
            "stage": self.stage,
            "progress": self.progress,
            "elapsed_seconds": self.elapsed(),
        }

    def public(self) -> dict[str, Any]:
        """The full view for ``GET /jobs/{id}``: the state plus model, URLs, error and the request, once."""
        return {
            **self.state(),
            "error": self.error,
            **_public_urls(self.id),
            "deadline_at": self.deadline_at,
            "webhook_url": self.webhook_url,
            "webhook_events": self.webhook_events,
            "provider_logs": self.provider_logs,
            "request": self.request,
        }

    def record(self) -> dict[str, Any]:
        """The persisted fields; events live in their own log."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def job_urls(job_id: str) -> dict[str, str]:
    return {
        "status_url": f"/api/mv/jobs/{job_id}",
        "events_url": f"/api/mv/jobs/{job_id}/events",
        "video_url": f"/api/mv/get_video/{job_id}",
        "poster_url": f"/api/mv/get_poster/{job_id}",
    }


def _public_urls(job_id: str) -> dict[str, str]:
    urls = job_urls(job_id)
    return {"status_url": urls["status_url"], "events_url": urls["events_url"]}


def clip_text(text: str | None, limit: int = EVENT_TEXT_MAX_CHARS) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _clip_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """An error as events carry it: every value clipped, so a provider's long answer cannot bloat the log."""
    if not error:
        return error
    clipped: dict[str, Any] = {}
    for key, value in error.items():
        if isinstance(value, str):
            clipped[key] = clip_text(value)
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, separators=(",", ":"))
            clipped[key] = value if len(text) <= EVENT_TEXT_MAX_CHARS else clip_text(text)
        else:
            clipped[key] = value
    return clipped
