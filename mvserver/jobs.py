"""Video jobs: state, persistence, the provider polling loop, and each job's event stream (Server-Sent Events).

A job is an asyncio task owned by the :class:`JobManager` on the app. At most ``max_concurrent`` talk to a provider
at once; the rest wait their turn in order. Every change is an event with a per-job sequential id, appended to the
job's event log (``jobs/<id>.events.jsonl``) before any subscriber sees it; the record (request, status, error,
timestamps, provider prediction id) is rewritten atomically as ``jobs/<id>.json`` on every status change. After a
restart finished videos are still served, event ids continue exactly, and running jobs resume polling their
provider prediction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, TypeVar

from aiohttp import web
from aiohttp_sse import sse_response

from .backends import Providers, Snapshot, VideoRequest
from .config import JobsSettings
from .errors import ApiError, ErrorInfo
from .storage import OutputStore, is_valid_id, new_id
from .updates import PushedUpdates

log = logging.getLogger("mvserver.jobs")

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
T = TypeVar("T")


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

    def log_line(self) -> str:
        return f'{{"id":{self.id},"event":{json.dumps(self.event)},"data":{self.data_json}}}\n'


@dataclass
class Job:
    """One video job; :meth:`public` is what clients see."""

    id: str
    backend: str
    model: str
    sandbox: bool
    request: dict[str, Any]
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
    events: list[Event] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def last_event_id(self) -> int:
        return self.events[-1].id if self.events else 0

    def elapsed(self) -> float:
        end = self.finished_at or time.time()
        return round(end - self.created_at, 3)

    def public(self) -> dict[str, Any]:
        urls = job_urls(self.id)
        return {
            "job_id": self.id,
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
            "error": self.error,
            "video_url": urls["video_url"] if self.status == "succeeded" else None,
            "video_bytes": self.video_bytes,
            "status_url": urls["status_url"],
            "events_url": urls["events_url"],
            "request": self.request,
        }

    def record(self) -> dict[str, Any]:
        """The persisted fields; events live in their own append-only log."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "events"}


def job_urls(job_id: str) -> dict[str, str]:
    return {
        "status_url": f"/api/mv/jobs/{job_id}",
        "events_url": f"/api/mv/jobs/{job_id}/events",
        "video_url": f"/api/mv/get_video/{job_id}",
    }


class JobManager:
    """Owns every job of one app: runs, persists, resumes and streams them."""

    def __init__(self, store: OutputStore, providers: Providers, settings: JobsSettings, *, max_concurrent: int):
        self.store = store
        self.providers = providers
        self.settings = settings
        self.jobs: dict[str, Job] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_concurrent)
        self._wakers: dict[str, asyncio.Future[None]] = {}  # one per job, shared by all its waiting subscribers
        self._write_locks: dict[str, asyncio.Lock] = {}
        self._cancel_requested: set[str] = set()
        self.pushed = PushedUpdates(settings.webhook_safety_poll_seconds)  # provider webhooks (mvserver.updates)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def load(self) -> int:
        """Load persisted jobs; resume those that had not finished. Returns how many were resumed."""
        jobs = await asyncio.to_thread(self._read_jobs)
        resumed = 0
        for job in sorted(jobs, key=lambda j: j.created_at):
            self.jobs[job.id] = job
            if not job.final:
                self._spawn(job)
                resumed += 1
        return resumed

    def _read_jobs(self) -> list[Job]:
        jobs = []
        for path in (self.store.root / "jobs").glob("*.json"):
            if not is_valid_id(path.stem):
                continue
            try:
                job = Job(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.error("skipping unreadable job record %s: %s", path.name, exc)
                continue
            job.events = self._read_events(job.id)
            jobs.append(job)
        return jobs

    def _read_events(self, job_id: str) -> list[Event]:
        """The job's event log. A line cut short by a crash ends it and is cut off the file, so the next
        appended event starts on a line of its own."""
        path = self.store.path("jobs", job_id, ".events.jsonl")
        events: list[Event] = []
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return events
        good_end = 0
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("unterminated line")
                events.append(Event(**json.loads(line)))
            except (ValueError, TypeError):
                break
            good_end += len(line)
        if good_end < len(data):
            log.warning("job %s: event log cut after event %d (torn write)", job_id, len(events))
            os.truncate(path, good_end)
        return events

    async def close(self) -> None:
        """Stop every task on shutdown without marking jobs canceled: they resume at the next start."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for waker in self._wakers.values():
            if not waker.done():
                waker.set_result(None)

    # -- public API -------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    async def submit(self, backend: str, request: VideoRequest, summary: dict[str, Any]) -> Job:
        """Create, persist and start a job for ``request`` on ``backend``."""
        video_backend = self.providers.video_backend(backend)
        job = Job(id=new_id(), backend=backend, model=video_backend.model, sandbox=video_backend.sandbox,
                  request=summary, reference_mime_type=request.reference_mime_type)
        if request.reference_image is not None:
            await self.store.write_bytes(self.store.path("jobs", job.id, ".ref"), request.reference_image)
        self.jobs[job.id] = job
        await self._publish(job, "queued", persist=True)
        self._spawn(job)
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job and its provider prediction; a finished job is returned unchanged."""
        job = self.jobs[job_id]
        task = self.tasks.get(job_id)
        if job.final or task is None:
            return job
        self._cancel_requested.add(job_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
        return job

    @staticmethod
    def events_after(job: Job, after: int) -> list[Event]:
        """The job's events with id > ``after`` (ids are sequential, so this is a slice)."""
        index = max(0, after - job.events[0].id + 1) if job.events else 0
        return job.events[index:]

    def on_provider_update(self, job_id: str, prediction_id: str, snapshot: Snapshot) -> bool:
        """A verified provider webhook: wake the job's poll loop with it (applied like a poll result).
        False when the job is not running or the update is not newer than what it has seen."""
        job = self.jobs.get(job_id)
        if job is None or job.final or job_id not in self.tasks:
            return False
        return self.pushed.push(job_id, prediction_id, snapshot)

    def next_change(self, job: Job) -> asyncio.Future[None]:
        """A future resolved at the job's next event; every waiting subscriber shares it."""
        waker = self._wakers.get(job.id)
        if waker is None:
            waker = self._wakers[job.id] = asyncio.get_running_loop().create_future()
        return waker

    # -- running ----------------------------------------------------------------------------------------------

    def _spawn(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
        self.tasks[job.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(job.id, None))

    async def _run(self, job: Job) -> None:
        backend = self.providers.video_backend(job.backend)
        try:
            async with self._slots:
                if job.started_at is None:
                    job.started_at = time.time()
                job.status = "running"
                deadline = job.started_at + self.settings.timeout_seconds
                async with asyncio.timeout(max(0.0, deadline - time.time())):
                    await self._drive(job, backend)
        except asyncio.CancelledError:
            if job.id in self._cancel_requested:
                await self._cancel_provider(job, backend)
                await self._finish(job, "canceled", ErrorInfo("job_canceled", "canceled by the client"))
            else:  # shutdown: keep the record as it is so the job resumes at the next start
                await self._persist(job)
            raise
        except TimeoutError:
            await self._cancel_provider(job, backend)
            await self._finish(job, "failed", ErrorInfo(
                "job_timeout", f"the video was not ready after {self.settings.timeout_seconds:g} s",
                provider=job.backend, provider_status=job.stage))
        except ApiError as exc:
            await self._finish(job, "failed", exc.info)
        except Exception as exc:  # a bug must still end the job, not leave it running forever
            log.exception("job %s crashed", job.id)
            await self._finish(job, "failed", ErrorInfo("internal_error", f"{exc.__class__.__name__}: {exc}"))
        finally:
            self._cancel_requested.discard(job.id)
            self.pushed.forget(job.id)

    async def _drive(self, job: Job, backend: Any) -> None:
        """Create (unless resuming) the prediction, poll it to the end, download the video."""
        if job.prediction_id is None:
            job.stage = "submitting"
            await self._publish(job, "running", persist=True)
            request = await self._video_request(job)
            job.prediction_id = await self._retry(lambda: backend.start(request), create=True)
            job.stage = "generating"
            await self._publish(job, "progress", persist=True)
        else:
            job.stage = job.stage if job.stage in ("generating", "downloading") else "generating"
            await self._publish(job, "running", persist=True)
        snapshot = await self._poll_until_done(job, backend)
        if snapshot.status != "succeeded":
            error = snapshot.error or ErrorInfo("provider_prediction_failed", f"prediction {snapshot.status}",
                                                provider=job.backend, provider_status=snapshot.status)
            await self._finish(job, "failed", error)
            return
        job.stage = "downloading"
        await self._publish(job, "progress", persist=True)
        dest = self.store.path("videos", job.id, ".mp4")
        job.video_bytes = await self._retry(lambda: backend.download(snapshot, job.prediction_id, dest))
        job.progress = 1.0
        await self._finish(job, "succeeded", None)

    async def _poll_until_done(self, job: Job, backend: Any) -> Snapshot:
        pushed: Snapshot | None = None  # a webhook's snapshot, applied exactly like a poll result
        while True:
            snapshot = pushed or self.pushed.polled(job.id, await self._retry(lambda: backend.poll(job.prediction_id)))
            if snapshot.done:
                return snapshot
            if snapshot.progress is not None:
                job.progress = round(snapshot.progress, 4)
            job.stage = "generating"
            await self._publish(job, "progress", extra={"logs": _tail(snapshot.logs)})
            # +-10% jitter keeps jobs that started together (or resumed together) from polling in lockstep.
            pushed = await self.pushed.wait(job.id, job.prediction_id,
                                            self.settings.poll_interval_seconds * random.uniform(0.9, 1.1))

    async def _retry(self, call: Callable[[], Awaitable[T]], *, create: bool = False) -> T:
        """Retry transient provider errors with capped exponential backoff and jitter, honouring Retry-After.

        A create is retried only when the provider certainly did not accept it (rate limit or 503).
        """
        delay = self.settings.retry_initial_delay_seconds
        for attempt in range(self.settings.retry_attempts + 1):
            try:
                return await call()
            except ApiError as exc:
                retryable = exc.transient and (not create or exc.info.provider_status in (429, 503))
                if not retryable or attempt == self.settings.retry_attempts:
                    raise
                wait = exc.retry_after if exc.retry_after else delay * (1 + random.random() / 2)
                log.info("transient %s (%s), retry %d in %.1f s", exc.info.code, exc.info.provider_status, attempt + 1, wait)
                await asyncio.sleep(min(wait, self.settings.retry_max_delay_seconds))
                delay = min(delay * 2, self.settings.retry_max_delay_seconds)
        raise AssertionError("unreachable")

    async def _video_request(self, job: Job) -> VideoRequest:
        reference = None
        if job.reference_mime_type:
            reference = await asyncio.to_thread(self.store.path("jobs", job.id, ".ref").read_bytes)
        fields = {k: job.request[k] for k in ("negative_prompt", "aspect_ratio", "duration", "generate_audio", "seed")}
        return VideoRequest(prompt=job.request["full_prompt"], reference_image=reference,
                            reference_mime_type=job.reference_mime_type, **fields,
                            webhook=self.pushed.webhook_url(job.id, job.backend))

    async def _cancel_provider(self, job: Job, backend: Any) -> None:
        if job.prediction_id is None:
            return
        try:
            await asyncio.shield(backend.cancel(job.prediction_id))
        except (ApiError, asyncio.CancelledError) as exc:
            log.warning("could not cancel %s prediction %s: %s", job.backend, job.prediction_id, exc)

    async def _finish(self, job: Job, status: JobStatus, error: ErrorInfo | None) -> None:
        job.status = status
        job.stage = "done"
        job.error = error.to_dict() if error else None
        job.finished_at = time.time()
        await self._publish(job, status, persist=True)

    # -- events and persistence -------------------------------------------------------------------------------

    async def _publish(self, job: Job, name: str, *, persist: bool = False, extra: dict[str, Any] | None = None) -> None:
        data = job.public()
        data["event_time"] = time.time()
        if extra:
            data.update({k: v for k, v in extra.items() if v is not None})
        event = Event(id=job.last_event_id + 1, event=name, data=data)
        # A buffered append of one short line, done inline: it keeps events in order and costs microseconds.
        _append(self.store.path("jobs", job.id, ".events.jsonl"), event.log_line())
        job.events.append(event)
        waker = self._wakers.pop(job.id, None)
        if waker is not None and not waker.done():
            waker.set_result(None)
        if persist:
            await self._persist(job)

    async def _persist(self, job: Job) -> None:
        lock = self._write_locks.setdefault(job.id, asyncio.Lock())
        async with lock:
            await self.store.write_json(self.store.path("jobs", job.id, ".json"), job.record())
        if job.final:
            self._write_locks.pop(job.id, None)


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)


def _tail(logs: str | None, lines: int = 3) -> str | None:
    return "\n".join(logs.strip().splitlines()[-lines:]) if logs and logs.strip() else None


async def stream_events(request: web.Request, manager: JobManager, job: Job, *, ping_interval: float,
                        retry_ms: int) -> web.StreamResponse:
    """Serve one job's events as SSE: history after ``Last-Event-ID``, then live events, then close."""
    async with sse_response(request, ping_interval=ping_interval) as response:
        after = _last_event_id(response.last_event_id)
        gone = asyncio.ensure_future(response.wait())  # done when a ping finds the client gone
        retry: int | None = retry_ms
        try:
            while True:
                for event in manager.events_after(job, after):
                    await response.send(event.data_json, id=str(event.id), event=event.event, retry=retry)
                    after, retry = event.id, None
                if job.final and after >= job.last_event_id:
                    break
                await asyncio.wait({manager.next_change(job), gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    break
        except (ConnectionResetError, RuntimeError):
            pass  # the client disconnected during a write
        finally:
            gone.cancel()
    return response


def _last_event_id(raw: str | None) -> int:
    try:
        return max(0, int(raw)) if raw else 0
    except ValueError:
        return 0


JOBS = web.AppKey("jobs", JobManager)
