"""``deadline_seconds``: a job whose prediction never finishes is canceled at the provider and fails with
``deadline_exceeded``; Replicate also gets the deadline as its own ``Cancel-After``, which the simulator honours."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import AppClient, events_of, has_artefact, statuses, submit

from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores

AUTH = {"Authorization": "Bearer r8_test"}
VEO = "/replicate/v1/models/google/veo-3.1/predictions"


def routes(sim: Simulator, name: str) -> list[str]:
    return [path for route, path in sim.requests if route == name]


async def test_a_prediction_that_never_finishes_is_canceled_at_the_provider(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 3600  # never finishes within the test
    started = time.time()
    accepted = await submit(client, deadline_seconds=1.5)
    async with asyncio.timeout(15):
        events = await events_of(client, accepted["job_id"])
    assert statuses(events)[-1] == "failed"
    state = await (await client.get(accepted["status_url"])).json()
    assert state["error"]["code"] == "deadline_exceeded", state["error"]
    assert state["request"]["deadline_seconds"] == 1.5
    assert state["deadline_at"] == pytest.approx(state["created_at"] + 1.5)
    assert 1.5 <= state["finished_at"] - state["created_at"] < 5 and time.time() - started >= 1.5
    prediction_id = state["provider_prediction_id"]
    record = sim.load("predictions", prediction_id)
    assert record["status"] == "canceled"  # stopped at the provider: by our cancel, or by its own Cancel-After
    assert 1 <= record["cancel_after"] <= 2  # Replicate was given the deadline as its own Cancel-After too
    # our cancel is sent unless the provider's own deadline (counted from the prediction's creation) came first
    assert routes(sim, "replicate.cancel") in ([f"/replicate/v1/predictions/{prediction_id}/cancel"], [])
    response = await client.get(f"/api/mv/get_video/{accepted['job_id']}")
    assert response.status == 409 and (await response.json())["error"]["code"] == "job_failed"


@pytest.mark.both_backends
async def test_nothing_is_downloaded_after_the_deadline(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.1
    warm = await submit(
        client
    )  # the same clip rendered once, so the deadline below is spent downloading, not rendering
    async with asyncio.timeout(60):
        assert statuses(await events_of(client, warm["job_id"]))[-1] == "succeeded"
    sim.add_fault("replicate.files.get", "hang", times=10)  # the output never arrives
    accepted = await submit(client, deadline_seconds=3)
    async with asyncio.timeout(30):
        events = await events_of(client, accepted["job_id"])
    assert statuses(events)[-1] == "failed"
    assert events[-1]["data"]["error"]["code"] == "deadline_exceeded"
    assert any(e["data"].get("stage") == "downloading" for e in events)  # it was cut off while downloading
    assert not await has_artefact(client, f"videos/{accepted['job_id']}.mp4")
    response = await client.get(f"/api/mv/get_video/{accepted['job_id']}")
    assert response.status == 409


async def test_a_gemini_job_ends_at_its_deadline(client: TestClient, sim: Simulator) -> None:
    """Veo has no deadline of its own and no cancel: the job stops polling and fails at the deadline."""
    sim.video_latency = 3600
    accepted = await submit(client, backend="gemini", deadline_seconds=1)
    async with asyncio.timeout(15):
        events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "failed" and events[-1]["data"]["error"]["code"] == "deadline_exceeded"
    assert routes(sim, "replicate.create") == []


async def test_without_a_deadline_no_cancel_after_is_sent(client: TestClient, sim: Simulator) -> None:
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    assert statuses(events)[-1] == "succeeded"
    state = await (await client.get(accepted["status_url"])).json()
    assert state["deadline_at"] is None
    assert sim.load("predictions", state["provider_prediction_id"])["cancel_after"] is None


@pytest.mark.store_independent
@pytest.mark.parametrize("value", [0, 0.5, -1, 3601, "10", True])
async def test_deadline_seconds_out_of_bounds_is_refused_naming_the_field(client: TestClient, value: Any) -> None:
    response = await client.post("/api/mv/generate_video", json={"prompt": "a cat", "deadline_seconds": value})
    assert response.status == 400
    assert (await response.json())["error"]["field"] == "deadline_seconds"


async def test_the_bound_is_a_setting(make_client: AppClient, settings_dir: Any) -> None:
    from helpers import jobs_settings

    jobs_settings(settings_dir, max_deadline_seconds=60)
    client = await make_client()
    response = await client.post("/api/mv/generate_video", json={"prompt": "a cat", "deadline_seconds": 61})
    assert response.status == 400 and (await response.json())["error"]["field"] == "deadline_seconds"
    assert "60" in (await response.json())["error"]["message"]
    response = await client.post(
        "/api/mv/assemble", json={"clips": [{"job_id": "00000000-0000-4000-8000-000000000000"}], "deadline_seconds": 61}
    )
    assert response.status == 400 and (await response.json())["error"]["field"] == "deadline_seconds"


# -- the simulator honours Cancel-After like Replicate ------------------------------------------------------------


async def _create(sim_server: TestServer, cancel_after: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            sim_server.make_url(VEO),
            headers={**AUTH, "Cancel-After": cancel_after},
            json={"input": {"prompt": "a cat", "duration": 4}},
        )
        await response.read()
        return response


async def _ended(sim_server: TestServer, prediction_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, asyncio.timeout(10):
        while True:
            async with session.get(
                sim_server.make_url(f"/replicate/v1/predictions/{prediction_id}"), headers=AUTH
            ) as response:
                body = await response.json()
            if body["status"] not in ("starting", "processing"):
                return body
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(("latency", "cancel_after", "status"), [(3600, "300ms", "aborted"), (2, "1s", "canceled")])
async def test_the_simulator_ends_a_prediction_at_its_cancel_after(
    sim: Simulator, sim_server: TestServer, latency: float, cancel_after: str, status: str
) -> None:
    sim.video_latency = latency
    response = await _create(sim_server, cancel_after)
    assert response.status == 201
    body = await response.json()
    ended = await _ended(sim_server, body["id"])
    assert ended["status"] == status and ended["output"] is None and ended["completed_at"] is not None


async def test_the_simulator_refuses_a_malformed_cancel_after(sim_server: TestServer) -> None:
    response = await _create(sim_server, "soon")
    assert response.status == 400
