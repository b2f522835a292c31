"""Listing a caller's jobs, newest first, a page at a time, from the store's per-owner index.

The index holds one entry per job of an owner (the key id), so a page never looks at anyone else's jobs. Filters
(status, kind, project) are checked on the records while walking the owner's entries; one page examines at most
``SCAN_BUDGET`` entries, so a filter that matches rarely answers a short (even empty) page with a ``next_cursor``
to continue from, instead of one slow request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mvserver.jobs.model import Job
from mvserver.jobs.store import JobStore

SCAN_BUDGET = 1000
MAX_LIMIT = 100
CURSOR = re.compile(r"[0-9]{16}-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@dataclass(frozen=True)
class JobQuery:
    """One listing request: whose jobs, which ones, from where, how many."""

    owner: str | None
    status: str | None = None
    kind: str | None = None
    project_id: str | None = None
    cursor: str | None = None
    limit: int = 20

    def matches(self, job: Job) -> bool:
        return (
            job.owner == self.owner
            and (self.status is None or job.status == self.status)
            and (self.kind is None or job.kind == self.kind)
            and (self.project_id is None or job.request.get("project_id") == self.project_id)
        )


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None  # None: no older jobs


async def list_jobs(store: JobStore, query: JobQuery, budget: int = SCAN_BUDGET) -> JobPage:
    """The page of ``query``: up to ``limit`` matching jobs older than the cursor, newest first, looking at no more
    than ``budget`` index entries."""
    found: list[Job] = []
    cursor, scanned = query.cursor, 0
    while scanned < budget:
        count = min(budget - scanned, max(query.limit - len(found), 10) + 5)
        entries = await store.index(query.owner, cursor, count)
        if not entries:
            return JobPage(found, None)
        jobs = await store.get_many([entry[17:] for entry in entries])
        for entry, job in zip(entries, jobs, strict=False):
            scanned += 1
            cursor = entry
            if job is not None and query.matches(job):
                found.append(job)
                if len(found) == query.limit:
                    return JobPage(found, cursor)
        if len(entries) < count:
            return JobPage(found, None)
    return JobPage(found, cursor)
