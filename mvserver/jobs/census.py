"""The job census behind the ``mv_jobs`` and ``mv_job_queue_depth`` gauges: unfinished jobs counted in the store.

A gauge moved by each process's own transitions would be wrong as soon as several processes share Redis: a job
queued by one process is claimed, run and finished by another. So the numbers are read where the truth is, when
``/metrics`` is scraped: the file store's active set (one process holds every unfinished job), or on Redis the
``dispatch`` stream (one entry per queued or running job of the whole cluster) with each job's status and lease.
On Redis every process therefore reports the same, cluster-wide values (aggregate them with ``max``, not ``sum``).
Finished jobs are not in the census: the ``mv_jobs_finished`` counter of the process that finished them counts them.
A job's kind and backend never change, so they are read from its record once and remembered for as long as the job
is unfinished; a census then costs Redis a status and a lease check per job.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mvserver.jobs.file_store import FileJobStore

if TYPE_CHECKING:
    from mvserver.jobs.runner import JobEngine

CENSUS_BATCH = 200  # dispatch entries read (and jobs looked up, in one script call) per round trip

# KEYS: job hash and lease of each job, in pairs; ARGV[n] = '1' when the n-th job's kind and backend are wanted (read
# from its record, inside Redis, so records never cross the network). -> status, kind, backend, leased (0/1) of each
# job, in order; status '' for a job that is finished or gone.
_LOOKUP = """
local out = {}
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  local job = redis.call('HMGET', KEYS[i], 'status', ARGV[n] == '1' and 'rec' or 'status')
  local status, kind, backend = job[1] or '', '', ''
  if status ~= 'queued' and status ~= 'running' then
    status = ''
  elseif ARGV[n] == '1' then
    local ok, rec = pcall(cjson.decode, job[2] or '')
    kind, backend = 'unknown', 'unknown'
    if ok and type(rec) == 'table' then
      if type(rec.kind) == 'string' then kind = rec.kind end
      if type(rec.backend) == 'string' then backend = rec.backend end
    end
  end
  out[#out + 1] = status
  out[#out + 1] = kind
  out[#out + 1] = backend
  out[#out + 1] = status ~= '' and redis.call('EXISTS', KEYS[i + 1]) or 0
end
return out
"""


@dataclass(frozen=True)
class Census:
    """Unfinished jobs by (status, kind, backend), and how many of them no process is running (waiting for a slot)."""

    jobs: dict[tuple[str, str, str], int]
    waiting: int


class JobCensus:
    """Takes censuses of one engine's store (every process's unfinished jobs, on Redis); ``take`` is what
    ``Metrics.census`` calls at each scrape."""

    def __init__(self, engine: JobEngine):
        self.engine = engine
        self._labels: dict[str, tuple[str, str]] = {}  # unfinished job id -> (kind, backend), Redis only

    async def take(self) -> Census:
        store = self.engine.store
        if isinstance(store, FileJobStore):
            return _file_census(store, set(self.engine.tasks))
        from mvserver.jobs.redis_store import RedisJobStore  # redis is imported only when it is used

        if isinstance(store, RedisJobStore):
            return await self._redis_census(store)
        raise TypeError(f"no census for a {type(store).__name__}")

    async def _redis_census(self, store: Any) -> Census:
        """Every unfinished job of the cluster, from the dispatch stream; a job without a lease waits for a slot
        (queued, released at a shutdown, or left by a process that died). Read in batches, so memory stays bounded
        by the number of unfinished jobs whatever the queue length; the time grows with it."""
        lookup = store.r.register_script(_LOOKUP)  # a local object (the script's digest): nothing sent yet
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        labels: dict[str, tuple[str, str]] = {}
        waiting = 0
        start = "-"
        while True:
            entries = await store.r.xrange(store.k("dispatch"), min=start, max="+", count=CENSUS_BATCH)
            # one entry per unfinished job (a release re-queues a job by replacing its entry, in one script)
            ids = list(dict.fromkeys(fields["j"] for _, fields in entries if fields and fields.get("j")))
            if ids:
                keys = [key for job_id in ids for key in (store.k("job", job_id), store.k("lease", job_id))]
                wanted = ["0" if job_id in self._labels else "1" for job_id in ids]
                found = await lookup(keys=keys, args=wanted)
                for index, job_id in enumerate(ids):
                    status, kind, backend, leased = (_text(v) for v in found[4 * index : 4 * index + 4])
                    if not status:
                        continue
                    labels[job_id] = self._labels.get(job_id) or (kind, backend)
                    counts[(status, *labels[job_id])] += 1
                    waiting += leased == "0"
            if len(entries) < CENSUS_BATCH:
                self._labels = labels  # only the jobs still unfinished are remembered
                return Census(dict(counts), waiting)
            start = f"({entries[-1][0]}"


def _file_census(store: FileJobStore, running_here: set[str]) -> Census:
    """One process: its active set is every unfinished job, and a job without a task here waits for a slot."""
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    waiting = 0
    for job in list(store._active.values()):
        if job.final:
            continue
        counts[(job.status, job.kind, job.backend)] += 1
        waiting += job.id not in running_here
    return Census(dict(counts), waiting)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
