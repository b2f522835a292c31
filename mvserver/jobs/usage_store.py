"""The usage book of a job store: the ledger of ended jobs' usage, per-key monthly spending, and running estimates
of each model's durations (for ETAs). Files under ``outputs/jobs/usage`` with the file store, keys in the same
Redis with the Redis store, so it survives restarts and (on Redis) is shared by every node.

The ledger is written before a job's final event and keyed by job id, so a job that ends twice (a node died
between the two writes and the job ran again) is counted once. Spending is held when a job is created (its
estimated cost, refused past the key's limit in one atomic step) and corrected by the difference once it ends.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from mvserver.core.artefacts import write_bytes_atomic

DURATION_WINDOW = 50  # an estimate follows roughly the last this-many runs (a running mean that forgets)
BUDGET_TTL_SECONDS = 62 * 86400  # a month's spending counter outlives its month by a month, then goes


class UsageBook(Protocol):
    async def record(self, entry: dict[str, Any]) -> None:
        """Keep an ended job's ledger entry (``usage.ledger_entry``); a second entry for the same job replaces it."""

    async def entries(
        self, owner: str | None, start: float, end: float, *, every_owner: bool = False
    ) -> list[dict[str, Any]]:
        """Entries of jobs of ``owner`` (of every owner with ``every_owner``) finished in [start, end), oldest
        first."""

    async def hold(self, owner: str, month: str, micros: int, limit_micros: int) -> int | None:
        """Add ``micros`` to ``owner``'s spending of ``month`` unless that would pass ``limit_micros``: None when
        held, else what is left (never negative). Atomic across every node."""

    async def adjust(self, owner: str, month: str, delta_micros: int) -> None:
        """Correct a hold by the difference between a job's final and estimated cost."""

    async def spent(self, owner: str, month: str) -> int: ...

    async def learn(self, key: str, seconds: float) -> None:
        """Fold one run's duration into the running estimate of ``key`` (model and kind of request)."""

    async def estimate(self, key: str) -> Durations | None:
        """The running estimate of ``key``'s run times, or None before its first run."""


@dataclass(frozen=True)
class Durations:
    """Running means over (roughly) the last :data:`DURATION_WINDOW` runs: of the seconds, and of their logarithm
    and its square (run times are skewed: a log-normal fit gives the ETA of a job already running long)."""

    runs: int
    mean_seconds: float
    log_mean: float
    log_square_mean: float


def fold(found: Durations | None, seconds: float) -> Durations:
    """``found`` with one more run: each mean moves by 1/n of the difference, n capped at the window, so old runs
    fade and a provider that slows down is followed within a few dozen runs."""
    log = math.log(max(seconds, 1e-3))
    if found is None:
        return Durations(1, seconds, log, log * log)
    count = min(found.runs + 1, DURATION_WINDOW)
    return Durations(
        count,
        found.mean_seconds + (seconds - found.mean_seconds) / count,
        found.log_mean + (log - found.log_mean) / count,
        found.log_square_mean + (log * log - found.log_square_mean) / count,
    )


def _month_key(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m")


def _months(start: float, end: float) -> list[str]:
    """The UTC months that [start, end) touches, in order."""
    first = datetime.fromtimestamp(max(start, 0), UTC)
    last = datetime.fromtimestamp(max(end, 0), UTC)
    months, year, month = [], first.year, first.month
    while (year, month) <= (last.year, last.month):
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def _in_range(entry: dict[str, Any], owner: str | None, start: float, end: float, every_owner: bool) -> bool:
    finished = entry.get("finished_at") or 0
    return start <= finished < end and (every_owner or entry.get("owner") == owner)


class FileUsageBook:
    """One process's book: a JSON-lines ledger per month of finishing, and two small JSON files (spending and
    durations) kept in memory and rewritten atomically; one lock makes each change atomic."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._lock = asyncio.Lock()
        self._budgets: dict[str, dict[str, int]] | None = None
        self._durations: dict[str, list[float]] | None = None

    def _load(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / name).read_bytes())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}

    def _save(self, name: str, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.dir / name, json.dumps(data, separators=(",", ":")).encode())

    async def record(self, entry: dict[str, Any]) -> None:
        path = self.dir / f"ledger-{_month_key(entry['finished_at'] or time.time())}.jsonl"
        line = json.dumps(entry, separators=(",", ":")) + "\n"

        def append() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(line)

        async with self._lock:
            await asyncio.to_thread(append)

    async def entries(
        self, owner: str | None, start: float, end: float, *, every_owner: bool = False
    ) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for month in _months(start, end):
                try:
                    lines = (self.dir / f"ledger-{month}.jsonl").read_bytes().splitlines()
                except FileNotFoundError:
                    continue
                for line in lines:
                    try:
                        entry = json.loads(line)
                    except ValueError:  # a line torn by a crash mid-append
                        continue
                    if isinstance(entry, dict) and _in_range(entry, owner, start, end, every_owner):
                        found[entry["job_id"]] = entry  # a job recorded twice counts once (its last entry)
            return sorted(found.values(), key=lambda e: (e["finished_at"], e["job_id"]))

        return await asyncio.to_thread(read)

    async def _budget_table(self) -> dict[str, dict[str, int]]:
        if self._budgets is None:
            budgets: dict[str, dict[str, int]] = await asyncio.to_thread(self._load, "budgets.json")
            self._budgets = budgets
        return self._budgets

    async def hold(self, owner: str, month: str, micros: int, limit_micros: int) -> int | None:
        async with self._lock:
            table = await self._budget_table()
            spent = table.get(owner, {}).get(month, 0)
            if spent + micros > limit_micros:
                return max(0, limit_micros - spent)
            table.setdefault(owner, {})[month] = spent + micros
            await asyncio.to_thread(self._save, "budgets.json", table)
            return None

    async def adjust(self, owner: str, month: str, delta_micros: int) -> None:
        if not delta_micros:
            return
        async with self._lock:
            table = await self._budget_table()
            months = table.setdefault(owner, {})
            months[month] = months.get(month, 0) + delta_micros
            await asyncio.to_thread(self._save, "budgets.json", table)

    async def spent(self, owner: str, month: str) -> int:
        async with self._lock:
            return (await self._budget_table()).get(owner, {}).get(month, 0)

    async def _duration_table(self) -> dict[str, list[float]]:
        if self._durations is None:
            durations: dict[str, list[float]] = await asyncio.to_thread(self._load, "durations.json")
            self._durations = durations
        return self._durations

    async def learn(self, key: str, seconds: float) -> None:
        async with self._lock:
            table = await self._duration_table()
            found = table.get(key)
            table[key] = list(
                astuple(fold(Durations(int(found[0]), *map(float, found[1:])) if found else None, seconds))
            )
            await asyncio.to_thread(self._save, "durations.json", table)

    async def estimate(self, key: str) -> Durations | None:
        async with self._lock:
            found = (await self._duration_table()).get(key)
        return Durations(int(found[0]), *map(float, found[1:])) if found else None


# KEYS: spending counter. ARGV: micros, limit micros, ttl seconds. -> -1 held, else what is left (>= 0)
HOLD = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if spent + cost > limit then return math.max(0, limit - spent) end
redis.call('INCRBY', KEYS[1], cost)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return -1
"""

# KEYS: estimate hash. ARGV: seconds, its log, window. Running means (see usage_store.fold) in one step, so runs
# ending on several nodes at once are all folded in.
LEARN = """
local count = math.min(tonumber(redis.call('HGET', KEYS[1], 'n') or '0') + 1, tonumber(ARGV[3]))
local state = redis.call('HMGET', KEYS[1], 'mean', 'lmean', 'lsq')
local x, lx = tonumber(ARGV[1]), tonumber(ARGV[2])
local mean, lmean, lsq = tonumber(state[1] or ARGV[1]), tonumber(state[2] or ARGV[2]), tonumber(state[3] or (lx * lx))
redis.call('HSET', KEYS[1], 'n', count, 'mean', tostring(mean + (x - mean) / count),
           'lmean', tostring(lmean + (lx - lmean) / count), 'lsq', tostring(lsq + (lx * lx - lsq) / count))
return 1
"""


class RedisUsageBook:
    """The book in the job store's Redis: ``usage:rec`` (hash: job id -> entry), ``usage:<key id>`` and
    ``usage:*`` (sorted sets of job ids by finish time), ``spend:<key id>:<YYYY-MM>`` (micros, held and adjusted by
    scripts), ``eta:<key>`` (hash: n, mean, lmean, lsq)."""

    def __init__(self, client: Any, prefix: str):
        self.r = client
        self.prefix = prefix
        self._hold = client.register_script(HOLD)
        self._learn = client.register_script(LEARN)

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def record(self, entry: dict[str, Any]) -> None:
        job_id, finished = entry["job_id"], entry["finished_at"] or time.time()
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k("usage", "rec"), job_id, json.dumps(entry, separators=(",", ":")))
            pipe.zadd(self.k("usage", entry.get("owner") or "-"), {job_id: finished})
            pipe.zadd(self.k("usage", "*"), {job_id: finished})
            await pipe.execute()

    async def entries(
        self, owner: str | None, start: float, end: float, *, every_owner: bool = False
    ) -> list[dict[str, Any]]:
        index = self.k("usage", "*" if every_owner else (owner or "-"))
        ids = await self.r.zrangebyscore(index, start, f"({end}")
        if not ids:
            return []
        found = []
        for raw in await self.r.hmget(self.k("usage", "rec"), ids):
            entry = json.loads(raw) if raw else None
            if entry is not None and _in_range(entry, owner, start, end, every_owner):
                found.append(entry)
        return sorted(found, key=lambda e: (e["finished_at"], e["job_id"]))

    async def hold(self, owner: str, month: str, micros: int, limit_micros: int) -> int | None:
        left = int(
            await self._hold(keys=[self.k("spend", owner, month)], args=[micros, limit_micros, BUDGET_TTL_SECONDS])
        )
        return None if left < 0 else left

    async def adjust(self, owner: str, month: str, delta_micros: int) -> None:
        if delta_micros:
            await self.r.incrby(self.k("spend", owner, month), delta_micros)

    async def spent(self, owner: str, month: str) -> int:
        return int(await self.r.get(self.k("spend", owner, month)) or 0)

    async def learn(self, key: str, seconds: float) -> None:
        await self._learn(
            keys=[self.k("eta", key)], args=[repr(float(seconds)), repr(math.log(max(seconds, 1e-3))), DURATION_WINDOW]
        )

    async def estimate(self, key: str) -> Durations | None:
        count, mean, log_mean, log_square = await self.r.hmget(self.k("eta", key), "n", "mean", "lmean", "lsq")
        return Durations(int(count), float(mean), float(log_mean), float(log_square)) if count else None
