"""The embedded job store: records and append-only event logs as files under ``outputs/jobs``. One process.

``<id>.json`` is the record (rewritten atomically and fsynced when a restart would read something new from it, see
:meth:`FileJobStore.write`), ``<id>.events.jsonl`` the event log (one JSON line per event, appended before any
subscriber sees it; fsynced with the final record before the final event is seen), and ``active/<id>`` marks an
unfinished job, so start-up reads only those, however many finished jobs there are. Finished jobs are read from
disk on demand and a few are kept in a small cache; nothing else about them stays in memory.

``index/<key id>.idx`` (``-.idx`` with keys off) lists an owner's jobs, one sorted line per job (its
:func:`~mvserver.jobs.store.index_entry`, 54 bytes): a listing page is a binary search for its cursor and a short
read backwards, whatever the number of jobs; retention drops the lines of the jobs it removes.
``idempotency/<hash>.json`` keeps what an ``Idempotency-Key`` answered, until it expires.

A job with a ``running_cap`` (its key's ``max_running_jobs``) is *admitted* (queued for a slot) only while fewer
than that many of its owner's jobs are admitted and unfinished; the others wait, in order, on the owner's held
list, and the next one is admitted as soon as one of the owner's jobs finishes (:meth:`FileJobStore._admit`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, BinaryIO

from mvserver.core.artefacts import OutputStore, is_valid_id, write_bytes_atomic
from mvserver.jobs.model import Event, Job
from mvserver.jobs.store import Lease, SignalHandler, index_entry, owner_slot
from mvserver.jobs.usage_store import FileUsageBook
from mvserver.web.access.idempotency import Remembered

log = logging.getLogger("mvserver.jobs")

FINISHED_CACHE_SIZE = 256
LOCAL_LEASE = "local"
EXPIRE_BATCH = 500
INDEX_LINE = re.compile(rb"^[0-9]{16}-[0-9a-f-]{36}$")
READ_BLOCK = 8192


class FileJobStore:
    """Jobs of one process, on disk; implements :class:`~mvserver.jobs.store.JobStore`."""

    lease_seconds: float | None = None

    def __init__(self, outputs: OutputStore):
        self.outputs = outputs
        self.dir = outputs.root / "jobs"
        self.active_dir = self.dir / "active"
        self.expired_dir = self.dir / "expired"
        self.index_dir = self.dir / "index"
        self.remembered_dir = self.dir / "idempotency"
        self._index_lock = asyncio.Lock()  # appends vs. the rewrite that drops expired jobs
        self._last_stamp: dict[str, int] = {}  # owner slot -> newest index stamp, so each file stays sorted
        self._remember_lock = asyncio.Lock()
        self._active: dict[str, Job] = {}
        self._logs: dict[str, list[Event]] = {}
        self._finished: collections.OrderedDict[str, tuple[Job, list[Event] | None]] = collections.OrderedDict()
        self._queue: collections.deque[str] = collections.deque()
        self._admitted: dict[str, set[str]] = {}  # owner -> its admitted unfinished jobs (those with a cap)
        self._held: dict[str, collections.deque[str]] = {}  # owner -> its jobs waiting for one of its places
        self._queued = asyncio.Event()
        self._wakers: dict[str, asyncio.Future[None]] = {}
        self._write_locks: dict[str, asyncio.Lock] = {}
        self._written: dict[str, tuple[Any, ...]] = {}  # job -> what its record on disk says for a restart
        self._handler: SignalHandler | None = None
        self._closing = False
        self._book = FileUsageBook(self.dir / "usage")

    def usage_book(self) -> FileUsageBook:
        """The ledger, spending and duration estimates, under ``jobs/usage`` (kept by retention)."""
        return self._book

    # -- life cycle -------------------------------------------------------------------------------------------

    async def open(self) -> int:
        jobs = await asyncio.to_thread(self._load_active)
        for job, events in sorted(jobs, key=lambda pair: pair[0].created_at):
            self._active[job.id] = job
            self._logs[job.id] = events
            self._admit(job)
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

    async def ping(self) -> None:
        """The jobs directory must be there and writable (a lost mount, a read-only disk: not ready)."""
        if not await asyncio.to_thread(os.access, self.dir, os.W_OK | os.X_OK):
            raise OSError(f"{self.dir} is not a writable directory")

    async def close(self) -> None:
        self._closing = True
        self._queued.set()
        for waker in self._wakers.values():
            if not waker.done():
                waker.set_result(None)
        self._wakers.clear()

    # -- records ----------------------------------------------------------------------------------------------

    async def create(self, job: Job, event: Event) -> None:
        """The job's marker and its first record in one trip to a worker thread (the record fsynced, as every
        record written); its index line, a short buffered append like an event's, inline."""
        self._active[job.id] = job
        self._logs[job.id] = []
        self._add_event(job, event)
        data = _record_bytes(job)
        await asyncio.to_thread(self._write_created, job.id, data)
        self._written[job.id] = _restart_state(job)
        async with self._index_lock:
            self._add_to_index(job)
        self._admit(job)

    def _write_created(self, job_id: str, data: bytes) -> None:
        (self.active_dir / job_id).touch()
        write_bytes_atomic(self.outputs.path("jobs", job_id, ".json"), data)

    # -- a key's running places ---------------------------------------------------------------------------------

    def _admit(self, job: Job) -> None:
        """Queue the job for a slot, or hold it while its owner has ``running_cap`` jobs admitted."""
        if job.owner is None or job.running_cap is None:
            self._enqueue(job.id)
            return
        held = self._held.get(job.owner)
        if held or len(self._admitted.get(job.owner, ())) >= job.running_cap:
            self._held.setdefault(job.owner, collections.deque()).append(job.id)
            return
        self._admitted.setdefault(job.owner, set()).add(job.id)
        self._enqueue(job.id)

    def _free_place(self, job: Job) -> None:
        """A job ended: it leaves its owner's places (or held list), and the owner's next held jobs get in."""
        if job.owner is None:
            return
        admitted = self._admitted.get(job.owner, set())
        admitted.discard(job.id)
        held = self._held.get(job.owner)
        if held is not None and job.id in held:
            held.remove(job.id)
        while held:
            head = self._active.get(held[0])
            if head is not None and head.running_cap is not None and len(admitted) >= head.running_cap:
                break
            held.popleft()
            if head is not None and not head.final:
                admitted.add(head.id)
                self._admitted[job.owner] = admitted
                self._enqueue(head.id)
        if not held:
            self._held.pop(job.owner, None)
        if not admitted:
            self._admitted.pop(job.owner, None)

    async def count_places(self, owner: str) -> tuple[int, int]:
        def unfinished(ids: Any) -> int:  # a job's final event and state come a moment before it is retired
            return sum(1 for job_id in ids if (job := self._active.get(job_id)) is not None and not job.final)

        return unfinished(self._admitted.get(owner, ())), unfinished(self._held.get(owner, ()))

    # -- listing ----------------------------------------------------------------------------------------------

    def _index_path(self, owner: str | None) -> Path:
        return self.index_dir / f"{owner_slot(owner)}.idx"

    def _add_to_index(self, job: Job) -> None:
        """Append the job's entry; its stamp is the creation time, nudged past the owner's newest so lines stay
        sorted even if the clock steps back."""
        slot, path = owner_slot(job.owner), self._index_path(job.owner)
        last = self._last_stamp.get(slot)
        if last is None:
            tail = _lines_before(path, None, 1)
            last = int(tail[0][:16]) if tail else 0
        stamp = max(int(job.created_at * 1_000_000), last + 1)
        self._last_stamp[slot] = stamp
        self.index_dir.mkdir(parents=True, exist_ok=True)
        _append(path, index_entry(stamp, job.id) + "\n")

    async def index(self, owner: str | None, before: str | None, count: int) -> list[str]:
        return await asyncio.to_thread(_lines_before, self._index_path(owner), before, count)

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        found: dict[str, Job | None] = {}
        for job_id in job_ids:
            job = self._active.get(job_id) or (self._finished.get(job_id) or (None,))[0]
            if job is not None:
                found[job_id] = job
        missing = [job_id for job_id in job_ids if job_id not in found]
        if missing:
            found.update(
                zip(missing, await asyncio.to_thread(lambda: [self._read_record(i) for i in missing]), strict=False)
            )
        return [found[job_id] for job_id in job_ids]

    # -- idempotency ------------------------------------------------------------------------------------------

    def _remembered_path(self, key: str) -> Path:
        assert re.fullmatch(r"[0-9a-f]{64}", key), key
        return self.remembered_dir / f"{key}.json"

    def _read_remembered(self, key: str) -> Remembered | None:
        try:
            raw = json.loads(self._remembered_path(key).read_bytes())
            if raw["until"] < time.time():
                return None
            return Remembered.loads(raw["entry"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("unreadable idempotency record %s: %s", key, exc)
            return None

    def _write_remembered(self, key: str, entry: Remembered, seconds: float) -> None:
        payload = {"until": time.time() + seconds, "entry": entry.dumps()}
        write_bytes_atomic(self._remembered_path(key), json.dumps(payload).encode())

    async def remember(self, key: str, entry: Remembered, pending_seconds: float) -> Remembered | None:
        async with self._remember_lock:  # one process: the lock makes read-then-write atomic
            kept = await asyncio.to_thread(self._read_remembered, key)
            if kept is not None:
                return kept
            await asyncio.to_thread(self._write_remembered, key, entry, pending_seconds)
            return None

    async def complete(self, key: str, entry: Remembered, keep_seconds: float) -> None:
        async with self._remember_lock:
            kept = await asyncio.to_thread(self._read_remembered, key)
            if kept is not None and kept.token == entry.token:
                await asyncio.to_thread(self._write_remembered, key, entry, keep_seconds)

    async def forget(self, key: str, token: str) -> None:
        async with self._remember_lock:
            kept = await asyncio.to_thread(self._read_remembered, key)
            if kept is not None and kept.token == token:
                await asyncio.to_thread(self._remembered_path(key).unlink, True)

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
        """Append the event and, when asked, rewrite the record: only what a restart would otherwise get wrong.

        A record rewrite (fsynced, in a worker thread) is skipped while the job is unfinished and what a restart
        reads from it is unchanged (:func:`_restart_state`: a stage change such as ``downloading``, or an assembly's
        steps): the running job lives in memory, its record on disk only resumes it after a crash, and the next
        rewrite that matters carries the whole state anyway. A final write fsyncs the event log and the record
        before the final event is visible to anyone (subscribers, the cache of finished jobs)."""
        final = record and job.final
        if event is not None:
            if final:
                _append(self._log_path(job.id), event.log_line())
            else:
                self._add_event(job, event)
        if record and (event is None or final or self._written.get(job.id) != _restart_state(job)):
            lock = self._write_locks.setdefault(job.id, asyncio.Lock())
            async with lock:
                data = _record_bytes(job)
                await asyncio.to_thread(self._write_record, job.id, data, final and event is not None)
            self._written[job.id] = _restart_state(job)
        if final and event is not None:
            self._logs.setdefault(job.id, []).append(event)
            self._wake(job.id)
        if final and job.id in self._active:
            self._retire(job)

    def _log_path(self, job_id: str) -> Path:
        return self.outputs.path("jobs", job_id, ".events.jsonl")

    def _add_event(self, job: Job, event: Event) -> None:
        # A buffered append of one short line, done inline: it keeps events in order and costs microseconds.
        _append(self._log_path(job.id), event.log_line())
        self._logs.setdefault(job.id, []).append(event)
        self._wake(job.id)

    def _wake(self, job_id: str) -> None:
        waker = self._wakers.pop(job_id, None)
        if waker is not None and not waker.done():
            waker.set_result(None)

    def _write_record(self, job_id: str, data: bytes, sync_log: bool) -> None:
        """The record, atomically and fsynced; with ``sync_log``, the event log's appended lines first."""
        if sync_log:
            fd = os.open(self._log_path(job_id), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        write_bytes_atomic(self.outputs.path("jobs", job_id, ".json"), data)

    def _retire(self, job: Job) -> None:
        """A finished job leaves the active set (and its owner's places); its events move to the small cache."""
        (self.active_dir / job.id).unlink(missing_ok=True)
        self._active.pop(job.id, None)
        self._write_locks.pop(job.id, None)
        self._written.pop(job.id, None)
        self._remember(job, self._logs.pop(job.id, None))
        self._free_place(job)

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
        held = self._held.get(job.owner or "", ())
        if job.id not in self._queue and job.id not in held:
            return False
        if job.id in self._queue:
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
        return sum(1 for job in self._active.values() if job.owner == owner and not job.final)

    async def expire(self, finished_before: float, tombstone_until: float) -> list[str]:
        removed, owners = await asyncio.to_thread(self._expire, finished_before, tombstone_until)
        for job_id in removed:
            self._finished.pop(job_id, None)
        async with self._index_lock:
            await asyncio.to_thread(self._drop_from_indexes, owners)
        await asyncio.to_thread(self._expire_remembered)
        return removed

    def _drop_from_indexes(self, owners: dict[str | None, set[str]]) -> None:
        """Rewrite (atomically) the index of each owner that lost jobs, without their lines."""
        for owner, job_ids in owners.items():
            path = self._index_path(owner)
            try:
                lines = path.read_bytes().splitlines(keepends=True)
            except FileNotFoundError:
                continue
            kept = [line for line in lines if line.endswith(b"\n") and line[17:53].decode() not in job_ids]
            write_bytes_atomic(path, b"".join(kept))

    def _expire_remembered(self) -> None:
        """Drop idempotency records past their time (a record is rewritten whenever its expiry changes)."""
        if not self.remembered_dir.is_dir():
            return
        now = time.time()
        with os.scandir(self.remembered_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and self._read_remembered(entry.name[:-5]) is None:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < now - 60:  # not one being written right now
                            os.unlink(entry.path)

    def _expire(self, finished_before: float, tombstone_until: float) -> tuple[list[str], dict[str | None, set[str]]]:
        """One pass over the records (a directory scan; a finished record is last written when the job ends, so its
        mtime is its finish time) removing up to a batch of expired ones, then the tombstones that ran out.
        Returns the ids removed and, by owner, the ids to drop from the listing indexes."""
        self.expired_dir.mkdir(parents=True, exist_ok=True)
        removed: list[str] = []
        owners: dict[str | None, set[str]] = {}
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
                owners.setdefault(job.owner, set()).add(job_id)
                if len(removed) >= EXPIRE_BATCH:
                    return removed, owners
        now = time.time()
        with os.scandir(self.expired_dir) as tombstones:
            for entry in tombstones:
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < now:
                        os.unlink(entry.path)
        return removed, owners

    async def expired(self, job_id: str) -> bool:
        tombstone = self.expired_dir / job_id
        try:
            return (await asyncio.to_thread(tombstone.stat)).st_mtime >= time.time()
        except FileNotFoundError:
            return False


def _restart_state(job: Job) -> tuple[Any, ...]:
    """What a restart reads from an unfinished job's record: whether and when it started (its timeout runs from
    then), the prediction to poll again instead of creating another, a cancel asked for. The rest (stage, progress,
    retries) is shown while it runs, from memory, and written with the next record that changes one of these."""
    return (job.status == "queued", job.started_at, job.prediction_id, job.cancel_requested)


def _record_bytes(job: Job) -> bytes:
    """The record as compact JSON: json's C encoder, where an indented dump runs the pure-Python one (a tenth of a
    millisecond or more of the event loop per write, five writes a job)."""
    return json.dumps(job.record(), separators=(",", ":"), ensure_ascii=False).encode()


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)


def _lines_before(path: Path, before: str | None, count: int) -> list[str]:
    """Up to ``count`` index entries of a sorted index file, newest first, all smaller than ``before`` (from the
    end when None). A torn or malformed line (a crash mid-append) is skipped."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return []
    with handle:
        size = handle.seek(0, os.SEEK_END)
        end = size if before is None else _first_line_not_below(handle, size, before.encode())
        found: list[str] = []
        carry = b""
        while end > 0 and len(found) < count:
            start = max(0, end - READ_BLOCK)
            handle.seek(start)
            chunk = handle.read(end - start) + carry
            lines = chunk.split(b"\n")
            carry = lines.pop(0) if start > 0 else b""  # maybe the tail of a line that starts further back
            for line in reversed(lines):
                if INDEX_LINE.fullmatch(line) and (before is None or line < before.encode()):
                    found.append(line.decode())
                    if len(found) == count:
                        break
            end = start
        return found


def _first_line_not_below(handle: BinaryIO, size: int, key: bytes) -> int:
    """Binary search of a sorted line file: the offset of the first line >= ``key`` (``size`` if none)."""
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi) // 2
        start, line = _line_from(handle, mid)
        if start >= size or line >= key:
            hi = mid
        else:
            lo = mid + 1
    return _line_from(handle, lo)[0] if lo < size else size


def _line_from(handle: BinaryIO, offset: int) -> tuple[int, bytes]:
    """The first line starting at or after ``offset``: (its offset, its text without the newline)."""
    if offset > 0:
        handle.seek(offset - 1)
        handle.readline()  # to the end of the line ``offset`` falls in
    else:
        handle.seek(0)
    start = handle.tell()
    return start, handle.readline().rstrip(b"\n")
