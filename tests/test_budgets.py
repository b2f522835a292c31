"""Per-key monthly budgets on both job stores: a job whose estimated cost would pass the key's ``monthly_budget``
is refused with 402 ``budget_exceeded`` (and what is left) before any prediction exists; a hold is corrected by
the job's final cost; parallel requests never pass the limit. (Two real nodes on one Redis: test_budget_cluster.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, requests_to, settled

from mvserver.appkeys import JOBS
from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import KeyLimits, create_key

pytestmark = pytest.mark.both_stores

SIGNING = "test-signing-secret-0123456789abcdefghij"
JOB = {"prompt": "a heron over the river at dawn", "duration": 4}  # Veo on Replicate, with audio: 4 x 0.40 = 1.60


async def keyed(make_client: AppClient, tmp_path: Path, budget: float | None) -> tuple[TestClient, dict[str, str]]:
    keys_file = tmp_path / "keys.yaml"
    limits = KeyLimits(jobs_per_minute=6000, jobs_burst=100, max_running_jobs=100, monthly_budget=budget)
    _, key = create_key(keys_file, "spender", limits)
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SIGNING)
    return client, {"Authorization": f"Bearer {key}"}


async def post(client: TestClient, headers: dict[str, str], **body: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/api/mv/generate_video", json={**JOB, **body}, headers=headers)
    return response.status, await response.json()


async def budget(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    return (await (await client.get("/api/mv/usage", headers=headers)).json())["budget"]


async def test_a_job_past_the_budget_is_refused_before_any_prediction(
    make_client: AppClient, tmp_path: Path, sim: Simulator
) -> None:
    sim.video_latency = 30
    client, auth = await keyed(make_client, tmp_path, budget=2.4)
    status, first = await post(client, auth)
    assert status == 202
    status, refused = await post(client, auth)
    assert status == 402, refused
    error = refused["error"]
    assert error["code"] == "budget_exceeded" and "0.8 of 2.4 USD" in error["message"]
    month = (await budget(client, auth))["month"]
    assert error["budget"] == {
        "month": month,
        "limit": 2.4,
        "spent": 1.6,
        "remaining": 0.8,
        "job_estimate": 1.6,
        "currency": "USD",
    }
    listed = (await (await client.get("/api/mv/jobs", headers=auth)).json())["jobs"]
    assert [job["job_id"] for job in listed] == [first["job_id"]]  # no job, so no prediction, for the refusal
    await settled_or_running(client, first["job_id"])
    assert requests_to(sim, "replicate.create") == 1
    status, cheaper = await post(client, auth, generate_audio=False)  # 4 x 0.20 fits in 0.80
    assert status == 202, cheaper
    assert await budget(client, auth) == {"month": month, "limit": 2.4, "spent": 2.4, "remaining": 0.0}


async def settled_or_running(client: TestClient, job_id: str) -> None:
    """Until the job's prediction exists (its stage is generating) or it ended."""
    engine = client.app[JOBS]
    async with asyncio.timeout(10):
        while (job := await engine.get(job_id)).stage not in ("generating", "done"):
            await engine.next_event(job_id, job.last_event_id)


async def test_the_hold_is_corrected_by_the_final_cost(make_client: AppClient, tmp_path: Path, sim: Simulator) -> None:
    sim.video_latency = 30
    client, auth = await keyed(make_client, tmp_path, budget=2.0)
    status, first = await post(client, auth)
    await settled_or_running(client, first["job_id"])
    assert (await budget(client, auth))["spent"] == 1.6
    canceled = await (await client.post(f"/api/mv/jobs/{first['job_id']}/cancel", headers=auth)).json()
    assert canceled["usage"]["cost"]["amount_micros"] == 0  # no output; Veo is billed per output second
    assert (await budget(client, auth))["spent"] == 0.0
    sim.video_latency = 0.1
    status, second = await post(client, auth)
    assert status == 202
    await settled(client, second["job_id"], timeout=10)
    assert (await budget(client, auth))["spent"] == 1.6


async def test_a_job_ended_by_its_deadline_is_accounted_and_its_hold_released(
    make_client: AppClient, tmp_path: Path, sim: Simulator
) -> None:
    sim.video_latency = 3600  # the prediction never finishes: the deadline ends the job
    client, auth = await keyed(make_client, tmp_path, budget=2.0)
    status, accepted = await post(client, auth, deadline_seconds=1)
    assert status == 202, accepted
    assert (await budget(client, auth))["spent"] == 1.6  # held while it runs
    await settled(client, accepted["job_id"], timeout=10)
    state = await (await client.get(accepted["status_url"], headers=auth)).json()
    assert state["error"]["code"] == "deadline_exceeded", state["error"]
    assert state["usage"]["cost"]["amount_micros"] == 0 and state["usage"]["output_seconds"] is None
    assert state["usage"]["wall_seconds"] >= 1
    assert (await budget(client, auth))["spent"] == 0.0  # the hold was settled by the final cost
    listed = (await (await client.get("/api/mv/usage", headers=auth)).json())["jobs"]
    assert [entry["job_id"] for entry in listed] == [accepted["job_id"]]


async def test_a_key_without_a_budget_is_never_refused_but_its_spending_is_counted(
    make_client: AppClient, tmp_path: Path, sim: Simulator
) -> None:
    sim.video_latency = 30
    client, auth = await keyed(make_client, tmp_path, budget=None)
    answers = await asyncio.gather(*(post(client, auth) for _ in range(5)))
    assert [status for status, _ in answers] == [202] * 5
    assert await budget(client, auth) | {"month": None} == {
        "month": None,
        "limit": None,
        "spent": 8.0,
        "remaining": None,
    }


async def test_parallel_requests_never_pass_the_budget(make_client: AppClient, tmp_path: Path, sim: Simulator) -> None:
    sim.video_latency = 30
    client, auth = await keyed(make_client, tmp_path, budget=10.0)  # room for 6 jobs of 1.60
    answers = await asyncio.gather(*(post(client, auth) for _ in range(30)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] * 6 + [402] * 24, statuses
    assert {body["error"]["budget"]["remaining"] for status, body in answers if status == 402} == {0.4}
    assert (await budget(client, auth))["spent"] == 9.6


async def test_a_project_clip_set_past_the_budget_starts_nothing(
    make_client: AppClient, tmp_path: Path, sim: Simulator
) -> None:
    sim.video_latency = 30
    client, auth = await keyed(make_client, tmp_path, budget=4.0)  # two clips of 1.60 fit, not three
    response = await client.post(
        "/api/mv/projects",
        headers=auth,
        json={"idea": "a heron's day", "character_description": "a grey heron", "number_of_scenes": 3},
    )
    assert response.status == 201, await response.text()
    project = await response.json()
    pid, ids = project["project_id"], [scene["id"] for scene in project["scenes"]]
    response = await client.patch(
        f"/api/mv/projects/{pid}",
        headers={**auth, "If-Match": project["etag"]},
        json={"scenes": [{"id": i, "prompt": f"scene {n}", "duration": 4} for n, i in enumerate(ids)]},
    )
    assert response.status == 200, await response.text()
    response = await client.post(f"/api/mv/projects/{pid}/clips", headers=auth)
    assert response.status == 402
    assert (await response.json())["error"]["budget"]["remaining"] == pytest.approx(0.8)
    project = await (await client.get(f"/api/mv/projects/{pid}", headers=auth)).json()
    assert [len(scene["versions"]) for scene in project["scenes"]] == [0, 0, 0]
    listed = (await (await client.get("/api/mv/jobs", headers=auth)).json())["jobs"]
    assert {job["status"] for job in listed} <= {"canceled"}  # the two that fitted were canceled with the refusal
    assert (await budget(client, auth))["spent"] == 0.0  # and their holds given back
