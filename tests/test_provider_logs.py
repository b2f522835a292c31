"""The ``provider_logs`` job option: taken by every job-creating request, shown on the job, kept in its record (a
job resumed or taken over by another node keeps it; a record written before the option existed reads as false).
What it changes (the webhook filter, the ``logs`` of progress events) is tested in test_webhooks.py and
test_job_lifecycle.py."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from helpers import events_of, submit

from mvserver.core.artefacts import OutputStore, new_id
from mvserver.jobs import FileJobStore, Job
from mvserver.jobs.model import Event
from mvserver.jobs.redis_store import RedisJobStore
from mvserver.jobs.store import JobStore

pytestmark = pytest.mark.both_stores
LEASE = 0.5


@pytest.fixture
def open_store(job_store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], JobStore]:
    """``open_store()``: a new store instance (a restarted server, or another node) on the same files or Redis."""
    prefix = f"mvtest:{uuid.uuid4().hex[:10]}:"

    def make() -> JobStore:
        if job_store_kind == "file":
            return FileJobStore(OutputStore(tmp_path / "outputs"))
        return RedisJobStore(
            request.getfixturevalue("redis_url"), prefix=prefix, lease_seconds=LEASE, claim_interval_seconds=0.2
        )

    return make


async def strip_option(store: JobStore, job_id: str) -> None:
    """Rewrite the job's saved record as a server without the option wrote it."""
    if isinstance(store, FileJobStore):
        path = store.outputs.path("jobs", job_id, ".json")
        record = json.loads(path.read_bytes())
        del record["provider_logs"]
        path.write_text(json.dumps(record))
        return
    assert isinstance(store, RedisJobStore)
    r = aioredis.from_url(store.url)
    try:
        key = f"{store.prefix}job:{job_id}"
        record = json.loads(await r.hget(key, "rec"))
        del record["provider_logs"]
        await r.hset(key, "rec", json.dumps(record))
    finally:
        await r.aclose()


async def test_a_resumed_or_taken_over_job_keeps_the_option_and_an_old_record_reads_false(
    open_store: Callable[[], JobStore],
) -> None:
    first = open_store()
    await first.open()
    jobs = []
    for asked in (True, False, True):
        job = Job(id=new_id(), backend="replicate", model="m", sandbox=True, request={}, provider_logs=asked)
        job.last_event_id = 1
        await first.create(job, Event(id=1, event="queued", data={}))
        jobs.append(job)
    async with asyncio.timeout(10):
        claimed = await first.claim(limit=3)
    for job, lease in claimed:  # running, with its prediction: what the owner wrote before it went away
        job.status, job.stage, job.prediction_id = "running", "generating", "p-" + job.id[:8]
        job.last_event_id += 1
        await first.write(lease, job, Event(id=job.last_event_id, event="running", data={}), record=True)
    await first.close()
    old = jobs[2].id
    await strip_option(first, old)

    second = open_store()  # the next start (file store) or another node once the leases lapsed (Redis)
    await second.open()
    try:
        taken: dict[str, Job] = {}
        async with asyncio.timeout(10):
            while len(taken) < 3:
                taken.update({job.id: job for job, _ in await second.claim(limit=3)})
        assert {job_id: job.provider_logs for job_id, job in taken.items()} == {
            jobs[0].id: True,
            jobs[1].id: False,
            old: False,  # no provider_logs in the record: false, as the option's default
        }
        assert all(job.prediction_id == "p-" + job.id[:8] for job in taken.values())
    finally:
        await second.close()


async def test_the_option_is_shown_on_the_job_and_a_bad_value_is_refused_naming_it(client: TestClient) -> None:
    asked = await submit(client, provider_logs=True)
    plain = await submit(client)
    shown = await (await client.get(asked["status_url"])).json()
    assert shown["provider_logs"] is True and shown["request"]["provider_logs"] is True
    assert (await (await client.get(plain["status_url"])).json())["provider_logs"] is False
    for bad in ({"on": 1}, [True], "maybe"):
        response = await client.post("/api/mv/generate_video", json={"prompt": "a lighthouse", "provider_logs": bad})
        body: dict[str, Any] = await response.json()
        assert response.status == 400 and body["error"]["field"] == "provider_logs", body
    for job in (asked, plain):
        assert (await events_of(client, job["job_id"]))[-1]["event"] == "succeeded"
