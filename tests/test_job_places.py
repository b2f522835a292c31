"""The running-jobs cap at the job store: a key's jobs created at once (racing) are admitted to the dispatch queue
at most ``running_cap`` at a time, the others held in order; a job ending admits the next. On the file store and on
a real Redis (where admission is one script, ``ADMIT``, run in the creating transaction)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mvserver.core.artefacts import OutputStore, new_id
from mvserver.jobs import FileJobStore, Job
from mvserver.jobs.model import Event
from mvserver.jobs.redis_store import RedisJobStore
from mvserver.jobs.store import JobStore

pytestmark = pytest.mark.both_stores
CAP = 2
OWNER = "kburst"


@pytest.fixture
async def store(job_store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[JobStore]:
    if job_store_kind == "file":
        opened: JobStore = FileJobStore(OutputStore(tmp_path / "outputs"))
    else:
        opened = RedisJobStore(request.getfixturevalue("redis_url"), prefix=f"mvtest:{uuid.uuid4().hex[:10]}:")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def create(store: JobStore, owner: str = OWNER) -> Job:
    job = Job(id=new_id(), backend="replicate", model="m", sandbox=True, request={}, owner=owner, running_cap=CAP)
    job.last_event_id = 1
    await store.create(job, Event(id=1, event="queued", data={}))
    return job


async def test_thirty_racing_creations_admit_exactly_the_cap_and_an_end_admits_the_next(store: JobStore) -> None:
    created = await asyncio.gather(*(create(store) for _ in range(30)))
    ids = {job.id for job in created}
    assert await store.count_places(OWNER) == (CAP, 30 - CAP)
    async with asyncio.timeout(10):
        claimed = await store.claim(limit=30)
    assert len(claimed) == CAP  # only the admitted ones reach a node
    assert {job.id for job, _ in claimed} <= ids
    other = await create(store, "another-key")  # keys count apart
    assert await store.count_places("another-key") == (1, 0)
    # One of the admitted jobs ends: exactly one held job gets its place.
    job, lease = claimed[0]
    job.status, job.finished_at = "succeeded", job.created_at + 1
    job.last_event_id += 1
    await store.write(lease, job, Event(id=job.last_event_id, event="succeeded", data={}), record=True)
    assert await store.count_places(OWNER) == (CAP, 30 - CAP - 1)
    async with asyncio.timeout(10):
        more = await store.claim(limit=30)
    assert len([j for j, _ in more if j.owner == OWNER]) == 1 and {j.id for j, _ in more} <= {other.id, *ids}
