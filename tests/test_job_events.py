"""What a job writes: small events whatever the request, and cancels that log only real failures."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import events_of, submit, wait_for

from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores

EVENT_MAX_BYTES = 4096
LOG_BUDGET_BYTES = 200_000
LONG_JOB_SECONDS, POLL_SECONDS = 400, 2.0  # a long Veo job at the default poll interval


def event_sizes(events: list[dict[str, Any]]) -> list[int]:
    """The size of each event as stored and sent: its data as compact JSON (the store adds a few bytes of id)."""
    return [len(json.dumps(e["data"], separators=(",", ":"), ensure_ascii=False).encode()) for e in events]


async def test_events_stay_small_whatever_the_request(
    client: TestClient, sim: Simulator, live_env: dict[str, str]
) -> None:
    sim.video_latency = 1.0
    prompt = "A lighthouse keeper sings to the fog. " * 100  # ~3,800 characters, within the request limit
    accepted = await submit(client, prompt=prompt[:3900], negative_prompt="blurry, " * 400)
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "succeeded"
    sizes = event_sizes(events)
    assert max(sizes) < EVENT_MAX_BYTES
    assert not any("lighthouse keeper" in json.dumps(e["data"]) or "blurry" in json.dumps(e["data"]) for e in events)
    progress = [size for size, event in zip(sizes, events, strict=False) if event["event"] == "progress"]
    assert len(progress) > 5
    # A 400 s job polled every 2 s writes ~200 progress events; with the status events it stays under budget.
    status_bytes = sum(size for size, event in zip(sizes, events, strict=False) if event["event"] != "progress")
    projected = max(progress) * LONG_JOB_SECONDS / POLL_SECONDS + status_bytes
    assert projected < LOG_BUDGET_BYTES, projected
    state = await (await client.get(accepted["status_url"])).json()
    assert state["request"]["full_prompt"].startswith(prompt[:3900].strip())  # the request is in the record, once


async def test_a_long_provider_error_is_clipped_in_the_event_but_whole_in_the_record(
    client: TestClient, sim: Simulator, live_env: dict[str, str]
) -> None:
    sim.video_latency = 0.3
    sim.add_fault("replicate.create", "fail_prediction", error="E" * 20_000)
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "failed"
    assert max(event_sizes(events)) < EVENT_MAX_BYTES
    state = await (await client.get(accepted["status_url"])).json()
    assert "E" * 20_000 in json.dumps(state["error"])


async def test_poll_events_carry_what_moves_and_status_events_the_full_state(
    client: TestClient, sim: Simulator
) -> None:
    sim.video_latency = 0.6
    accepted = await submit(client, provider_logs=True)  # the provider's log lines move too
    events = await events_of(client, accepted["job_id"])
    progress = [e["data"] for e in events if e["event"] == "progress" and e["data"]["stage"] == "generating"][1:]
    assert progress and all(
        set(p) <= {"job_id", "status", "stage", "progress", "elapsed_seconds", "event_time", "logs"} for p in progress
    )
    assert any("logs" in p for p in progress)
    final = events[-1]["data"]
    assert {"video_url", "sandbox", "backend", "model", "provider_prediction_id"} <= set(final)
    assert "request" not in final


async def test_concurrent_cancels_log_no_false_warning(
    client: TestClient, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    sim.video_latency = 30
    accepted = await submit(client)
    await wait_for(client, accepted["job_id"], lambda s: s["provider_prediction_id"])
    with caplog.at_level(logging.WARNING, logger="mvserver.jobs"):
        answers = await asyncio.gather(*(client.delete(accepted["status_url"]) for _ in range(5)))
    states = [await answer.json() for answer in answers]
    assert all(answer.status == 200 for answer in answers)
    assert all(state["status"] == "canceled" for state in states)
    assert [r.getMessage() for r in caplog.records if "could not cancel" in r.getMessage()] == []


async def test_a_failed_provider_cancel_is_logged_with_its_reason(
    client: TestClient, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    sim.video_latency = 30
    accepted = await submit(client)
    await wait_for(client, accepted["job_id"], lambda s: s["provider_prediction_id"])
    sim.add_fault("replicate.cancel", status=500, body={"detail": "cancel backend down"})
    with caplog.at_level(logging.WARNING, logger="mvserver.jobs"):
        state = await (await client.delete(accepted["status_url"])).json()
    assert state["status"] == "canceled"
    warnings = [r.getMessage() for r in caplog.records if "could not cancel" in r.getMessage()]
    assert len(warnings) == 1 and "cancel backend down" in warnings[0]


@pytest.mark.parametrize("length", [1000, 1001])
async def test_event_errors_are_clipped_exactly_at_the_limit(client: TestClient, sim: Simulator, length: int) -> None:
    sim.video_latency = 0.3
    sim.add_fault("replicate.create", "fail_prediction", error="E" * length)
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    clipped = events[-1]["data"]["error"]["provider_error"]
    assert clipped == ("E" * 1000 if length <= 1000 else "E" * 999 + "…")
    state = await (await client.get(accepted["status_url"])).json()
    assert state["error"]["provider_error"] == "E" * length
