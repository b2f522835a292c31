"""Per-key quotas (with keys on): token buckets on job creation, the blocking endpoints and uploads, and the key's
running-jobs cap for the job engine.

The buckets sit behind :class:`RateLimiter`: :class:`LocalRateLimiter` keeps them in the process,
:class:`RedisRateLimiter` in Redis, shared by every process that uses the same server (plug it in with
:func:`set_rate_limiter`). A request takes one token per job it starts, at most the bucket's burst (a request of more
jobs than the burst takes the whole burst and still passes), all or none; a refusal says when those tokens will be
there (``Retry-After``), since they always come. The running-jobs cap (``max_running_jobs``) is not an admission
check: the job engine runs at most that many of a key's jobs at once and keeps the others queued
(:func:`running_cap_of`), so a request never has to be retried for it.

A charge of the ``jobs`` bucket answers the ids the new jobs must be created with (the budget hold and the job
records use them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aiohttp import web

from mvserver.appkeys import KEYRING, QUOTAS
from mvserver.core.artefacts import new_id
from mvserver.core.errors import ApiError
from mvserver.web.access.auth import API_KEY, KeyRecord

if TYPE_CHECKING:
    from redis.asyncio import Redis

Bucket = Literal["jobs", "blocking"]


class RateLimiter(Protocol):
    async def acquire(self, name: str, rate: float, burst: int, cost: int = 1) -> float:
        """Take ``cost`` tokens (at most ``burst``) from bucket ``name`` (refilled at ``rate`` tokens/s up to
        ``burst``), all or none.

        Returns 0 when they were taken, else the seconds until they will be available (nothing taken).
        """

    async def tokens(self, name: str, rate: float, burst: int) -> float:
        """The tokens bucket ``name`` holds now (``burst`` for one never used), taking none."""


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

    async def tokens(self, name: str, rate: float, burst: int) -> float:
        now = self._clock()
        tokens, stamp = self._buckets.get(name, (float(burst), now))
        return min(float(burst), tokens + (now - stamp) * rate)


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

# The same refill, read only.
_PEEK = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
return tostring(math.min(burst, tokens + math.max(0, now - stamp) * rate))
"""


class RedisRateLimiter:
    """Token buckets in Redis (a hash per key and bucket, updated by one Lua script), shared across processes."""

    def __init__(self, client: Redis, prefix: str = "mv:bucket:"):
        self.prefix = prefix
        self._take: Any = client.register_script(_TAKE)
        self._peek: Any = client.register_script(_PEEK)

    async def acquire(self, name: str, rate: float, burst: int, cost: int = 1) -> float:
        return float(await self._take(keys=[self.prefix + name], args=[repr(float(rate)), burst, cost]))

    async def tokens(self, name: str, rate: float, burst: int) -> float:
        return float(await self._peek(keys=[self.prefix + name], args=[repr(float(rate)), burst]))


class Quotas:
    """The limiter of one app."""

    def __init__(self, limiter: RateLimiter, on_refusal: Callable[[str, str], None] | None = None):
        self.limiter = limiter
        self.on_refusal = on_refusal

    def _refuse(self, bucket: str, code: str, message: str, retry_after: float) -> ApiError:
        if self.on_refusal is not None:
            self.on_refusal(bucket, code)
        return ApiError(429, code, message, retry_after=max(1.0, math.ceil(retry_after)))

    async def charge(
        self, key: KeyRecord, bucket: Bucket, cost: int = 1, job_ids: list[str] | None = None
    ) -> list[str]:
        """Admit a request of ``bucket`` for ``key`` that starts ``cost`` jobs (or makes ``cost`` blocking calls): it
        takes ``min(cost, burst)`` tokens, all or none, or raises ApiError 429 ``rate_limited`` with the wait for
        them as Retry-After (always finite: they are never more than the bucket holds). For ``jobs``: answers the
        ids to create the jobs with (``job_ids`` if given, which sets ``cost``)."""
        ids = job_ids_for(bucket, cost, job_ids)
        cost = len(ids) if job_ids is not None else cost
        per_minute, burst = _bucket_limits(key, bucket)
        if per_minute is None:
            return ids
        needed = min(cost, burst)
        wait = await self.limiter.acquire(f"{key.id}:{bucket}", per_minute / 60.0, burst, needed)
        if wait > 0:
            what = f"this request needs {needed} tokens" if needed > 1 else "no token is left"
            raise self._refuse(
                bucket,
                "rate_limited",
                f"too many {bucket} requests for this key: {what} (one per job, at most the burst; "
                f"limit {per_minute:g} per minute, burst {burst}); retry in {math.ceil(wait)} s",
                wait,
            )
        return ids

    async def tokens(self, key: KeyRecord) -> dict[str, float | None]:
        """The tokens left in each of ``key``'s buckets (None: that bucket is unlimited), taking none."""
        left: dict[str, float | None] = {}
        for bucket in ("jobs", "blocking", "uploads"):
            per_minute, burst = _bucket_limits(key, bucket)
            left[bucket] = (
                None
                if per_minute is None
                else round(await self.limiter.tokens(f"{key.id}:{bucket}", per_minute / 60.0, burst), 2)
            )
        return left

    async def charge_upload(self, key: KeyRecord) -> None:
        """Take a token from ``key``'s upload bucket (``uploads_per_minute``, ``uploads_burst``), or raise ApiError
        429 ``rate_limited`` with Retry-After."""
        per_minute = key.limits.uploads_per_minute
        if per_minute is None:
            return
        burst = key.limits.uploads_burst
        wait = await self.limiter.acquire(f"{key.id}:uploads", per_minute / 60.0, burst)
        if wait > 0:
            raise self._refuse(
                "uploads",
                "rate_limited",
                f"too many uploads for this key (limit {per_minute:g} per minute, burst {burst}); "
                f"retry in {math.ceil(wait)} s",
                wait,
            )


def _bucket_limits(key: KeyRecord, bucket: str) -> tuple[float | None, int]:
    """(tokens per minute or None for unlimited, burst) of one of ``key``'s buckets."""
    limits = key.limits
    if bucket == "jobs":
        return limits.jobs_per_minute, limits.jobs_burst
    if bucket == "blocking":
        return limits.blocking_per_minute, limits.blocking_burst
    return limits.uploads_per_minute, limits.uploads_burst


def running_cap_of(app: web.Application) -> Callable[[str], int | None] | None:
    """For the job engine: a key's ``max_running_jobs`` (None for no cap, or a key no longer in the keys file);
    None when keys are off."""
    keyring = app.get(KEYRING)
    if keyring is None:
        return None

    def cap(owner: str) -> int | None:
        record = keyring.get(owner)
        return record.limits.max_running_jobs if record is not None else None

    return cap


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


async def charge(request: web.Request, bucket: Bucket, cost: int = 1, job_ids: list[str] | None = None) -> list[str]:
    """Charge the caller's key for a ``bucket`` request that starts ``cost`` jobs (429 when over quota); nothing
    when keys are off. Call it once the request is known to be valid, just before the jobs are created, and
    create them with the ids it answers (``jobs``: one per job; ``job_ids`` chooses them)."""
    key = request.get(API_KEY)
    quotas = request.app.get(QUOTAS)
    if key is not None and quotas is not None and (cost > 0 or job_ids):
        return await quotas.charge(key, bucket, cost, job_ids)
    return job_ids_for(bucket, cost, job_ids)
