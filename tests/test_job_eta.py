"""ETA on both job stores: progress events carry ``eta_seconds`` from a running estimate of the model's run time
per kind of request, kept in the job store (so it survives a restart), and a guessed ``progress`` where the
provider reports none (Veo on Vertex)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, read_sse, settled, submit

from mvserver.appkeys import JOBS
from mvserver.jobs.eta import EtaEstimate, duration_key
from mvserver.jobs.model import Job
from mvserver.jobs.usage_store import Durations
from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores


async def progress_events(client: TestClient, job_id: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` progress events of the job, read from its stream as they come."""
    found: list[dict[str, Any]] = []
    async with client.get(f"/api/mv/jobs/{job_id}/events") as response:
        async with asyncio.timeout(20):
            async for event in read_sse(response):
                if (
                    event.get("event") == "progress"
                    and "elapsed_seconds" in event["data"]
                    and event["data"].get("stage") == "generating"
                    and "eta_seconds" in event["data"]
                ):
                    found.append(event["data"])
                    if len(found) == count:
                        return found
    return found


async def test_progress_events_carry_an_eta_from_the_models_past_runs(make_client: AppClient, sim: Simulator) -> None:
    client = await make_client()
    sim.video_latency = 0.5
    first = await settled(client, (await submit(client, backend="gemini"))["job_id"])
    assert first.status == "succeeded"
    learned = await client.app[JOBS].book.estimate(duration_key(first))
    assert learned is not None and learned.runs == 1
    assert learned.mean_seconds == pytest.approx(first.finished_at - first.started_at)  # type: ignore[operator]
    await client.close()

    client = await make_client()  # the estimate is kept by the job store across a restart
    sim.video_latency = 30
    job_id = (await submit(client, backend="gemini"))["job_id"]
    events = await progress_events(client, job_id, 3)
    mean = learned.mean_seconds
    for data in events:
        job = await client.app[JOBS].get(job_id)
        assert 0 <= data["eta_seconds"] <= round(mean, 1)  # tenths of a second
        # Veo reports no progress: it is guessed from the elapsed share of the mean run, and said to be a guess
        assert data["progress_estimated"] is True and 0 <= data["progress"] <= 0.95
        assert data["progress"] == pytest.approx(EtaEstimate(learned).progress(job, now=data["event_time"]), abs=1e-4)
        assert data["eta_seconds"] == pytest.approx(
            EtaEstimate(learned).eta_seconds(job, now=data["event_time"]), abs=1e-6
        )
    await client.post(f"/api/mv/jobs/{job_id}/cancel")


async def test_an_estimate_is_per_kind_of_request(make_client: AppClient, sim: Simulator) -> None:
    client = await make_client()
    sim.video_latency = 0.2
    job = await settled(client, (await submit(client, duration=4))["job_id"])
    other = Job.from_record({**job.record(), "request": {**job.request, "duration": 8}})
    book = client.app[JOBS].book
    assert await book.estimate(duration_key(job)) is not None
    assert await book.estimate(duration_key(other)) is None  # an 8 s clip learns nothing from a 4 s one
    sim.video_latency = 30
    job_id = (await submit(client, duration=8))["job_id"]
    async with client.get(f"/api/mv/jobs/{job_id}/events") as response:
        async with asyncio.timeout(10):
            async for event in read_sse(response):
                if (
                    event.get("event") == "progress"
                    and event["data"].get("stage") == "generating"
                    and "elapsed_seconds" in event["data"]
                ):
                    assert "eta_seconds" not in event["data"]  # nothing learned yet: no ETA rather than a wrong one
                    break
    await client.post(f"/api/mv/jobs/{job_id}/cancel")


async def test_the_running_estimate_follows_recent_runs(client: TestClient) -> None:
    book = client.app[JOBS].book
    for seconds in (10.0, 20.0, 40.0):
        await book.learn("video|m|4s", seconds)
    found = await book.estimate("video|m|4s")
    assert found is not None and found.runs == 3 and found.mean_seconds == pytest.approx(70 / 3)
    assert math.exp(found.log_mean) == pytest.approx(20.0)  # the geometric mean: the log-normal's median
    for _ in range(200):
        await book.learn("video|m|4s", 50.0)
    found = await book.estimate("video|m|4s")
    assert found is not None and found.runs == 50 and found.mean_seconds == pytest.approx(50.0, abs=0.1)


def test_a_job_running_long_gets_a_growing_eta_not_zero() -> None:
    spread = Durations(50, 45.0, math.log(45.0), math.log(45.0) ** 2 + 0.25**2)  # median 45 s, sigma 0.25
    job = Job(id="j", backend="replicate", model="m", sandbox=False, request={}, created_at=0.0, started_at=0.0)
    estimate = EtaEstimate(spread)
    assert estimate.eta_seconds(job, now=0.0) == pytest.approx(45.0, abs=0.1)
    assert 0 < estimate.eta_seconds(job, now=60.0) < estimate.eta_seconds(job, now=10.0)
    assert estimate.eta_seconds(job, now=90.0) > 0  # past the typical run: still time left, honestly estimated
    assert EtaEstimate(spread, plain=True).eta_seconds(job, now=90.0) == 0  # what the plain mean would say
    assert estimate.progress(job, now=90.0) <= 0.95
