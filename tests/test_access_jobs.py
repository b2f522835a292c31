"""Access control of jobs on both job stores: a key's running-jobs cap, applied by the job engine (jobs beyond it
wait queued and start as the key's other jobs end), and what ``GET /api/mv/me`` reports of it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, read_sse

from mvserver.appkeys import JOBS
from mvserver.web.access.auth import KeyLimits, create_key

pytestmark = pytest.mark.both_stores

SECRET = "test-signing-secret-0123456789abcdefghij"
VIDEO = {"prompt": "a drummer on a rooftop", "duration": 4, "generate_audio": False}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def until(client: TestClient, key: str, job_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Follow the job's event stream until an event's state satisfies ``done``; that state."""
    state: dict[str, Any] = {}
    async with client.get(f"/api/mv/jobs/{job_id}/events", headers=bearer(key), timeout=60) as stream:
        async for event in read_sse(stream):
            state = {**state, **event["data"]}
            if done(state):
                return state
    raise AssertionError(f"job {job_id} ended as {state.get('status')}")


def running(state: dict[str, Any]) -> bool:
    return state["status"] == "running"


def final(state: dict[str, Any]) -> bool:
    return state["status"] in ("succeeded", "failed", "canceled")


async def test_jobs_beyond_the_running_cap_wait_queued_and_start_as_the_keys_other_jobs_end(
    make_client: AppClient, tmp_path: Path, sim: Any
) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice_record, alice = create_key(
        keys_file, "alice", KeyLimits(jobs_per_minute=0.6, jobs_burst=50, max_running_jobs=2)
    )
    _, bob = create_key(keys_file, "bob", KeyLimits(jobs_per_minute=600, jobs_burst=50, max_running_jobs=2))
    sim.video_latency = 60.0  # the jobs stay running until canceled
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    engine = client.app[JOBS]
    started = []
    for _ in range(4):  # twice the cap: every request is accepted
        response = await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(alice))
        assert response.status == 202, await response.text()
        started.append((await response.json())["job_id"])
    first, second, third, fourth = started
    for job_id in (first, second):
        await until(client, alice, job_id, running)
    assert await engine.places(alice_record.id) == (2, 2)
    me = await (await client.get("/api/mv/me", headers=bearer(alice))).json()
    assert me["key_id"] == alice_record.id and me["jobs"] == {"running": 2, "waiting": 2}
    assert me["limits"]["max_running_jobs"] == 2 and 46 <= me["tokens"]["jobs"] < 46.5  # 4 taken
    document = await (await client.get("/api/mv/openapi.json", headers=bearer(alice))).json()
    operation = document["paths"]["/api/mv/me"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
    assert operation["operationId"] == "getMe" and set(schema["required"]) == set(me)
    assert set(schema["properties"]["jobs"]["properties"]) == set(me["jobs"])
    assert set(schema["properties"]["tokens"]["properties"]) == set(me["tokens"])
    assert set(schema["properties"]["limits"]["properties"]) == set(me["limits"])
    for job_id in (third, fourth):  # held: nothing happened to them but their queued event
        assert [e.event for e in await engine.events(job_id, 0)] == ["queued"]
    # Another key has its own places.
    other = await (await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(bob))).json()
    await until(client, bob, other["job_id"], running)

    # A held job can be canceled; it frees nothing and takes no place.
    canceled = await (await client.delete(f"/api/mv/jobs/{fourth}", headers=bearer(alice))).json()
    assert canceled["status"] == "canceled"
    assert await engine.places(alice_record.id) == (2, 1)
    # A job of the key ending lets the next one in, in order.
    assert (await client.delete(f"/api/mv/jobs/{first}", headers=bearer(alice))).status == 200
    await until(client, alice, first, final)
    await until(client, alice, third, running)
    assert await engine.places(alice_record.id) == (2, 0)
    me = await (await client.get("/api/mv/me", headers=bearer(alice))).json()
    assert me["jobs"] == {"running": 2, "waiting": 0}
    for job_id in (second, third, other["job_id"]):
        await client.delete(f"/api/mv/jobs/{job_id}", headers=bearer(alice if job_id != other["job_id"] else bob))
    assert await engine.places(alice_record.id) == (0, 0)


async def test_held_jobs_keep_their_turn_across_a_restart(make_client: AppClient, tmp_path: Path, sim: Any) -> None:
    keys_file = tmp_path / "keys.yaml"
    record, key = create_key(keys_file, "alice", KeyLimits(jobs_per_minute=600, jobs_burst=50, max_running_jobs=1))
    sim.video_latency = 60.0
    env = {"MV_API_KEYS_FILE": keys_file, "MV_URL_SIGNING_SECRET": SECRET}
    client = await make_client(**env)
    jobs = [
        (await (await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(key))).json())["job_id"]
        for _ in range(3)
    ]
    await until(client, key, jobs[0], running)
    await client.close()  # the same outputs (or Redis prefix) for the next app: the jobs resume
    client = await make_client(**env)
    assert await client.app[JOBS].places(record.id) == (1, 2)
    await until(client, key, jobs[0], running)
    assert [e.event for e in await client.app[JOBS].events(jobs[2], 0)] == ["queued"]
    await client.delete(f"/api/mv/jobs/{jobs[0]}", headers=bearer(key))
    await until(client, key, jobs[1], running)  # in order: the second, not the third
    assert [e.event for e in await client.app[JOBS].events(jobs[2], 0)] == ["queued"]
    for job_id in jobs[1:]:
        await client.delete(f"/api/mv/jobs/{job_id}", headers=bearer(key))
