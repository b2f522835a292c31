"""The job census behind the ``mv_jobs`` and ``mv_job_queue_depth`` gauges: unfinished jobs counted in the store.

A gauge moved by each process's own transitions would be wrong as soon as several processes share Redis: a job
queued by one process is claimed, run and finished by another. So the numbers are read where the truth is, when
``/metrics`` is scraped: the file store's active set (one process holds every unfinished job), or on Redis the
``dispatch`` stream (one entry per queued or running job of the whole cluster) with each job's status and lease.
On Redis every process therefore reports the same, cluster-wide values (aggregate them with ``max``, not ``sum``).
Finished jobs are not in the census: the ``mv_jobs_finished`` counter of the process that finished them counts them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .file_store import FileJobStore

if TYPE_CHECKING:
    from .runner import JobEngine

CENSUS_BATCH = 500  # dispatch entries read (and jobs looked up, in one script call) per round trip

# KEYS: job hash and lease of each job, in pairs. -> status, kind, backend, leased (0/1) of each unfinished job.
# Kind and backend are read from the record inside Redis, so the records themselves never cross the network.
_LOOKUP = """
local out = {}
for i = 1, #KEYS, 2 do
  local job = redis.call('HMGET', KEYS[i], 'status', 'rec')
  if job[1] == 'queued' or job[1] == 'running' then
    local ok, rec = pcall(cjson.decode, job[2] or '')
    local kind, backend = 'unknown', 'unknown'
    if ok and type(rec) == 'table' then
      if type(rec.kind) == 'string' then kind = rec.kind end
      if type(rec.backend) == 'string' then backend = rec.backend end
    end
    out[#out + 1] = job[1]
    out[#out + 1] = kind
    out[#out + 1] = backend
    out[#out + 1] = redis.call('EXISTS', KEYS[i + 1])
  end
end
return out
"""


@dataclass(frozen=True)
class Census:
    """Unfinished jobs by (status, kind, backend), and how many of them no process is running (waiting for a slot)."""

    jobs: dict[tuple[str, str, str], int]
    waiting: int


async def take_census(engine: "JobEngine") -> Census:
    """Count the unfinished jobs of the engine's store (every process's, on Redis)."""
    store = engine.store
    if isinstance(store, FileJobStore):
        return _file_census(store, set(engine.tasks))
    from .redis_store import RedisJobStore  # redis is imported only when it is used

    if isinstance(store, RedisJobStore):
        return await _redis_census(store)
    raise TypeError(f"no census for a {type(store).__name__}")


def _file_census(store: FileJobStore, running_here: set[str]) -> Census:
    """One process: its active set is every unfinished job, and a job without a task here waits for a slot."""
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    waiting = 0
    for job in list(store._active.values()):  # noqa: SLF001 - the store's own index of unfinished jobs
        if job.final:
            continue
        counts[(job.status, job.kind, job.backend)] += 1
        waiting += job.id not in running_here
    return Census(dict(counts), waiting)


async def _redis_census(store: Any) -> Census:
    """Every unfinished job of the cluster, from the dispatch stream; a job without a lease waits for a slot (queued,
    released at a shutdown, or left by a process that died). Read in batches, so memory stays bounded whatever the
    queue length; the time grows with it (one round trip per batch)."""
    lookup = store.r.register_script(_LOOKUP)  # a local object (the script's digest): nothing sent yet
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    waiting = 0
    start = "-"
    while True:
        entries = await store.r.xrange(store.k("dispatch"), min=start, max="+", count=CENSUS_BATCH)
        # one entry per unfinished job (a release re-queues a job by replacing its entry, in one script)
        ids = list(dict.fromkeys(fields["j"] for _, fields in entries if fields and fields.get("j")))
        if ids:
            keys = [key for job_id in ids for key in (store.k("job", job_id), store.k("lease", job_id))]
            found = await lookup(keys=keys)
            for i in range(0, len(found), 4):
                status, kind, backend, leased = found[i:i + 4]
                counts[(_text(status), _text(kind), _text(backend))] += 1
                waiting += not int(leased)
        if len(entries) < CENSUS_BATCH:
            return Census(dict(counts), waiting)
        start = f"({entries[-1][0]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
