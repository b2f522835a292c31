"""``Idempotency-Key`` on job-creating POSTs, on both job stores: replay, reuse with another body, 20 concurrent
requests making one job, errors not kept, per-key scope, a restart, and a reservation whose request died."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mvserver.jobs import JOBS
from mvserver.jobs.store import Remembered
from mvserver.sandbox.simulator import Simulator
from conftest import AppClient, LiveApp, module_loop, two_key_client

pytestmark = pytest.mark.both_stores

VIDEO = {"prompt": "a heron learns the trumpet", "duration": 4}


async def post(client: TestClient, key: str | None, body: dict[str, Any], **headers: str) -> tuple[int, Any, Any]:
    if key is not None:
        headers["Idempotency-Key"] = key
    async with client.post("/api/mv/generate_video", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def job_count(client: TestClient) -> int:
    return len((await (await client.get("/api/mv/jobs?limit=100")).json())["jobs"])


async def test_the_same_key_and_body_return_the_first_job(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    status, first, headers = await post(client, "order-1", VIDEO)
    assert status == 202 and "Idempotent-Replayed" not in headers
    reordered = dict(reversed(list(VIDEO.items())))  # key order does not make another body
    status, again, headers = await post(client, "order-1", reordered)
    assert status == 202 and again == first and headers["Idempotent-Replayed"] == "true"
    assert headers["Location"] == first["status_url"]
    assert await job_count(client) == 1
    status, other, _ = await post(client, "order-2", VIDEO)  # another key: another job
    assert status == 202 and other["job_id"] != first["job_id"]


async def test_the_same_key_with_another_body_is_422(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    assert (await post(client, "k", VIDEO))[0] == 202
    status, body, _ = await post(client, "k", {**VIDEO, "duration": 8})
    assert status == 422
    assert body["error"]["code"] == "idempotency_key_reused" and body["error"]["field"] == "Idempotency-Key"
    # The same key on another route is another request too.
    response = await client.post("/api/mv/lipsync", json={"video_id": "x"}, headers={"Idempotency-Key": "k"})
    assert response.status == 422 and (await response.json())["error"]["code"] == "idempotency_key_reused"
    assert await job_count(client) == 1


async def test_twenty_concurrent_identical_requests_create_one_job(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    answers = await asyncio.gather(*(post(client, "burst", VIDEO) for _ in range(20)))
    assert {status for status, _, _ in answers} == {202}
    assert len({body["job_id"] for _, body, _ in answers}) == 1
    assert sum(1 for _, _, headers in answers if "Idempotent-Replayed" not in headers) == 1
    assert await job_count(client) == 1


async def test_an_error_is_not_kept_so_the_key_can_be_retried(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    status, body, _ = await post(client, "retry-me", {"prompt": "a heron", "duration": 5})
    assert status == 400 and body["error"]["field"] == "duration"
    status, body, headers = await post(client, "retry-me", VIDEO)  # fixed body, same key
    assert status == 202 and "Idempotent-Replayed" not in headers
    assert await job_count(client) == 1


@pytest.mark.parametrize("key", ["", "   ", "x" * 256, "tab\there", "caf\u00e9"])
@module_loop
async def test_a_malformed_key_is_400(module_live: LiveApp, key: str) -> None:
    client = module_live[0]  # one app for the module's refusals: none of them may create a job
    response = await client.post("/api/mv/generate_video", json=VIDEO,
                                 headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    assert response.status == 400
    assert (await response.json())["error"]["field"] == "Idempotency-Key"
    assert await job_count(client) == 0


async def test_keys_are_scoped_to_the_api_key(make_client: AppClient, tmp_path: Path, sim: Simulator) -> None:
    sim.video_latency = 30
    client, alice, bob = await two_key_client(make_client, tmp_path)
    _, for_alice, _ = await post(client, "shared", VIDEO, Authorization=f"Bearer {alice}")
    status, for_bob, headers = await post(client, "shared", VIDEO, Authorization=f"Bearer {bob}")
    assert status == 202 and for_bob["job_id"] != for_alice["job_id"] and "Idempotent-Replayed" not in headers


async def test_the_answer_survives_a_restart(make_client: AppClient, sim: Simulator) -> None:
    sim.video_latency = 30
    first_app = await make_client()
    _, first, _ = await post(first_app, "durable", VIDEO)
    await first_app.close()
    second_app = await make_client()  # same output directory, or same Redis prefix
    status, again, headers = await post(second_app, "durable", VIDEO)
    assert status == 202 and again["job_id"] == first["job_id"] and headers["Idempotent-Replayed"] == "true"


async def test_a_reservation_whose_request_died_lapses(client: TestClient) -> None:
    store = client.app[JOBS].store
    key = "a" * 64
    assert await store.remember(key, Remembered("1" * 32, "fp"), pending_seconds=0.3) is None
    kept = await store.remember(key, Remembered("2" * 32, "fp"), pending_seconds=0.3)
    assert kept is not None and kept.token == "1" * 32 and kept.status is None
    await store.forget(key, "2" * 32)  # not the holder: nothing happens
    assert (await store.remember(key, Remembered("2" * 32, "fp"), pending_seconds=0.3)) is not None
    await asyncio.sleep(0.5)
    assert await store.remember(key, Remembered("3" * 32, "fp"), pending_seconds=0.3) is None


async def test_every_job_creating_route_honours_the_key(client: TestClient, sim: Simulator) -> None:
    from mvserver.schemas import JOB_CREATING_PATHS

    sim.video_latency = 30
    assert (await post(client, "one-action", VIDEO))[0] == 202
    ids = {"{project_id}": "0b6f2d0e-5b8f-4d5c-9a53-3f0f1a2b3c4d", "{scene_id}": "1c7f3e1f-6c9f-4e6d-8b64-4a1a2b3c4d5e"}
    for template in JOB_CREATING_PATHS:
        if template == "/api/mv/generate_video":
            continue
        path = template
        for name, value in ids.items():
            path = path.replace(name, value)
        response = await client.post(path, json={}, headers={"Idempotency-Key": "one-action"})
        assert response.status == 422, (template, await response.text())
        assert (await response.json())["error"]["code"] == "idempotency_key_reused", template
