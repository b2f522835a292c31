"""``Idempotency-Key`` on job-creating POSTs, on both job stores: replay, reuse with another body, 20 concurrent
requests making one job, errors not kept, per-key scope, a restart, and a reservation whose request died."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, LiveApp, artefact_keys, module_loop, song_bytes, two_key_client

from mvserver.appkeys import JOBS
from mvserver.sandbox.app import Simulator
from mvserver.web.access.idempotency import Remembered

pytestmark = pytest.mark.both_stores

VIDEO = {"prompt": "a heron learns the trumpet", "duration": 4}
OTHER_ID = "3f2b8a3e-9a5c-4d7e-8b1a-2c3d4e5f6a7b"  # a well-formed id of nothing


async def post(client: TestClient, key: str | None, body: dict[str, Any], **headers: str) -> tuple[int, Any, Any]:
    if key is not None:
        headers["Idempotency-Key"] = key
    async with client.post("/api/mv/generate_video", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def job_count(client: TestClient) -> int:
    return len((await (await client.get("/api/mv/jobs?limit=100")).json())["jobs"])


async def sidecars(client: TestClient) -> list[str]:
    """The songs' sidecars stored (one per saved upload)."""
    return [key for key in await artefact_keys(client, "audio") if key.endswith(".json")]


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
    response = await client.post(
        "/api/mv/lipsync", json={"video_job_id": OTHER_ID, "audio_id": OTHER_ID}, headers={"Idempotency-Key": "k"}
    )
    assert response.status == 422 and (await response.json())["error"]["code"] == "idempotency_key_reused"
    # A malformed body is refused as such: it never holds nor checks a key.
    response = await client.post("/api/mv/lipsync", json={"video_id": "x"}, headers={"Idempotency-Key": "k"})
    assert response.status == 400 and (await response.json())["error"]["code"] == "missing_field"
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
    response = await client.post(
        "/api/mv/generate_video", json=VIDEO, headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")}
    )
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


async def test_every_idempotent_route_honours_the_key(client: TestClient, sim: Simulator) -> None:
    """The same key on each of the other routes, with a valid request: 422, and nothing is made."""
    from mvserver.openapi.schemas import IDEMPOTENT_PATHS

    sim.video_latency = 30
    assert (await post(client, "one-action", VIDEO))[0] == 202
    project = await (
        await client.post(
            "/api/mv/projects", json={"idea": "a song", "character_description": "a singer", "number_of_scenes": 1}
        )
    ).json()
    ids = {"{project_id}": project["project_id"], "{scene_id}": project["scenes"][0]["id"]}
    bodies = {
        "/api/mv/lipsync": {"video_job_id": OTHER_ID, "audio_id": OTHER_ID},
        "/api/mv/assemble": {"clips": [{"job_id": OTHER_ID}]},
        "/api/mv/projects": {"idea": "a song", "character_description": "a singer"},
    }

    def provider_calls() -> list[tuple[str, str]]:
        return [(route, path) for route, path in sim.requests if not route.endswith(".get")]  # not the job's polls

    before = provider_calls()
    for template in IDEMPOTENT_PATHS:
        if template == "/api/mv/generate_video":
            continue
        path = template
        for name, value in ids.items():
            path = path.replace(name, value)
        if template == "/api/mv/upload_audio":
            response = await client.post(
                path,
                data=b"ID3 not really a song",
                headers={"Idempotency-Key": "one-action", "Content-Type": "audio/mpeg"},
            )
        else:
            response = await client.post(path, json=bodies.get(template, {}), headers={"Idempotency-Key": "one-action"})
        assert response.status == 422, (template, await response.text())
        assert (await response.json())["error"]["code"] == "idempotency_key_reused", template
    assert await job_count(client) == 1 and provider_calls() == before
    assert (await (await client.get(f"/api/mv/projects/{project['project_id']}")).json())["version"] == 1
    assert await sidecars(client) == []


async def test_a_retry_that_differs_only_in_what_the_server_normalises_is_the_same_request(
    client: TestClient, sim: Simulator
) -> None:
    sim.video_latency = 30
    status, first, _ = await post(client, "spaces", VIDEO)
    assert status == 202
    padded = {**VIDEO, "prompt": f"  {VIDEO['prompt']}\n", "duration": 4.0, "aspect_ratio": "16:9"}  # trimmed, 4.0
    status, again, headers = await post(client, "spaces", padded)  # is 4, and 16:9 is the default
    assert status == 202 and again == first and headers["Idempotent-Replayed"] == "true"
    assert await job_count(client) == 1

    created = {"idea": "a rainy night", "character_description": "a singer", "number_of_scenes": 2}
    first_project = await client.post("/api/mv/projects", json=created, headers={"Idempotency-Key": "project"})
    assert first_project.status == 201
    retry = await client.post(
        "/api/mv/projects",
        json={**created, "idea": " a rainy night \t", "style": None},
        headers={"Idempotency-Key": "project"},
    )
    assert retry.status == 201 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.headers["Location"] == first_project.headers["Location"]
    assert retry.headers["ETag"] == first_project.headers["ETag"]
    assert (await retry.json())["project_id"] == (await first_project.json())["project_id"]
    other = await client.post(
        "/api/mv/projects", json={**created, "idea": "a sunny day"}, headers={"Idempotency-Key": "project"}
    )
    assert other.status == 422


@pytest.mark.both_backends
async def test_project_actions_and_uploads_replay_instead_of_calling_the_provider_again(
    client: TestClient, sim: Simulator
) -> None:
    project = await (
        await client.post(
            "/api/mv/projects", json={"idea": "a song", "character_description": "a singer", "number_of_scenes": 2}
        )
    ).json()
    base = f"/api/mv/projects/{project['project_id']}"
    for action, body in (("write_scenes", {"camera_angle": "side"}), ("character", {"negative_prompt": "blurry"})):
        calls = len(sim.requests)
        project = await (await client.get(base)).json()
        first = await client.post(
            f"{base}/{action}", json=body, headers={"Idempotency-Key": action, "If-Match": project["etag"]}
        )
        assert first.status == 200, await first.text()
        made = len(sim.requests)
        assert made > calls
        # The retry still names the ETag the first request moved on: it gets the first answer, not a 412.
        retry = await client.post(
            f"{base}/{action}",
            json={k: f" {v} " for k, v in body.items()},
            headers={"Idempotency-Key": action, "If-Match": project["etag"]},
        )
        assert retry.status == 200 and retry.headers["Idempotent-Replayed"] == "true", await retry.text()
        assert await retry.json() == await first.json() and len(sim.requests) == made
    final = await (await client.get(base)).json()
    assert final["version"] == 3  # one write per action

    song = song_bytes()
    raw = await client.post(
        "/api/mv/upload_audio", data=song, headers={"Idempotency-Key": "song", "Content-Type": "audio/mpeg"}
    )
    assert raw.status == 201, await raw.text()
    form = aiohttp.FormData()
    form.add_field("file", song, filename="song.mp3", content_type="audio/mpeg")
    again = await client.post("/api/mv/upload_audio", data=form, headers={"Idempotency-Key": "song"})
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["audio_id"] == (await raw.json())["audio_id"]
    assert len(await sidecars(client)) == 1
    other = await client.post(
        "/api/mv/upload_audio", data=song + b"\0", headers={"Idempotency-Key": "song", "Content-Type": "audio/mpeg"}
    )
    assert other.status == 422
