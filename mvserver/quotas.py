"""Per-key quotas (with keys on): token buckets on job creation, the blocking endpoints and uploads, a running-jobs
cap.

The buckets sit behind :class:`RateLimiter` (one method): :class:`LocalRateLimiter` keeps them in the process,
:class:`RedisRateLimiter` in Redis, shared by every process that uses the same server (plug it in with
:func:`set_rate_limiter`). The running-jobs cap needs the job engine: it plugs in :class:`JobPlaces`, which counts
and reserves in one atomic step (so requests racing on several nodes cannot all pass the cap) with
:func:`set_job_places` (or a plain counter, not atomic, with :func:`set_running_jobs_counter`).

A charge of the ``jobs`` bucket answers the ids the new jobs must be created with: on the cap, those ids hold the
key's places from the check until their jobs exist (the store swaps a reservation for its job atomically), or until
``RESERVATION_SECONDS`` pass (a request that died in between).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, Protocol

from aiohttp import web

from .auth import API_KEY, KeyRecord
from .errors import ApiError
from .storage import new_id

if TYPE_CHECKING:
    from redis.asyncio import Redis

Bucket = Literal["jobs", "blocking"]
RunningJobs = Callable[[str], "int | Awaitable[int]"]
RUNNING_JOBS_RETRY_AFTER = 10.0  # seconds a client is told to wait when its running-jobs cap is reached
RESERVATION_SECONDS = 60.0  # a reserved job id holds its place this long unless its job is created sooner


class JobPlaces(Protocol):
    """The running-jobs cap's count and admission in one step (the job engine, on its store)."""

    async def reserve(self, owner: str, job_ids: list[str], cap: int, seconds: float) -> int | None:
        """If ``owner``'s queued and running jobs plus its live reservations, plus ``len(job_ids)``, stay within
        ``cap``: reserve ``job_ids`` (each until its job is created, at most ``seconds``) and answer None; else
        answer that count and reserve nothing. Atomic: concurrent calls on any node never pass ``cap`` together."""

    async def unreserve(self, owner: str, job_ids: list[str]) -> None:
        """Give back reservations whose jobs will not be created (the request was refused after all)."""


class CountingPlaces:
    """A plain ``running_jobs(key_id)`` counter as :class:`JobPlaces`: it counts, it does not reserve (so two
    requests racing may pass the cap together); for counters other than the job engine's."""

    def __init__(self, running_jobs: RunningJobs):
        self.running_jobs = running_jobs

    async def reserve(self, owner: str, job_ids: list[str], cap: int, seconds: float) -> int | None:
        running = self.running_jobs(owner)
        if inspect.isawaitable(running):
            running = await running
        return running if running + len(job_ids) > cap else None

    async def unreserve(self, owner: str, job_ids: list[str]) -> None:
        pass


class RateLimiter(Protocol):
    async def acquire(self, name: str, rate: float, burst: int, cost: int = 1) -> float:
        """Take ``cost`` tokens (at most ``burst``) from bucket ``name`` (refilled at ``rate`` tokens/s up to
        ``burst``), all or none.

        Returns 0 when they were taken, else the seconds until they will be available (nothing taken).
        """


class LocalRateLimiter:
    """Token buckets in this process; one entry per key and bucket (keys come from the keys file, so few)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._buckets: dict[str, tuple[float, float]] = {}
        self._clock = clock

    async def acquire(self, name: str, rate: float, burst: int, cost: int = 1) -> float:
        now = self._clock()
        tokens, stamp = self._buckets.get(name, (float(burst), now))
        tokens = min(float(burst), tokens + (now - stamp) * rate)
        if tokens >= cost:
            self._buckets[name] = (tokens - cost, now)
            return 0.0
        self._buckets[name] = (tokens, now)
        return (cost - tokens) / rate


# One atomic take: refill by the time elapsed (Redis's own clock, so processes need not agree on time), then take a
# token or answer the wait. The bucket expires once it would be full again, so idle keys cost no memory.
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3] or '1')
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisRateLimiter:
    """Token buckets in Redis (a hash per key and bucket, updated by one Lua script), shared across processes."""

    def __init__(self, client: "Redis", prefix: str = "mv:bucket:"):
        self.prefix = prefix
        self._take: Any = client.register_script(_TAKE)

    async def acquire(self, name: str, rate: float, burst: int, cost: int = 1) -> float:
        return float(await self._take(keys=[self.prefix + name], args=[repr(float(rate)), burst, cost]))


class Quotas:
    """The limiter and the optional running-jobs counter of one app."""

    def __init__(self, limiter: RateLimiter, on_refusal: Callable[[str, str], None] | None = None):
        self.limiter = limiter
        self.places: JobPlaces | None = None
        self.on_refusal = on_refusal

    def _refuse(self, bucket: str, code: str, message: str, retry_after: float) -> ApiError:
        if self.on_refusal is not None:
            self.on_refusal(bucket, code)
        return ApiError(429, code, message, retry_after=max(1.0, math.ceil(retry_after)))

    async def charge(self, key: KeyRecord, bucket: Bucket, cost: int = 1, job_ids: list[str] | None = None
                     ) -> list[str]:
        """Admit a request of ``bucket`` for ``key`` that starts ``cost`` jobs (or makes ``cost`` blocking calls),
        all or none, or raise ApiError 429 with Retry-After. For ``jobs``: the ids to create the jobs with
        (``job_ids`` if given, which sets ``cost``), reserved on the running-jobs cap."""
        ids = job_ids_for(bucket, cost, job_ids)
        cost = len(ids) if job_ids is not None else cost
        limits = key.limits
        per_minute = limits.jobs_per_minute if bucket == "jobs" else limits.blocking_per_minute
        burst = limits.jobs_burst if bucket == "jobs" else limits.blocking_burst
        cap = limits.max_running_jobs if bucket == "jobs" else None
        if (per_minute is not None and cost > burst) or (cap is not None and cost > cap):
            limit = f"jobs_burst {burst}" if per_minute is not None and cost > burst else f"max_running_jobs {cap}"
            raise self._refuse(bucket, "quota_exceeded",
                               f"this request would start {cost} jobs at once, more than this key ever may ({limit}); "
                               "start them in smaller groups", RUNNING_JOBS_RETRY_AFTER)
        places = self.places if cap is not None else None
        if places is not None:
            running = await places.reserve(key.id, ids, cap, RESERVATION_SECONDS)  # type: ignore[arg-type]
            if running is not None:
                more = "" if cost == 1 else f" and this request would start {cost} more"
                raise self._refuse(bucket, "quota_exceeded",
                                   f"this key already runs {running} jobs{more} (limit {cap})",
                                   RUNNING_JOBS_RETRY_AFTER)
        if per_minute is None:
            return ids
        try:
            wait = await self.limiter.acquire(f"{key.id}:{bucket}", per_minute / 60.0, burst, cost)
        except BaseException:
            if places is not None:
                await places.unreserve(key.id, ids)
            raise
        if wait > 0:
            if places is not None:
                await places.unreserve(key.id, ids)  # all or none: the places go back with the refusal
            raise self._refuse(bucket, "rate_limited",
                               f"too many {bucket} requests for this key (limit {per_minute:g} per minute, "
                               f"burst {burst}); retry in {math.ceil(wait)} s", wait)
        return ids


    async def charge_upload(self, key: KeyRecord) -> None:
        """Take a token from ``key``'s upload bucket (``uploads_per_minute``, ``uploads_burst``), or raise ApiError
        429 ``rate_limited`` with Retry-After."""
        per_minute = key.limits.uploads_per_minute
        if per_minute is None:
            return
        burst = key.limits.uploads_burst
        wait = await self.limiter.acquire(f"{key.id}:uploads", per_minute / 60.0, burst)
        if wait > 0:
            raise self._refuse("uploads", "rate_limited",
                               f"too many uploads for this key (limit {per_minute:g} per minute, burst {burst}); "
                               f"retry in {math.ceil(wait)} s", wait)


QUOTAS = web.AppKey("quotas", Quotas)


def set_job_places(app: web.Application, places: JobPlaces) -> None:
    """Plug in the job engine's atomic count-and-reserve for the running-jobs cap; no-op when keys are off."""
    quotas = app.get(QUOTAS)
    if quotas is not None:
        quotas.places = places


def set_running_jobs_counter(app: web.Application, running_jobs: RunningJobs) -> None:
    """Plug in a plain ``running_jobs(key_id) -> int`` (sync or async) instead: counted, not reserved (see
    :class:`CountingPlaces`); no-op when keys are off."""
    set_job_places(app, CountingPlaces(running_jobs))


def set_rate_limiter(app: web.Application, limiter: RateLimiter) -> None:
    """Replace the in-process token buckets (e.g. by a Redis-backed limiter); no-op when keys are off."""
    quotas = app.get(QUOTAS)
    if quotas is not None:
        quotas.limiter = limiter


async def charge_upload(request: web.Request) -> None:
    """Charge the caller's key for an upload (429 when its upload bucket is empty); nothing when keys are off."""
    key = request.get(API_KEY)
    quotas = request.app.get(QUOTAS)
    if key is not None and quotas is not None:
        await quotas.charge_upload(key)


def job_ids_for(bucket: Bucket, cost: int, job_ids: list[str] | None = None) -> list[str]:
    """The ids a ``jobs`` charge hands out: ``job_ids`` if the caller chose them, else ``cost`` new ones."""
    if job_ids is not None:
        return list(job_ids)
    return [new_id() for _ in range(cost)] if bucket == "jobs" else []


async def charge(request: web.Request, bucket: Bucket, cost: int = 1, job_ids: list[str] | None = None
                 ) -> list[str]:
    """Charge the caller's key for a ``bucket`` request that starts ``cost`` jobs (429 when over quota); nothing
    when keys are off. Call it once the request is known to be valid, just before the jobs are created, and
    create them with the ids it answers (``jobs``: one per job; ``job_ids`` chooses them): those ids hold the
    key's places on its running-jobs cap until the jobs exist."""
    key = request.get(API_KEY)
    quotas = request.app.get(QUOTAS)
    if key is not None and quotas is not None and (cost > 0 or job_ids):
        return await quotas.charge(key, bucket, cost, job_ids)
    return job_ids_for(bucket, cost, job_ids)
