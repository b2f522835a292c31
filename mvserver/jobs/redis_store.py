"""The job store for several processes: records, event logs, claims, leases and signals in one Redis (>= 6.2).

Keys (all under a prefix, ``mv:`` by default):

- ``job:<id>``    hash: ``rec`` (the record as JSON), ``status``, ``last`` (last event id), ``cancel``, ``epoch``
- ``ev:<id>``     stream: the job's events with explicit ids ``0-<n>``, so SSE ids stay 1..n and Redis itself
  refuses a repeated or smaller id
- ``lease:<id>``  ``node:epoch`` of the node running the job, with a TTL; renewed by a compare-and-renew script
- ``dispatch``    stream + consumer group ``nodes``: one entry per job to run; a node reads one only with a free
  slot, and takes over entries a dead node left pending (XAUTOCLAIM once idle longer than a lease)
- ``finished``    sorted set of finished job ids by finish time (retention); ``tomb:<id>`` marks an expired id
- ``active:<key id>`` set: ids of the jobs an API key created, pruned of finished ones when counted
- ``running:<key id>`` set: the key's admitted unfinished jobs (a job with a ``running_cap``, ``cap`` in its hash);
  ``held:<key id>`` list: its jobs waiting, in order, until fewer than their cap are admitted; ``holding`` set: the
  keys with held jobs. One script (``ADMIT``) prunes finished jobs from ``running`` and moves held jobs to
  ``dispatch`` while there is room: run in the creation transaction, after each such job ends, and for every key in
  ``holding`` at each claim interval (so a process that died between a job's end and its script loses nothing)
- ``index:<key id>`` (``index:-`` with keys off) sorted set of the owner's job entries (creation time in
  microseconds, then the id; all scores 0, so they sort as text): a listing page is one ZREVRANGEBYLEX
- ``idem:<hash>``  what an ``Idempotency-Key`` answered (its reserving request's token first), with a TTL
- channel ``node:<node>``: signals (cancel, provider updates) to the node that owns a job; channel ``evn:<id>``:
  ``<event id> <event name>`` of each event the moment it is appended (published by the same script), to the nodes
  that follow the job (each node subscribes to the jobs its subscribers wait on, on one connection)

Every write of an owner goes through one Lua script that checks the lease first, so a node that lost its lease
(paused, partitioned) cannot write anything. Blocking reads use a client without a socket timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from mvserver.core.errors import StoreUnavailable, store_unavailable
from mvserver.jobs.model import FINAL_STATUSES, Event, Job
from mvserver.jobs.store import Lease, LeaseLost, SignalHandler, index_entry, owner_slot
from mvserver.jobs.usage_store import RedisUsageBook
from mvserver.web.access.idempotency import Remembered

log = logging.getLogger("mvserver.jobs")

GROUP = "nodes"
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
WATCH_IDLE_SECONDS = 60.0
EXPIRE_BATCH = 500
RETRY_PAUSE = 0.25
FORGET_EVERY_SECONDS = 1.0  # how often the event reader looks for jobs nobody follows any more
IDLE_CONSUMER_SECONDS = 3600.0  # a dispatch consumer (a node) idle this long, with nothing pending, is dropped

# Stream replies as our clients get them (decode_responses=True, RESP2), which redis-py's reply types cannot express:
# [(stream, [(entry id, fields), ...]), ...]; XREADGROUP gives None as the fields of an entry deleted meanwhile.
Claimed = list[tuple[str, list[tuple[str, dict[str, str] | None]]]]
Entries = list[tuple[str, dict[str, str]]]

# KEYS: lease, job, events, finished. ARGV: token, event id ('' none), name, data, rec, status, finished_at, job id,
# the job's event channel.
# An event id the log already has is the owner's own write retried after a lost reply: it is not appended twice.
WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[2], 'last') or '0') then
  redis.call('XADD', KEYS[3], '0-' .. ARGV[2], 'e', ARGV[3], 'd', ARGV[4])
  redis.call('HSET', KEYS[2], 'last', ARGV[2])
  redis.call('PUBLISH', ARGV[9], ARGV[2] .. ' ' .. ARGV[3])
end
redis.call('HSET', KEYS[2], 'rec', ARGV[5], 'status', ARGV[6])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8]) end
return 1
"""

# KEYS: lease, job, events, finished. ARGV: expected last id, event id, name, data, rec, status, finished_at, job id,
# the job's event channel
FINISH_UNCLAIMED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('HGET', KEYS[2], 'status') ~= 'queued' then return 0 end
if redis.call('HGET', KEYS[2], 'last') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[3], '0-' .. ARGV[2], 'e', ARGV[3], 'd', ARGV[4])
redis.call('HSET', KEYS[2], 'last', ARGV[2], 'rec', ARGV[5], 'status', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8])
redis.call('PUBLISH', ARGV[9], ARGV[2] .. ' ' .. ARGV[3])
return 1
"""

# KEYS: lease, job. ARGV: node, ttl ms. -> {0} gone or final, {1} owned by a live node, {2, token, rec, last, cancel}
ACQUIRE = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status or status == 'succeeded' or status == 'failed' or status == 'canceled' then return {0} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {1} end
local token = ARGV[1] .. ':' .. redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
local job = redis.call('HMGET', KEYS[2], 'rec', 'last', 'cancel')
return {2, token, job[1], job[2], job[3] or ''}
"""

# KEYS: lease, dispatch, job. ARGV: token, ttl ms, group, node, entry id. -> 0 lost, 1 renewed, 2 renewed + cancel
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[5] ~= '' then redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[5], 'JUSTID') end
if redis.call('HGET', KEYS[3], 'cancel') == '1' then return 2 end
return 1
"""

# KEYS: lease, dispatch. ARGV: token, group, entry id, done ('1'/'0'), job id
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
  redis.call('XDEL', KEYS[2], ARGV[3])
end
if ARGV[4] == '0' then redis.call('XADD', KEYS[2], '*', 'j', ARGV[5]) end
return 1
"""

# KEYS: finished, job, events, tomb, owner index. ARGV: job id, tombstone expiry (unix ms), index entry
EXPIRE_ONE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[4], '1', 'PXAT', ARGV[2])
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[5], ARGV[3]) end
return 1
"""

# KEYS: running, held, dispatch, holding. ARGV: job key prefix, owner. -> how many held jobs were admitted.
ADMIT = """
local function unfinished(id)
  local status = redis.call('HGET', ARGV[1] .. id, 'status')
  return status == 'queued' or status == 'running'
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not unfinished(id) then redis.call('SREM', KEYS[1], id) end
end
local admitted = 0
while true do
  local id = redis.call('LINDEX', KEYS[2], 0)
  if not id then break end
  if unfinished(id) then
    local cap = tonumber(redis.call('HGET', ARGV[1] .. id, 'cap'))
    if cap and redis.call('SCARD', KEYS[1]) >= cap then break end
    redis.call('SADD', KEYS[1], id)
    redis.call('XADD', KEYS[3], '*', 'j', id)
    admitted = admitted + 1
  end
  redis.call('LPOP', KEYS[2])
end
if redis.call('LLEN', KEYS[2]) == 0 then redis.call('SREM', KEYS[4], ARGV[2]) end
return admitted
"""

# KEYS: running, held. ARGV: job key prefix. -> {admitted unfinished, held unfinished}
PLACES = """
local function unfinished(id)
  local status = redis.call('HGET', ARGV[1] .. id, 'status')
  return status == 'queued' or status == 'running'
end
local admitted, held = 0, 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do if unfinished(id) then admitted = admitted + 1 end end
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do if unfinished(id) then held = held + 1 end end
return {admitted, held}
"""

# KEYS: idempotency record. ARGV: token (32 hex), new value, TTL ms. Replace or drop only the holder's reservation.
COMPLETE = """
local kept = redis.call('GET', KEYS[1])
if not kept or string.sub(kept, 1, 32) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


def _event(entry_id: str, fields: dict[str, str]) -> Event:
    return Event(
        id=int(entry_id.partition("-")[2]), event=fields["e"], data=json.loads(fields["d"]), data_json=fields["d"]
    )


def redacted(url: str) -> str:
    """The URL without a password, for log and error lines."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


class RedisJobStore:
    """Jobs shared by every node on one Redis; implements :class:`~mvserver.jobs.store.JobStore`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "mv:",
        lease_seconds: float = 30.0,
        claim_interval_seconds: float = 5.0,
        node: str | None = None,
    ):
        self.url = url
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.claim_interval = claim_interval_seconds
        self.node = node or uuid.uuid4().hex[:12]
        self._lease_ms = max(1, int(lease_seconds * 1000))
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            protocol=2,
            max_connections=64,
            timeout=None,
            socket_timeout=5,
            socket_connect_timeout=3,
        )
        self.r = aioredis.Redis(connection_pool=pool)
        # Blocking reads (claims, the event reader, signals) wait as long as they like: no socket timeout.
        self.blocking = aioredis.Redis.from_url(
            url, decode_responses=True, protocol=2, socket_timeout=None, socket_connect_timeout=3
        )
        self._write = self.r.register_script(WRITE)
        self._finish_unclaimed = self.r.register_script(FINISH_UNCLAIMED)
        self._acquire = self.r.register_script(ACQUIRE)
        self._renew = self.r.register_script(RENEW)
        self._release = self.r.register_script(RELEASE)
        self._expire_one = self.r.register_script(EXPIRE_ONE)
        self._complete = self.r.register_script(COMPLETE)
        self._admit = self.r.register_script(ADMIT)
        self._places = self.r.register_script(PLACES)
        self._deadlines: dict[str, float] = {}  # lease token -> monotonic time it surely lapsed by
        self._wakers: dict[str, asyncio.Future[None]] = {}
        self._watch: dict[str, int] = {}  # job id -> last event id the reader has seen (reads after it)
        self._wanted: dict[str, float] = {}  # job id -> when a subscriber last waited on it
        self._events: aioredis.client.PubSub | None = None  # the event reader's subscriptions, while connected
        self._handler: SignalHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._autoclaim_at = 0.0
        self._autoclaim_cursor = "0-0"
        self._closing = False
        self._pokes: set[asyncio.Task[Any]] = set()  # (un)subscriptions and catch-up reads in flight
        self._forgot_at = 0.0
        self._book = RedisUsageBook(self.r, prefix)

    def usage_book(self) -> RedisUsageBook:
        """The ledger, spending and duration estimates in this Redis (``usage:*``, ``spend:*``, ``eta:*``)."""
        return self._book

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- life cycle -------------------------------------------------------------------------------------------

    async def open(self) -> int:
        try:
            await self.r.ping()
            await self._ensure_group()
            await self._drop_dead_consumers()
            unfinished = await self.r.xlen(self.k("dispatch"))
        except UNAVAILABLE as exc:
            await self._close_clients()
            raise StoreUnavailable(f"cannot reach Redis at {redacted(self.url)}: {exc}") from None
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_events(), name="redis-event-reader"),
            loop.create_task(self._listen(), name="redis-signals"),
        ]
        log.info(
            "job store: Redis at %s (node %s, prefix %r); %d job(s) queued or running in the cluster",
            redacted(self.url),
            self.node,
            self.prefix,
            unfinished,
        )
        return 0  # nothing to queue again: unfinished jobs stay in the dispatch stream for whichever node is free

    async def _drop_dead_consumers(self) -> None:
        """Forget the dispatch consumers of nodes gone long ago (nothing pending: their entries were taken over). A
        live node reads every claim interval, so it is never that idle; were it dropped, its next read recreates it."""
        idle_ms = max(IDLE_CONSUMER_SECONDS, 10 * (self.lease_seconds or 0)) * 1000
        for consumer in await self.r.xinfo_consumers(self.k("dispatch"), GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > idle_ms and consumer["name"] != self.node:
                await self.r.xgroup_delconsumer(self.k("dispatch"), GROUP, consumer["name"])

    async def ping(self) -> None:
        await self.r.ping()

    async def _ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.r.xgroup_create(self.k("dispatch"), GROUP, id="0", mkstream=True)

    async def close(self) -> None:
        self._closing = True
        for waker in self._wakers.values():
            if not waker.done():
                waker.set_result(None)
        self._wakers.clear()
        for task in [*self._tasks, *self._pokes]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._pokes, return_exceptions=True)
        await self._close_clients()

    async def _close_clients(self) -> None:
        with contextlib.suppress(Exception):
            await self.blocking.aclose()
        with contextlib.suppress(Exception):
            await self.r.aclose()

    # -- records ----------------------------------------------------------------------------------------------

    async def create(self, job: Job, event: Event) -> None:
        capped = job.owner is not None and job.running_cap is not None
        fields: dict[EncodableT, EncodableT] = {"rec": json.dumps(job.record()), "status": job.status, "last": event.id}
        if capped:
            assert job.running_cap is not None
            fields["cap"] = job.running_cap
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k("job", job.id), mapping=fields)
            pipe.xadd(self.k("ev", job.id), {"e": event.event, "d": event.data_json}, id=f"0-{event.id}")
            if job.owner is not None:
                pipe.sadd(self.k("active", job.owner), job.id)
            pipe.zadd(self.k("index", owner_slot(job.owner)), {_entry(job): 0})
            if capped:
                assert job.owner is not None
                pipe.rpush(self.k("held", job.owner), job.id)  # behind the key's held jobs, then admitted if
                pipe.sadd(self.k("holding"), job.owner)  # there is room, in the same transaction
                await self._admit(keys=self._place_keys(job.owner), args=[self.k("job", ""), job.owner], client=pipe)
            else:
                pipe.xadd(self.k("dispatch"), {"j": job.id})
            await _unavailable_as_503(pipe.execute())

    # -- a key's running places ---------------------------------------------------------------------------------

    def _place_keys(self, owner: str) -> list[str]:
        return [self.k("running", owner), self.k("held", owner), self.k("dispatch"), self.k("holding")]

    async def _free_place(self, job: Job) -> None:
        """A capped job ended: the next held jobs of its owner get in (if this fails, the claim loop's sweep does
        it within a claim interval)."""
        if job.owner is None or job.running_cap is None:
            return
        try:
            await self._admit(keys=self._place_keys(job.owner), args=[self.k("job", ""), job.owner])
        except UNAVAILABLE as exc:
            log.warning("job %s: could not admit its key's next job yet (%s)", job.id, exc)

    async def _admit_held(self) -> None:
        """Admit what can be admitted for every key with held jobs."""
        for owner in cast(set[str], await self.r.smembers(self.k("holding"))):
            await self._admit(keys=self._place_keys(owner), args=[self.k("job", ""), owner])

    async def count_places(self, owner: str) -> tuple[int, int]:
        admitted, held = await _unavailable_as_503(
            self._places(keys=[self.k("running", owner), self.k("held", owner)], args=[self.k("job", "")])
        )
        return int(admitted), int(held)

    async def index(self, owner: str | None, before: str | None, count: int) -> list[str]:
        top = "+" if before is None else "(" + before
        return await _unavailable_as_503(
            self.r.zrevrangebylex(self.k("index", owner_slot(owner)), top, "-", start=0, num=count)
        )

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.k("job", job_id), "rec", "last", "cancel")
            replies = await _unavailable_as_503(pipe.execute())
        return [self._job(*reply) for reply in replies]

    async def remember(self, key: str, entry: Remembered, pending_seconds: float) -> Remembered | None:
        name = self.k("idem", key)
        while True:
            if await _unavailable_as_503(
                self.r.set(name, _remembered(entry), nx=True, px=max(1, int(pending_seconds * 1000)))
            ):
                return None
            kept = await _unavailable_as_503(self.r.get(name))
            if kept is not None:  # else it lapsed in between: try again
                return Remembered.loads(kept[32:])

    async def complete(self, key: str, entry: Remembered, keep_seconds: float) -> None:
        await _unavailable_as_503(
            self._complete(keys=[self.k("idem", key)], args=[entry.token, _remembered(entry), int(keep_seconds * 1000)])
        )

    async def forget(self, key: str, token: str) -> None:
        await _unavailable_as_503(self._complete(keys=[self.k("idem", key)], args=[token, "", 0]))

    async def get(self, job_id: str) -> Job | None:
        rec, last, cancel = await _unavailable_as_503(self.r.hmget(self.k("job", job_id), "rec", "last", "cancel"))
        return self._job(rec, last, cancel)

    @staticmethod
    def _job(rec: str | None, last: str | None, cancel: str | None) -> Job | None:
        if rec is None:
            return None
        job = Job.from_record(json.loads(rec))
        job.last_event_id = int(last or 0)
        job.cancel_requested = job.cancel_requested or cancel == "1"
        return job

    async def write(self, lease: Lease, job: Job, event: Event | None, *, record: bool) -> None:
        """Event and record in one fenced script (the record is always saved: it is one small hash field, and
        every node then answers ``GET /jobs/{id}`` with the latest progress). Redis unreachable: retried until
        the lease has surely lapsed, then :class:`LeaseLost`."""
        args = [
            "" if event is None else event.id,
            event.event if event else "",
            event.data_json if event else "",
            json.dumps(job.record()),
            job.status,
            job.finished_at or "" if job.final else "",
            job.id,
            self.k("evn", job.id),
        ]
        keys = [self.k("lease", job.id), self.k("job", job.id), self.k("ev", job.id), self.k("finished")]
        while True:
            try:
                written = await self._write(keys=keys, args=[lease.token, *args])
                break
            except UNAVAILABLE as exc:
                if time.monotonic() > self._deadlines.get(lease.token, 0):
                    self._deadlines.pop(lease.token, None)
                    raise LeaseLost(f"Redis unreachable past the lease: {exc}") from None
                await asyncio.sleep(RETRY_PAUSE)
        if not written:
            self._deadlines.pop(lease.token, None)
            raise LeaseLost(f"job {job.id}: lease {lease.token} is no longer held")
        if event is not None:
            self._news(job.id, event.id, event.event)  # this node's subscribers need no round trip
        if job.final and record:
            await self._free_place(job)

    async def count_active(self, owner: str) -> int:
        """From ``active:<owner>``, the set of the key's job ids added at creation: ids whose job is final (or
        gone) are dropped on the way, so the set stays as small as the key's running jobs plus those finished
        since its last count (each job creation of the key counts)."""
        key = self.k("active", owner)
        ids = await _unavailable_as_503(self.r.smembers(key))
        if not ids:
            return 0
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.k("job", job_id), "status")
            statuses = await _unavailable_as_503(pipe.execute())
        done = [job_id for job_id, status in zip(ids, statuses, strict=False) if status not in ("queued", "running")]
        if done:
            await _unavailable_as_503(self.r.srem(key, *done))
        return len(ids) - len(done)

    # -- claiming ---------------------------------------------------------------------------------------------

    async def claim(self, limit: int = 1) -> list[tuple[Job, Lease]]:
        """Wait for jobs: new dispatch entries, or (every claim interval) ones a dead node left pending."""
        failures = 0
        while True:
            if self._closing:
                raise asyncio.CancelledError()
            try:
                claimed = await self._claim_once(limit)
                failures = 0
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # Redis restarted empty
                continue
            except UNAVAILABLE as exc:
                failures += 1
                if failures == 1:
                    log.warning("job store: Redis unreachable (%s); retrying", exc)
                await asyncio.sleep(min(2.0, RETRY_PAUSE * failures))
                continue
            if claimed:
                return claimed

    async def _claim_once(self, limit: int) -> list[tuple[Job, Lease]]:
        now = time.monotonic()
        if now >= self._autoclaim_at:
            self._autoclaim_at = now + self.claim_interval
            await self._admit_held()
            cursor, entries, *_ = await self.r.xautoclaim(
                self.k("dispatch"), GROUP, self.node, self._lease_ms, start_id=self._autoclaim_cursor, count=limit
            )
            self._autoclaim_cursor = cursor
            if cursor != "0-0":
                self._autoclaim_at = now  # there may be more: look again at once
            claimed = await self._take_all(entries)
            for job, _ in claimed:
                log.info("job %s: taken over from a node whose lease lapsed", job.id)
            if claimed:
                return claimed
        block_ms = max(1, int((self._autoclaim_at - time.monotonic()) * 1000))
        reply = cast(
            Claimed | None,
            await self.blocking.xreadgroup(GROUP, self.node, {self.k("dispatch"): ">"}, count=limit, block=block_ms),
        )
        return await self._take_all([entry for _, entries in reply or [] for entry in entries])

    async def _take_all(self, entries: list[tuple[str, dict[str, str] | None]]) -> list[tuple[Job, Lease]]:
        taken = await asyncio.gather(*(self._take(entry_id, fields) for entry_id, fields in entries))
        return [claim for claim in taken if claim is not None]

    async def _take(self, entry_id: str, fields: dict[str, str] | None) -> tuple[Job, Lease] | None:
        job_id = (fields or {}).get("j")
        dispatch = self.k("dispatch")
        if not job_id:
            await self.r.xack(dispatch, GROUP, entry_id)
            await self.r.xdel(dispatch, entry_id)
            return None
        reply = await self._acquire(
            keys=[self.k("lease", job_id), self.k("job", job_id)], args=[self.node, self._lease_ms]
        )
        if reply[0] == 0:  # gone or already final: nothing to run
            await self.r.xack(dispatch, GROUP, entry_id)
            await self.r.xdel(dispatch, entry_id)
            return None
        if reply[0] == 1:  # its owner is alive (and will claim the entry back when it renews)
            return None
        _, token, rec, last, cancel = reply
        job = self._job(rec, last, cancel)
        assert job is not None
        self._deadlines[token] = time.monotonic() + self.lease_seconds
        return job, Lease(job_id, token, entry_id)

    async def renew(self, lease: Lease) -> bool:
        try:
            renewed = await self._renew(
                keys=[self.k("lease", lease.job_id), self.k("dispatch"), self.k("job", lease.job_id)],
                args=[lease.token, self._lease_ms, GROUP, self.node, lease.ref],
            )
        except UNAVAILABLE as exc:
            alive = time.monotonic() < self._deadlines.get(lease.token, 0)
            log.warning("job %s: cannot renew the lease (%s)%s", lease.job_id, exc, "" if alive else "; it lapsed")
            return alive
        if not renewed:
            self._deadlines.pop(lease.token, None)
            return False
        self._deadlines[lease.token] = time.monotonic() + self.lease_seconds
        if renewed == 2 and self._handler is not None:  # a cancel whose notification was missed
            await self._handler(lease.job_id, "cancel", {})
        return True

    async def release(self, lease: Lease, *, done: bool) -> None:
        """Final: the dispatch entry is acknowledged and deleted. Not final (shutdown): the job is queued again at
        once, so another node (or this one after a restart) resumes it."""
        self._deadlines.pop(lease.token, None)
        await self._release(
            keys=[self.k("lease", lease.job_id), self.k("dispatch")],
            args=[lease.token, GROUP, lease.ref, "1" if done else "0", lease.job_id],
        )

    async def finish_unclaimed(self, job: Job, event: Event) -> bool:
        keys = [self.k("lease", job.id), self.k("job", job.id), self.k("ev", job.id), self.k("finished")]
        args: list[EncodableT] = [
            event.id - 1,
            event.id,
            event.event,
            event.data_json,
            json.dumps(job.record()),
            job.status,
            job.finished_at or time.time(),
            job.id,
            self.k("evn", job.id),
        ]
        finished = bool(await _unavailable_as_503(self._finish_unclaimed(keys=keys, args=args)))
        if finished:
            self._news(job.id, event.id, event.event)
            await self._free_place(job)
        return finished

    # -- events -----------------------------------------------------------------------------------------------

    async def events(self, job_id: str, after: int) -> list[Event]:
        entries = await _unavailable_as_503(self.r.xrange(self.k("ev", job_id), min=f"(0-{after}", max="+"))
        return [_event(entry_id, fields) for entry_id, fields in entries]

    def next_event(self, job_id: str, after: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        seen = self._watch.get(job_id)
        if self._closing or (seen is not None and seen > after):
            done = loop.create_future()
            done.set_result(None)
            return done
        self._wanted[job_id] = time.monotonic()
        waker = self._wakers.get(job_id)
        if waker is None:
            waker = self._wakers[job_id] = loop.create_future()
        if seen is None:  # a job the reader does not follow yet: subscribe to its events
            self._watch[job_id] = after
            self._spawn(self._subscribe(job_id))
        return waker

    def _spawn(self, call: Any) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._pokes.add(task)
        task.add_done_callback(self._pokes.discard)

    async def _subscribe(self, job_id: str) -> None:
        """Subscribe the reader to the job's channel; the reader catches up once Redis confirms (see there)."""
        pubsub = self._events
        if pubsub is not None and job_id in self._watch:
            with contextlib.suppress(*UNAVAILABLE):  # the reader resubscribes every followed job when it reconnects
                await pubsub.subscribe(self.k("evn", job_id))

    async def _unsubscribe(self, job_id: str) -> None:
        pubsub = self._events
        if pubsub is not None and job_id not in self._watch:
            with contextlib.suppress(*UNAVAILABLE):
                await pubsub.unsubscribe(self.k("evn", job_id))

    async def _catch_up(self, job_id: str) -> None:
        """Once subscribed: every later event is published to us, an earlier one is in the log. Read its last."""
        with contextlib.suppress(*UNAVAILABLE):
            for entry_id, fields in cast(Entries, await self.r.xrevrange(self.k("ev", job_id), count=1)):
                self._news(job_id, int(entry_id.partition("-")[2]), fields.get("e", ""))

    def _news(self, job_id: str, event_id: int, name: str) -> None:
        """The job has an event ``event_id`` (``name``): wake its subscribers on this node if it is news to them."""
        seen = self._watch.get(job_id)
        if seen is None or event_id <= seen:
            return
        self._watch[job_id] = event_id
        waker = self._wakers.pop(job_id, None)
        if waker is not None and not waker.done():
            waker.set_result(None)
        if name in FINAL_STATUSES:
            self._forget(job_id)

    async def _read_events(self) -> None:
        """The node's one reader of job events: one pub/sub connection subscribed to the event channel of every
        followed job (and to a channel of its own, so it is never without one); each message resolves the shared
        future of its job. A job subscribed to (again, after a reconnect) is caught up from its log once Redis
        confirms the subscription, so no event between a subscriber's read and the subscription is missed."""
        own = self.k("evn", "node", self.node)
        events_prefix = self.k("evn", "")
        failures = 0
        while not self._closing:
            try:
                async with self.blocking.pubsub() as pubsub:
                    await pubsub.subscribe(own, *(events_prefix + job_id for job_id in self._watch))
                    self._events = pubsub
                    missing = [events_prefix + j for j in self._watch if events_prefix + j not in pubsub.channels]
                    if missing:  # followed while the first subscription was on its way
                        await pubsub.subscribe(*missing)
                    async for message in pubsub.listen():
                        failures = 0
                        channel = message.get("channel") or ""
                        if channel == own or not channel.startswith(events_prefix):
                            continue
                        job_id = channel[len(events_prefix) :]
                        if message["type"] == "subscribe":
                            self._spawn(self._catch_up(job_id))
                        elif message["type"] == "message":
                            event_id, _, name = str(message["data"]).partition(" ")
                            if event_id.isdigit():
                                self._news(job_id, int(event_id), name)
                        self._forget_idle()
            except UNAVAILABLE as exc:
                failures += 1
                if failures == 1:
                    log.warning("job store: event reader lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(min(2.0, RETRY_PAUSE * failures))
            finally:
                self._events = None

    def _forget(self, job_id: str) -> None:
        self._watch.pop(job_id, None)
        self._wanted.pop(job_id, None)
        self._spawn(self._unsubscribe(job_id))

    def _forget_idle(self) -> None:
        """Stop following jobs nobody waited on for a while (their subscribers left); looked at once a second."""
        now = time.monotonic()
        if now - self._forgot_at < FORGET_EVERY_SECONDS:
            return
        self._forgot_at = now
        cutoff = now - WATCH_IDLE_SECONDS
        for job_id in [j for j, at in self._wanted.items() if at < cutoff and j not in self._wakers]:
            self._forget(job_id)

    # -- signals ----------------------------------------------------------------------------------------------

    def on_signal(self, handler: SignalHandler) -> None:
        self._handler = handler

    async def signal(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        if name == "cancel":
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.exists(self.k("job", job_id))
                pipe.hset(self.k("job", job_id), "cancel", "1")
                exists, _ = await _unavailable_as_503(pipe.execute())
            if not exists:
                await self.r.delete(self.k("job", job_id))
                return
        token = await _unavailable_as_503(self.r.get(self.k("lease", job_id)))
        if token is None:
            return  # nobody runs it now: a later claimer sees the cancel flag
        node = token.rpartition(":")[0]
        if node == self.node:
            if self._handler is not None:
                await self._handler(job_id, name, data)
            return
        payload = json.dumps({"job": job_id, "name": name, "data": data})
        await _unavailable_as_503(self.r.publish(self.k("node", node), payload))

    async def _listen(self) -> None:
        """Signals to this node, on its own channel; resubscribes after Redis comes back (a cancel missed meanwhile
        is still seen at the next lease renewal, through the record's flag)."""
        while not self._closing:
            try:
                async with self.blocking.pubsub() as pubsub:
                    await pubsub.subscribe(self.k("node", self.node))
                    async for message in pubsub.listen():
                        if message.get("type") != "message" or self._handler is None:
                            continue
                        signal = json.loads(message["data"])
                        await self._handler(signal["job"], signal["name"], signal.get("data") or {})
            except UNAVAILABLE:
                await asyncio.sleep(0.5)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("job store: malformed signal ignored: %s", exc)

    # -- retention --------------------------------------------------------------------------------------------

    async def expire(self, finished_before: float, tombstone_until: float) -> list[str]:
        ids = cast(
            list[str],
            await self.r.zrangebyscore(self.k("finished"), "-inf", finished_before, start=0, num=EXPIRE_BATCH),
        )
        jobs = await self.get_many(ids) if ids else []
        removed = []
        for job_id, job in zip(ids, jobs, strict=False):
            keys = [
                self.k("finished"),
                self.k("job", job_id),
                self.k("ev", job_id),
                self.k("tomb", job_id),
                self.k("index", owner_slot(job.owner if job else None)),
            ]
            entry = _entry(job) if job is not None else ""
            if await self._expire_one(keys=keys, args=[job_id, int(tombstone_until * 1000), entry]):
                removed.append(job_id)
        return removed

    async def expired(self, job_id: str) -> bool:
        return bool(await _unavailable_as_503(self.r.exists(self.k("tomb", job_id))))


def _entry(job: Job) -> str:
    return index_entry(int(job.created_at * 1_000_000), job.id)


def _remembered(entry: Remembered) -> str:
    """The stored form: the holder's token (32 characters) first, so the scripts compare it without JSON."""
    assert len(entry.token) == 32, "tokens are 32 hex characters"
    return entry.token + entry.dumps()


async def _unavailable_as_503(call: Any) -> Any:
    """A request that needs Redis while it is unreachable answers 503, not a stack trace."""
    try:
        return await call
    except UNAVAILABLE as exc:
        raise store_unavailable(exc) from None
