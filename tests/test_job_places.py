"""The running-jobs cap at the job store: counting and reserving is one atomic step, a reservation turns into its
job when the job is created, and lapses if it never is; on the file store and on a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import AsyncIterator

import pytest

from mvserver.jobs import FileJobStore, Job
from mvserver.jobs.model import Event
from mvserver.jobs.redis_store import RedisJobStore
from mvserver.jobs.store import JobStore
from mvserver.storage import OutputStore, new_id

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


async def create(store: JobStore, job_id: str) -> None:
    job = Job(id=job_id, backend="replicate", model="m", sandbox=True, request={}, owner=OWNER)
    job.last_event_id = 1
    await store.create(job, Event(id=1, event="queued", data={}))


async def test_thirty_racing_reservations_admit_exactly_the_cap(store: JobStore) -> None:
    asks = [[new_id()] for _ in range(30)]
    answers = await asyncio.gather(*(store.reserve(OWNER, ids, CAP, 60) for ids in asks))
    admitted = [ids for ids, answer in zip(asks, answers) if answer is None]
    assert len(admitted) == CAP
    assert sorted(answer for answer in answers if answer is not None) == [CAP] * (30 - CAP)
    # A created job takes its reservation's place (not one more), so the cap still holds afterwards.
    await create(store, admitted[0][0])
    assert await store.count_active(OWNER) == 1
    assert await store.reserve(OWNER, [new_id()], CAP, 60) == CAP
    # A reservation given back frees its place; a request of two needs two.
    await store.unreserve(OWNER, admitted[1])
    assert await store.reserve(OWNER, [new_id(), new_id()], CAP, 60) == 1
    assert await store.reserve(OWNER, [new_id()], CAP, 60) is None
    assert await store.reserve("another-key", [new_id(), new_id()], CAP, 60) is None  # keys count apart


async def test_a_reservation_whose_job_never_comes_lapses(store: JobStore) -> None:
    assert await store.reserve(OWNER, [new_id(), new_id()], CAP, 0.2) is None
    assert await store.reserve(OWNER, [new_id()], CAP, 60) == CAP
    async with asyncio.timeout(10):
        while await store.reserve(OWNER, [new_id()], CAP, 60) is not None:
            await asyncio.sleep(0.05)
