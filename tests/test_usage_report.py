"""``GET /api/mv/usage`` on both job stores: a report that survives a restart (and retention), whose totals are
the sum of the jobs it lists, per key (every key for an admin key), grouped by model, kind or day."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, submit, wait_for

from mvserver.appkeys import JOBS
from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import KeyLimits, create_key

pytestmark = pytest.mark.both_stores

SIGNING = "test-signing-secret-0123456789abcdefghij"


async def report(client: TestClient, query: str = "", headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.get(f"/api/mv/usage{query}", headers=headers)
    assert response.status == 200, await response.text()
    return await response.json()


async def settled(client: TestClient, job_id: str) -> None:
    """Until the job is final, awaiting each new event (no polling)."""
    engine = client.app[JOBS]
    async with asyncio.timeout(10):
        while not (job := await engine.get(job_id)).final:
            await engine.next_event(job_id, job.last_event_id)


def assert_adds_up(body: dict[str, Any]) -> None:
    jobs = body["jobs"]
    totals = body["totals"]
    assert totals["jobs"] == len(jobs)
    assert totals["cost_micros"] == sum(entry["cost_micros"] for entry in jobs)
    assert totals["cost"] == totals["cost_micros"] / 1e6
    for name in ("jobs", "cost_micros"):
        assert sum(group[name] for group in body["groups"]) == totals[name]


async def test_the_report_survives_a_restart_and_adds_up_to_its_jobs(make_client: AppClient, sim: Simulator) -> None:
    client = await make_client()
    sim.video_latency = 0.2
    finished = {}
    for body in ({"duration": 4}, {"duration": 8, "generate_audio": False}):
        job_id = (await submit(client, **body))["job_id"]
        finished[job_id] = await wait_for(client, job_id, lambda s: s["status"] == "succeeded")
    sim.video_latency = 30
    canceled = (await submit(client))["job_id"]
    await wait_for(client, canceled, lambda s: s["stage"] == "generating")
    finished[canceled] = await (await client.post(f"/api/mv/jobs/{canceled}/cancel")).json()
    await client.close()

    client = await make_client()  # a new process on the same store
    body = await report(client)
    assert {entry["job_id"] for entry in body["jobs"]} == set(finished)
    by_id = {entry["job_id"]: entry for entry in body["jobs"]}
    for job_id, job in finished.items():
        assert by_id[job_id]["cost_micros"] == job["usage"]["cost"]["amount_micros"]
        assert by_id[job_id]["status"] == job["status"] and by_id[job_id]["model"] == job["model"]
    assert body["totals"]["cost_micros"] == sum(j["usage"]["cost"]["amount_micros"] for j in finished.values()) > 0
    assert body["totals"]["output_seconds"] == 12 and body["currency"] == "USD" and body["all_keys"] is False
    assert_adds_up(body)
    assert [g["key"] for g in body["groups"]] == ["google/veo-3.1"]
    by_day = await report(client, "?group_by=day")
    assert [g["key"] for g in by_day["groups"]] == [time.strftime("%Y-%m-%d", time.gmtime())]
    assert_adds_up(by_day)
    assert (await report(client, "?from=2000-01-01&to=2000-12-31"))["jobs"] == []

    # retention removes the jobs; the ledger keeps what they cost
    removed = await client.app[JOBS].store.expire(time.time() + 1, time.time() + 60)
    assert set(finished) <= set(removed)
    assert (await report(client))["totals"] == body["totals"]


async def test_a_key_sees_its_own_usage_and_an_admin_key_every_key(
    make_client: AppClient, tmp_path: Path, sim: Simulator
) -> None:
    keys_file = tmp_path / "keys.yaml"
    limits = KeyLimits(jobs_per_minute=600, jobs_burst=50)
    _, alice = create_key(keys_file, "alice", limits)
    _, bob = create_key(keys_file, "bob", limits)
    _, admin = create_key(keys_file, "ops", limits, admin=True)
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SIGNING)
    sim.video_latency = 0.1
    owners = {}
    for name, key in (("alice", alice), ("bob", bob), ("alice", alice)):
        headers = {"Authorization": f"Bearer {key}"}
        response = await client.post(
            "/api/mv/generate_video", json={"prompt": "a heron", "duration": 4}, headers=headers
        )
        job_id = (await response.json())["job_id"]
        await settled(client, job_id)
        owners[job_id] = name
    as_alice = await report(client, headers={"Authorization": f"Bearer {alice}"})
    assert {e["job_id"] for e in as_alice["jobs"]} == {j for j, name in owners.items() if name == "alice"}
    assert as_alice["budget"]["limit"] is None and as_alice["budget"]["spent"] == as_alice["totals"]["cost"]
    as_admin = await report(client, "?group_by=kind", headers={"Authorization": f"Bearer {admin}"})
    assert {e["job_id"] for e in as_admin["jobs"]} == set(owners) and as_admin["all_keys"] is True
    assert [g["key"] for g in as_admin["groups"]] == ["video"]
    assert_adds_up(as_admin)
    assert (await client.get("/api/mv/usage")).status == 401


@pytest.mark.store_independent
@pytest.mark.parametrize(
    "query, field",
    [
        ("?group_by=week", "group_by"),
        ("?from=yesterday", "from"),
        ("?to=2026-13-01", "to"),
        ("?from=2026-02-01&to=2026-01-01", "to"),
        ("?from=2000-01-01&to=2026-01-01", "from"),
    ],
)
async def test_bad_parameters_are_400_naming_the_field(client: TestClient, query: str, field: str) -> None:
    response = await client.get(f"/api/mv/usage{query}")
    assert response.status == 400
    assert (await response.json())["error"]["field"] == field


async def test_a_job_entered_twice_counts_once(client: TestClient) -> None:
    """A node that dies between a job's ledger entry and its final event leaves the job to run again: its second
    entry replaces the first."""
    book = client.app[JOBS].book
    now = time.time()
    entry = {
        "job_id": "0b9d3a8e-3a43-4a4e-9d59-2f8f3f6f9d11",
        "owner": None,
        "kind": "video",
        "backend": "replicate",
        "model": "google/veo-3.1",
        "sandbox": False,
        "status": "succeeded",
        "created_at": now - 5,
        "finished_at": now - 1,
        "output_seconds": 4.0,
        "predict_seconds": 3.0,
        "cost_micros": 1_600_000,
        "currency": "USD",
        "basis": "price_table",
    }
    await book.record(entry)
    await book.record({**entry, "finished_at": now, "cost_micros": 1_700_000})
    body = await report(client)
    assert [(e["job_id"], e["cost_micros"]) for e in body["jobs"]] == [(entry["job_id"], 1_700_000)]
    assert body["totals"]["cost_micros"] == 1_700_000
