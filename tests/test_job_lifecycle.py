"""Job behaviours seen over HTTP: cancelling a queued job, when the timeout starts, the Retry-After cap, and the
SSE stream's ``retry:``, ``: ping`` comments and progress ``logs``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import AppClient, events_of, jobs_settings, read_sse, statuses, submit, wait_for

from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores


def creates(sim: Simulator) -> int:
    """How many predictions the provider was asked to create."""
    return sum(1 for route, _ in sim.requests if route == "replicate.create")


# -- cancelling a job that is still queued ---------------------------------------------------------------------


async def test_cancelling_a_queued_job_ends_it_without_creating_a_prediction(
    make_client: AppClient, sim: Simulator
) -> None:
    sim.video_latency = 30
    client = await make_client(MV_MAX_CONCURRENT_JOBS=1)
    first = await submit(client)
    await wait_for(client, first["job_id"], lambda s: s["provider_prediction_id"])
    queued = await submit(client)
    assert (await (await client.get(queued["status_url"])).json())["status"] == "queued"

    response = await client.delete(queued["status_url"])
    assert response.status == 200
    state = await response.json()
    assert state["status"] == "canceled" and state["error"]["code"] == "job_canceled"
    assert state["provider_prediction_id"] is None and state["started_at"] is None
    async with asyncio.timeout(10):  # a missing canceled event would leave the stream open
        events = await events_of(client, queued["job_id"])
    assert statuses(events) == ["queued", "canceled"]
    assert [event["id"] for event in events] == ["1", "2"]  # the canceled event follows on, numbered once
    assert events[-1]["data"]["status"] == "canceled" and events[-1]["data"]["error"]["code"] == "job_canceled"

    # Free the slot: the next job gets it and the canceled one never reaches the provider.
    await client.delete(first["status_url"])
    third = await submit(client)
    await wait_for(client, third["job_id"], lambda s: s["provider_prediction_id"])
    assert creates(sim) == 2  # the first job's and the third's
    assert (await (await client.get(queued["status_url"])).json())["status"] == "canceled"
    await client.delete(third["status_url"])


async def test_a_prediction_canceled_at_the_provider_fails_the_job_as_provider_canceled(
    client: TestClient, sim: Simulator, sim_server: TestServer
) -> None:
    sim.video_latency = 30
    accepted = await submit(client)
    running = await wait_for(client, accepted["job_id"], lambda s: s["provider_prediction_id"])
    prediction_id = running["provider_prediction_id"]
    async with aiohttp.ClientSession() as session:  # someone cancels it on the provider's side
        url = sim_server.make_url(f"/replicate/v1/predictions/{prediction_id}/cancel")
        async with session.post(url, headers={"Authorization": "Bearer r8_test"}) as response:
            assert response.status == 200
    assert (await events_of(client, accepted["job_id"]))[-1]["event"] == "failed"
    error = (await (await client.get(accepted["status_url"])).json())["error"]
    assert error == {
        "code": "provider_canceled",
        "message": "replicate prediction canceled: canceled",
        "provider": "replicate",
        "provider_status": "canceled",
    }


# -- the job timeout starts when the job gets a slot ---------------------------------------------------------------


async def test_the_timeout_counts_from_the_slot_not_from_the_queue(
    make_client: AppClient, sim: Simulator, settings_dir: Path
) -> None:
    timeout = 1.5
    jobs_settings(settings_dir, timeout_seconds=timeout)
    sim.video_latency = 30
    client = await make_client(MV_MAX_CONCURRENT_JOBS=1)
    # Two jobs hold the only slot in turn until each times out; the last one waits for both (about 2 x 1.5 s).
    holders = [await submit(client) for _ in range(2)]
    last = await submit(client)
    await wait_for(
        client, holders[1]["job_id"], lambda s: s["provider_prediction_id"], timeout=30
    )  # after a 1.5 s timeout
    # The last job's prediction ends at once (failed, so nothing is rendered), far within its own timeout.
    sim.video_latency = 0.2
    sim.add_fault("replicate.create", "fail_prediction", error="E005: flagged")

    final = await wait_for(
        client, last["job_id"], lambda s: s["status"] in ("succeeded", "failed", "canceled"), timeout=30
    )  # two 1.5 s timeouts and their cancels first, on a loaded machine too
    assert final["started_at"] - final["created_at"] > timeout  # it spent longer than the timeout in the queue
    assert final["status"] == "failed"
    assert final["error"]["code"] == "provider_prediction_failed", final["error"]  # not job_timeout
    assert final["error"]["provider_error"] == "E005: flagged"
    for holder in holders:
        assert (await (await client.get(holder["status_url"])).json())["error"]["code"] == "job_timeout"


# -- Retry-After is capped -------------------------------------------------------------------------------------


async def test_a_huge_retry_after_is_capped_by_retry_max_delay(
    make_client: AppClient, sim: Simulator, settings_dir: Path
) -> None:
    jobs_settings(settings_dir, retry_max_delay_seconds=0.2)
    sim.video_latency = 0.5
    sim.add_fault("replicate.get", status=429, retry_after=3600, times=1)
    client = await make_client()
    started = time.monotonic()
    accepted = await submit(client)
    async with asyncio.timeout(30):  # without the cap the job would sleep for an hour
        events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "succeeded"
    assert time.monotonic() - started < 30
    prediction_id = (await (await client.get(accepted["status_url"])).json())["provider_prediction_id"]
    rate_limited = sim.requests.count(("replicate.get", f"/replicate/v1/predictions/{prediction_id}"))
    assert rate_limited >= 2  # the 429 was answered and the poll was repeated after it


# -- SSE: retry, pings, logs ---------------------------------------------------------------------------------------


async def test_the_first_event_carries_retry_and_pings_follow_the_interval(
    make_client: AppClient, sim: Simulator, settings_dir: Path
) -> None:
    interval = 0.25
    jobs_settings(settings_dir, sse_ping_interval_seconds=interval, sse_retry_ms=4321)
    sim.video_latency = 2.0
    client = await make_client()
    accepted = await submit(client)
    items: list[tuple[float, dict[str, Any]]] = []
    async with client.get(accepted["events_url"]) as response:
        async with asyncio.timeout(30):
            async for item in read_sse(response, comments=True):
                items.append((time.monotonic(), item))
    events = [item for _, item in items if "comment" not in item]
    assert events[-1]["event"] == "succeeded"
    assert events[0]["retry"] == "4321"
    assert all("retry" not in event for event in events[1:])

    pings = [at for at, item in items if "comment" in item]
    assert {item["comment"] for _, item in items if "comment" in item} == {"ping"}
    stream_seconds = items[-1][0] - items[0][0]
    assert stream_seconds > 1.5
    # aiohttp-sse sleeps one interval between pings: never more than one per interval, and not far fewer.
    assert len(pings) <= stream_seconds / interval + 1
    assert len(pings) >= stream_seconds / interval / 3


async def test_progress_events_carry_the_tail_of_the_provider_logs_when_asked(
    client: TestClient, sim: Simulator
) -> None:
    sim.video_latency = 1.5
    accepted = await submit(client, provider_logs=True)
    events = await events_of(client, accepted["job_id"])
    with_logs = [e["data"]["logs"] for e in events if e["event"] == "progress" and e["data"].get("logs")]
    assert with_logs, statuses(events)
    for logs in with_logs:
        lines = logs.splitlines()
        assert 1 <= len(lines) <= 3
        assert any("%|" in line for line in lines)  # tqdm-style progress lines from the simulated model
    assert all("logs" not in e["data"] for e in events if e["event"] != "progress")


async def test_without_provider_logs_polled_progress_events_carry_no_logs(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 1.5
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    progress = [e["data"] for e in events if e["event"] == "progress" and e["data"]["stage"] == "generating"]
    assert len(progress) >= 3, statuses(events)  # polled while the provider's logs grew
    assert any(p["progress"] for p in progress)  # the provider's progress (parsed from its logs) still moves the bar
    assert not any("logs" in e["data"] for e in events)
