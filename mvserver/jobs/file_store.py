"""The embedded job store: records and append-only event logs as files under ``outputs/jobs``. One process.

``<id>.json`` is the record (rewritten atomically on status changes), ``<id>.events.jsonl`` the event log (one JSON
line per event, appended before any subscriber sees it), and ``active/<id>`` marks an unfinished job, so start-up
reads only those, however many finished jobs there are. Finished jobs are read from disk on demand and a few are
kept in a small cache; nothing else about them stays in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..storage import OutputStore, is_valid_id
from .model import Event, Job
from .store import Lease, SignalHandler

log = logging.getLogger("mvserver.jobs")

FINISHED_CACHE_SIZE = 256
LOCAL_LEASE = "local"
EXPIRE_BATCH = 500


class FileJobStore:
    """Jobs of one process, on disk; implements :class:`~mvserver.jobs.store.JobStore`."""

    lease_seconds: float | None = None

    def __init__(self, outputs: OutputStore):
        self.outputs = outputs
        self.dir = outputs.root / "jobs"
        self.active_dir = self.dir / "active"
        self.expired_dir = self.dir / "expired"
        self._active: dict[str, Job] = {}
        self._logs: dict[str, list[Event]] = {}
        self._finished: collections.OrderedDict[str, tuple[Job, list[Event] | None]] = collections.OrderedDict()
        self._queue: collections.deque[str] = collections.deque()
        self._queued = asyncio.Event()
        self._wakers: dict[str, asyncio.Future[None]] = {}
        self._write_locks: dict[str, asyncio.Lock] = {}
        self._handler: SignalHandler | None = None
        self._closing = False

    # -- life cycle -------------------------------------------------------------------------------------------

    async def open(self) -> int:
        jobs = await asyncio.to_thread(self._load_active)
        for job, events in sorted(jobs, key=lambda pair: pair[0].created_at):
            self._active[job.id] = job
            self._logs[job.id] = events
            self._enqueue(job.id)
        return len(jobs)

    def _load_active(self) -> list[tuple[Job, list[Event]]]:
        if not self.active_dir.is_dir():
            self._build_active_index()
        loaded = []
        for marker in self.active_dir.iterdir():
            if not is_valid_id(marker.name):
                continue
            job = self._read_record(marker.name)
            if job is None or job.final:
                marker.unlink(missing_ok=True)
                continue
            events = self._read_events(job.id)
            job.last_event_id = events[-1].id if events else 0
            loaded.append((job, events))
        return loaded

    def _build_active_index(self) -> None:
        """Stores written before the index existed: mark their unfinished jobs once."""
        self.active_dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.glob("*.json"):
            job = self._read_record(path.stem) if is_valid_id(path.stem) else None
            if job is not None and not job.final:
                (self.active_dir / job.id).touch()

    async def close(self) -> None:
        self._closing = True
        self._queued.set()
        for waker in self._wakers.values():
            if not waker.done():
                waker.set_result(None)
        self._wakers.clear()

    # -- records ----------------------------------------------------------------------------------------------

    async def create(self, job: Job, event: Event) -> None:
        self._active[job.id] = job
        self._logs[job.id] = []
        await asyncio.to_thread((self.active_dir / job.id).touch)
        await self.write(Lease(job.id, LOCAL_LEASE), job, event, record=True)
        self._enqueue(job.id)

    async def get(self, job_id: str) -> Job | None:
        job = self._active.get(job_id)
        if job is not None:
            return job
        cached = self._finished.get(job_id)
        if cached is not None:
            self._finished.move_to_end(job_id)
            return cached[0]
        job = await asyncio.to_thread(self._read_record, job_id)
        if job is not None:
            self._remember(job, None)
        return job

    def _read_record(self, job_id: str) -> Job | None:
        path = self.outputs.path("jobs", job_id, ".json")
        try:
            return Job.from_record(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.error("unreadable job record %s: %s", path.name, exc)
            return None

    def _remember(self, job: Job, events: list[Event] | None) -> None:
        self._finished[job.id] = (job, events)
        self._finished.move_to_end(job.id)
        while len(self._finished) > FINISHED_CACHE_SIZE:
            self._finished.popitem(last=False)

    async def write(self, lease: Lease, job: Job, event: Event | None, *, record: bool) -> None:
        if event is not None:
            # A buffered append of one short line, done inline: it keeps events in order and costs microseconds.
            _append(self.outputs.path("jobs", job.id, ".events.jsonl"), event.log_line())
            self._logs.setdefault(job.id, []).append(event)
            waker = self._wakers.pop(job.id, None)
            if waker is not None and not waker.done():
                waker.set_result(None)
        if record:
            lock = self._write_locks.setdefault(job.id, asyncio.Lock())
            async with lock:
                await self.outputs.write_json(self.outputs.path("jobs", job.id, ".json"), job.record())
            if job.final and job.id in self._active:
                self._retire(job)

    def _retire(self, job: Job) -> None:
        """A finished job leaves the active set; its events move to the small cache."""
        (self.active_dir / job.id).unlink(missing_ok=True)
        self._active.pop(job.id, None)
        self._write_locks.pop(job.id, None)
        self._remember(job, self._logs.pop(job.id, None))

    # -- claiming ---------------------------------------------------------------------------------------------

    def _enqueue(self, job_id: str) -> None:
        self._queue.append(job_id)
        self._queued.set()

    async def claim(self, limit: int = 1) -> list[tuple[Job, Lease]]:
        claimed: list[tuple[Job, Lease]] = []
        while not claimed:
            while not self._queue:
                if self._closing:
                    raise asyncio.CancelledError()
                self._queued.clear()
                await self._queued.wait()
            while self._queue and len(claimed) < limit:
                job = self._active.get(self._queue.popleft())
                if job is not None and not job.final:
                    claimed.append((job, Lease(job.id, LOCAL_LEASE)))
        return claimed

    async def renew(self, lease: Lease) -> bool:
        return True

    async def release(self, lease: Lease, *, done: bool) -> None:
        """Nothing to hand back in one process: an unfinished job keeps its marker and resumes at the next start."""

    async def finish_unclaimed(self, job: Job, event: Event) -> bool:
        if job.id not in self._queue:
            return False
        self._queue.remove(job.id)
        await self.write(Lease(job.id, LOCAL_LEASE), job, event, record=True)
        return True

    # -- events -----------------------------------------------------------------------------------------------

    async def events(self, job_id: str, after: int) -> list[Event]:
        events = self._logs.get(job_id)
        if events is None:
            events = await self._finished_events(job_id)
        index = max(0, after - events[0].id + 1) if events else 0
        return events[index:]

    async def _finished_events(self, job_id: str) -> list[Event]:
        cached = self._finished.get(job_id)
        if cached is not None and cached[1] is not None:
            return cached[1]
        events = await asyncio.to_thread(self._read_events, job_id)
        job = cached[0] if cached is not None else await self.get(job_id)
        if job is not None and job.final:
            self._remember(job, events)
        return events

    def _read_events(self, job_id: str) -> list[Event]:
        """The job's event log. A line cut short by a crash ends it and is cut off the file, so the next
        appended event starts on a line of its own."""
        path = self.outputs.path("jobs", job_id, ".events.jsonl")
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
                events.append(Event.from_line(line))
            except (ValueError, TypeError, KeyError):
                break
            good_end += len(line)
        if good_end < len(data):
            log.warning("job %s: event log cut after event %d (torn write)", job_id, len(events))
            os.truncate(path, good_end)
        return events

    def next_event(self, job_id: str, after: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        events = self._logs.get(job_id)
        if self._closing or events is None or (events and events[-1].id > after):
            done = loop.create_future()
            done.set_result(None)
            return done
        waker = self._wakers.get(job_id)
        if waker is None:
            waker = self._wakers[job_id] = loop.create_future()
        return waker

    # -- signals ----------------------------------------------------------------------------------------------

    def on_signal(self, handler: SignalHandler) -> None:
        self._handler = handler

    async def signal(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        job = self._active.get(job_id)
        if job is None:
            return
        if name == "cancel":
            job.cancel_requested = True
        if self._handler is not None:
            await self._handler(job_id, name, data)

    # -- retention --------------------------------------------------------------------------------------------

    async def count_active(self, owner: str) -> int:
        """From the in-memory active set: every unfinished job of this single-process store is in it."""
        return sum(1 for job in self._active.values() if job.owner == owner)

    async def expire(self, finished_before: float, tombstone_until: float) -> list[str]:
        removed = await asyncio.to_thread(self._expire, finished_before, tombstone_until)
        for job_id in removed:
            self._finished.pop(job_id, None)
        return removed

    def _expire(self, finished_before: float, tombstone_until: float) -> list[str]:
        """One pass over the records (a directory scan; a finished record is last written when the job ends, so its
        mtime is its finish time) removing up to a batch of expired ones, then the tombstones that ran out."""
        self.expired_dir.mkdir(parents=True, exist_ok=True)
        removed: list[str] = []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                job_id = entry.name[:-5]
                if not entry.name.endswith(".json") or not is_valid_id(job_id) or job_id in self._active:
                    continue
                try:
                    if entry.stat().st_mtime >= finished_before:
                        continue
                except FileNotFoundError:
                    continue
                job = self._read_record(job_id)
                if job is None or not job.final or (job.finished_at or 0) >= finished_before:
                    continue
                tombstone = self.expired_dir / job_id
                tombstone.touch()
                os.utime(tombstone, (tombstone_until, tombstone_until))
                for suffix in (".json", ".events.jsonl"):
                    self.outputs.path("jobs", job_id, suffix).unlink(missing_ok=True)
                removed.append(job_id)
                if len(removed) >= EXPIRE_BATCH:
                    return removed
        now = time.time()
        with os.scandir(self.expired_dir) as tombstones:
            for entry in tombstones:
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < now:
                        os.unlink(entry.path)
        return removed

    async def expired(self, job_id: str) -> bool:
        tombstone = self.expired_dir / job_id
        try:
            return (await asyncio.to_thread(tombstone.stat)).st_mtime >= time.time()
        except FileNotFoundError:
            return False


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
