"""Where webhooks out of jobs wait: one delivery record per job with a ``webhook_url``, kept in the job store's
place (a file per job, or Redis), and a schedule of the records due for work, claimed with a lease.

A record is written before its job exists, so no event of the job can be missed: the sender reads the job's own
event log after the record's ``cursor`` and turns each event that passes the filter into a delivery, in event
order. A record stays on the schedule until the job is final and every delivery is done (delivered, or given up
after the retry window), so a node killed between an event and its delivery loses nothing: another node (or this
one after a restart) claims the record once its lease lapses and carries on from the cursor.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis

from mvserver.core.artefacts import OutputStore

Record = dict[str, Any]

# KEYS: schedule. ARGV: now, lease until, limit -> ids due now, each pushed back to the lease's end (a claimer that
# dies leaves its records due again then).
CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


# KEYS: record, schedule, redeliveries asked. ARGV: record, due ('' none), now, keep seconds, job id. A record with
# nothing left is taken off the schedule (and kept a while), unless a redelivery was asked for meanwhile.
PUT = """
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
elseif redis.call('ZSCORE', KEYS[3], ARGV[5]) then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[5])
end
return 1
"""


class Outbox(Protocol):
    """Delivery records of jobs and the schedule of those due."""

    async def open(self) -> None: ...

    async def put(self, job_id: str, record: Record, due: float | None) -> None:
        """Save the record; with ``due``, (re)schedule it then, else take it off the schedule (all done)."""

    async def get(self, job_id: str) -> Record | None: ...

    async def wake(self, job_id: str) -> None:
        """Make a scheduled record due now (news of its job); nothing if it is not scheduled."""

    async def claim(self, limit: int, lease_seconds: float) -> list[str]:
        """Up to ``limit`` ids due now, each leased (pushed back ``lease_seconds``) to the caller."""

    async def ask_again(self, job_id: str, event_id: int) -> None:
        """Ask for the job's deliveries to be sent again from ``event_id`` on (kept apart from the record, which a
        sender may be writing meanwhile), and make the record due now."""

    async def take_ask(self, job_id: str) -> int | None:
        """The earliest event id asked for by :meth:`ask_again` since the last call, or None."""

    async def next_due(self) -> float | None:
        """When the earliest scheduled record is due, or None."""


class FileOutbox:
    """Records as JSON files under ``outputs/jobs/webhooks``; the schedule in memory, rebuilt at start-up."""

    def __init__(self, outputs: OutputStore):
        self.outputs = outputs
        self.dir = outputs.root / "jobs" / "webhooks"
        self._due: dict[str, float] = {}

    def _path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    async def open(self) -> None:
        self._due = await asyncio.to_thread(self._load_due)

    def _load_due(self) -> dict[str, float]:
        due: dict[str, float] = {}
        for path in self.dir.glob("*.json") if self.dir.is_dir() else []:
            try:
                record = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if record.get("due") is not None:
                due[path.stem] = float(record["due"])
        for path in self.dir.glob("*.again") if self.dir.is_dir() else []:
            due[path.stem] = 0.0
        return due

    async def put(self, job_id: str, record: Record, due: float | None) -> None:
        record["due"] = due
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        await self.outputs.write_json(self._path(job_id), record)  # atomic: temporary file, fsync, rename
        if due is None and (self.dir / f"{job_id}.again").exists():  # a redelivery asked for meanwhile (no await
            due = time.time()  # between this look and the schedule's change below)
        if due is None:
            self._due.pop(job_id, None)
        else:
            self._due[job_id] = due

    async def get(self, job_id: str) -> Record | None:
        try:
            return json.loads(await asyncio.to_thread(self._path(job_id).read_bytes))
        except FileNotFoundError:
            return None

    async def wake(self, job_id: str) -> None:
        if job_id in self._due:
            self._due[job_id] = min(self._due[job_id], time.time())

    async def claim(self, limit: int, lease_seconds: float) -> list[str]:
        now = time.time()
        ids = sorted((due, job_id) for job_id, due in self._due.items() if due <= now)[:limit]
        for _, job_id in ids:
            self._due[job_id] = now + lease_seconds
        return [job_id for _, job_id in ids]

    async def next_due(self) -> float | None:
        return min(self._due.values(), default=None)

    async def ask_again(self, job_id: str, event_id: int) -> None:
        path = self.dir / f"{job_id}.again"
        current = await self.take_ask(job_id)
        text = str(event_id if current is None else min(current, event_id))
        await self.outputs.write_bytes(path, text.encode())
        self._due[job_id] = time.time()

    async def take_ask(self, job_id: str) -> int | None:
        path = self.dir / f"{job_id}.again"
        try:
            text = await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            return None
        await asyncio.to_thread(path.unlink, missing_ok=True)
        return int(text)


class RedisOutbox:
    """Records as ``wh:<job id>`` strings and the schedule as the sorted set ``wh:due`` (score: when due)."""

    def __init__(self, r: aioredis.Redis, prefix: str, keep_seconds: float):
        self.r = r
        self.prefix = prefix
        self.keep_seconds = keep_seconds  # a finished record is kept this long (the deliveries of an old job)
        self._claim = r.register_script(CLAIM)
        self._put = r.register_script(PUT)

    def k(self, *parts: str) -> str:
        return self.prefix + "wh:" + ":".join(parts)

    async def open(self) -> None:
        return None

    async def put(self, job_id: str, record: Record, due: float | None) -> None:
        record["due"] = due
        await self._put(
            keys=[self.k(job_id), self.k("due"), self.k("again")],
            args=[json.dumps(record), "" if due is None else due, time.time(), int(self.keep_seconds), job_id],
        )

    async def get(self, job_id: str) -> Record | None:
        text = await self.r.get(self.k(job_id))
        return None if text is None else json.loads(text)

    async def wake(self, job_id: str) -> None:
        await self.r.zadd(self.k("due"), {job_id: time.time()}, xx=True, lt=True)

    async def claim(self, limit: int, lease_seconds: float) -> list[str]:
        now = time.time()
        return list(await self._claim(keys=[self.k("due")], args=[now, now + lease_seconds, limit]))

    async def next_due(self) -> float | None:
        first = await self.r.zrange(self.k("due"), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def ask_again(self, job_id: str, event_id: int) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.zadd(self.k("again"), {job_id: event_id}, lt=True)
            pipe.zadd(self.k("again"), {job_id: event_id}, nx=True)
            pipe.zadd(self.k("due"), {job_id: time.time()})
            await pipe.execute()

    async def take_ask(self, job_id: str) -> int | None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.zscore(self.k("again"), job_id)
            pipe.zrem(self.k("again"), job_id)
            score, _ = await pipe.execute()
        return None if score is None else int(score)
