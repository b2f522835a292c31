"""Usage and cost per job on both job stores: what a job used (provider, model, output seconds, Replicate's
metrics, queue and wall time, retries) and its estimated cost from ``settings/pricing.yaml``, in the job JSON, its
final event (also on the project's stream) and the listing; sandbox jobs cost 0 and say so. (The price table's start-up checks: test_config.)"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, events_of, named, new_project, read_until, submit, wait_for
from helpers import finished as all_finished

from mvserver.appkeys import CONFIG
from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores


def price(client: TestClient, model: str) -> dict[str, Any]:
    return client.app[CONFIG].pricing.models[model].model_dump()


async def finished(client: TestClient, job_id: str) -> dict[str, Any]:
    return await wait_for(client, job_id, lambda state: state["status"] in ("succeeded", "failed", "canceled"))


async def test_a_job_records_its_usage_and_cost_in_json_final_event_and_listing(
    client: TestClient, sim: Simulator
) -> None:
    sim.video_latency = 0.3
    job_id = (await submit(client, duration=6, generate_audio=False))["job_id"]
    job = await finished(client, job_id)
    assert job["status"] == "succeeded"
    usage = job["usage"]
    assert usage["provider"] == "replicate" and usage["model"] == "google/veo-3.1"
    assert usage["output_seconds"] == 6 and usage["images"] == 0 and usage["retries"] == 0
    predict_time = usage["provider_metrics"]["predict_time"]
    assert 0.2 <= predict_time <= usage["provider_metrics"]["total_time"]  # the simulator's run, as Replicate says
    assert 0 <= usage["queue_seconds"] <= usage["wall_seconds"] <= job["elapsed_seconds"] + 0.01
    rates = price(client, "google/veo-3.1")
    expected = 6 * rates["per_output_second_without_audio"] + predict_time * rates["per_prediction_second"]
    cost = usage["cost"]
    assert cost["amount_micros"] == round(expected * 1_000_000) and cost["amount"] == cost["amount_micros"] / 1e6
    assert cost["currency"] == rates["currency"] and cost["as_of"] == rates["as_of"].isoformat()
    assert cost["basis"] == "price_table" and cost["estimated"] is True
    final = (await events_of(client, job_id))[-1]
    assert final["event"] == "succeeded" and final["data"]["usage"] == usage
    listed = (await (await client.get("/api/mv/jobs")).json())["jobs"]
    assert [item["usage"] for item in listed if item["job_id"] == job_id] == [usage]


async def test_a_project_streams_each_clip_jobs_usage_with_its_final_event(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.3
    project = await new_project(client)
    async with client.get(project["events_url"]) as stream:
        events = await read_until(stream, [], lambda e: len(e) == 1)
        response = await client.post(f"/api/mv/projects/{project['project_id']}/clips")
        assert response.status == 202, await response.text()
        job_ids = [job["job_id"] for job in (await response.json())["jobs"]]
        await read_until(stream, events, all_finished(job_ids))
    for event in named(events, "succeeded"):
        job = await (await client.get(f"/api/mv/jobs/{event['data']['job_id']}")).json()
        assert job["usage"]["output_seconds"] == 4 and event["data"]["usage"] == job["usage"]
    assert sorted(e["data"]["job_id"] for e in named(events, "succeeded")) == sorted(job_ids)


async def test_audio_costs_the_audio_rate_and_a_running_job_has_no_usage_yet(
    client: TestClient, sim: Simulator
) -> None:
    sim.video_latency = 30
    running = (await submit(client))["job_id"]
    state = await wait_for(client, running, lambda s: s["stage"] == "generating")
    assert state["usage"] is None
    sim.video_latency = 0.1
    job = await finished(client, (await submit(client, duration=4, generate_audio=True))["job_id"])
    assert job["usage"]["cost"]["amount_micros"] == round(
        4 * price(client, "google/veo-3.1")["per_output_second"] * 1e6
    )


async def test_retries_are_counted(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.2
    sim.add_fault("replicate.get", "status", status=503, times=2)
    job = await finished(client, (await submit(client))["job_id"])
    assert job["status"] == "succeeded" and job["usage"]["retries"] == 2


async def test_a_canceled_job_costs_its_run_time_and_no_output(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 5
    job_id = (await submit(client))["job_id"]
    await wait_for(client, job_id, lambda s: (s["progress"] or 0) > 0)  # the model runs (past "starting")
    job = await (await client.post(f"/api/mv/jobs/{job_id}/cancel")).json()
    assert job["status"] == "canceled"
    usage = job["usage"]
    assert usage["output_seconds"] is None
    seconds = usage["provider_metrics"]["predict_time"]  # Replicate reports the run time of a canceled prediction
    assert 0 < seconds < 5
    rates = price(client, "google/veo-3.1")
    assert usage["cost"]["amount_micros"] == round(seconds * rates["per_prediction_second"] * 1e6)


async def test_sandbox_jobs_cost_nothing_and_say_so(make_client: AppClient) -> None:
    client = await make_client(MV_SANDBOX="true", MV_SANDBOX_VIDEO_SECONDS="0.1")
    job = await finished(client, (await submit(client))["job_id"])
    assert job["sandbox"] is True
    cost = job["usage"]["cost"]
    assert cost["basis"] == "sandbox" and cost["amount_micros"] == 0 and cost["amount"] == 0
