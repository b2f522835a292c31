"""Quotas on every job-creating POST (lip sync, project clips, assembly) and the blocking project actions: a token
per job, nothing for a malformed request, 429 + Retry-After, and the running-jobs cap counting every kind of job."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mvserver.auth import KeyLimits, create_key
from mvserver.sandbox.simulator import Simulator
from conftest import AppClient
from test_lipsync import PROMPT, make_song, wait_for

pytestmark = pytest.mark.both_stores

SECRET = "test-signing-secret-0123456789abcdefghij"
PROJECTS = "/api/mv/projects"
FINAL = ("succeeded", "failed", "canceled")
SLOW = 0.5  # tokens a minute: nothing refills during a test


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def ok(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    return await response.json()


async def project_with_prompts(client: TestClient, scenes: int, audio_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"idea": "a song", "character_description": "a singer", "number_of_scenes": scenes}
    if audio_id is not None:
        body["audio_id"] = audio_id
    project = await ok(await client.post(PROJECTS, json=body), 201)
    patch = {"scenes": [{"id": s["id"], "prompt": PROMPT, "duration": 4} for s in project["scenes"]]}
    return await ok(await client.patch(f"{PROJECTS}/{project['project_id']}", json=patch,
                                       headers={"If-Match": project["etag"]}), 200)


async def keyless_setup(make_client: AppClient, sim: Simulator) -> dict[str, Any]:
    """Made with keys off (so every key may use them): a song, a project whose two scenes have finished chosen clips,
    and a project with two prompted scenes and no clips yet."""
    client = await make_client()
    sim.video_latency = 0.2
    audio_id = make_song(client, 10.0, "mp3")
    done = await project_with_prompts(client, 2, audio_id)
    pid = done["project_id"]
    started = await ok(await client.post(f"{PROJECTS}/{pid}/clips", json={"generate_audio": False}), 202)
    clips = [job["job_id"] for job in started["jobs"]]
    for job_id in clips:
        assert (await wait_for(client, job_id, lambda s: s["status"] in FINAL, 60))["status"] == "succeeded"
    fresh = await project_with_prompts(client, 2)
    await client.close()  # the keyed app below takes over the same outputs (and Redis prefix)
    return {"audio_id": audio_id, "clip": clips[0], "pid": pid, "scene": done["scenes"][0]["id"],
            "fresh": fresh["project_id"], "fresh_scene": fresh["scenes"][0]["id"]}


async def test_every_job_creating_post_is_charged_after_validation(make_client: AppClient, sim: Simulator,
                                                                   tmp_path: Path) -> None:
    made = await keyless_setup(make_client, sim)
    sim.video_latency = 60.0  # jobs started below stay running
    pid, fresh = made["pid"], made["fresh"]
    one_job = KeyLimits(jobs_per_minute=SLOW, jobs_burst=1, max_running_jobs=None)
    one_call = KeyLimits(blocking_per_minute=SLOW, blocking_burst=1)
    # (route, malformed body and its field, valid body, limits): the malformed request costs nothing, the valid one
    # takes the only token, the same valid request again is refused.
    table = [
        ("/api/mv/lipsync", {"video_job_id": made["clip"]}, "audio_id",
         {"video_job_id": made["clip"], "audio_id": made["audio_id"]}, one_job),
        ("/api/mv/assemble", {"clips": []}, "clips", {"clips": [{"job_id": made["clip"]}]}, one_job),
        (f"{PROJECTS}/{pid}/scenes/{made['scene']}/clips", {"seed": "x"}, "seed", {"generate_audio": False}, one_job),
        (f"{PROJECTS}/{pid}/scenes/{made['scene']}/lipsync", {"sync_mode": 3}, "sync_mode", {}, one_job),
        (f"{PROJECTS}/{pid}/assemble", {"transition": "x"}, "transition", {}, one_job),
        (f"{PROJECTS}/{pid}/write_scenes", {"number_of_scenes": "x"}, "number_of_scenes", {}, one_call),
        (f"{PROJECTS}/{pid}/character", {"bogus": 1}, "bogus", {}, one_call),
    ]
    keys_file = tmp_path / "keys.yaml"
    keys = [create_key(keys_file, f"route{i}", limits)[1] for i, (*_, limits) in enumerate(table)]
    _, small = create_key(keys_file, "small", one_job)
    _, two = create_key(keys_file, "two", KeyLimits(jobs_per_minute=SLOW, jobs_burst=2, max_running_jobs=None))
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    for (url, malformed, field, valid, _), key in zip(table, keys):
        for _ in range(2):
            refused = await client.post(url, json=malformed, headers=bearer(key))
            assert refused.status == 400, (url, await refused.text())
            assert (await refused.json())["error"]["field"] == field
        assert (await client.post(url, json=valid, headers=bearer(key))).status in (200, 202), url
        limited = await client.post(url, json=valid, headers=bearer(key))
        assert limited.status == 429, (url, await limited.text())
        assert (await limited.json())["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 60, url  # half a token a minute

    # A project's "all clips" takes a token per job, all or none.
    url = f"{PROJECTS}/{fresh}/clips"
    refused = await client.post(url, json={}, headers=bearer(small))
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    error = (await refused.json())["error"]
    assert error["code"] == "quota_exceeded" and "2 jobs" in error["message"] and "jobs_burst 1" in error["message"]
    started = await ok(await client.post(url, json={}, headers=bearer(two)), 202)
    assert len(started["jobs"]) == 2
    limited = await client.post(f"{PROJECTS}/{fresh}/scenes/{made['fresh_scene']}/clips", json={},
                                headers=bearer(two))
    assert limited.status == 429 and (await limited.json())["error"]["code"] == "rate_limited"
    # The one token of `small` was not spent by the refusal above.
    assert (await client.post("/api/mv/assemble", json={"clips": [{"job_id": made["clip"]}]},
                              headers=bearer(small))).status == 202


async def test_the_running_jobs_cap_counts_lipsync_clip_and_assembly_jobs(make_client: AppClient, sim: Simulator,
                                                                           tmp_path: Path) -> None:
    made = await keyless_setup(make_client, sim)
    sim.video_latency = 60.0
    keys_file = tmp_path / "keys.yaml"
    record, key = create_key(keys_file, "capped", KeyLimits(jobs_per_minute=600, jobs_burst=50, max_running_jobs=2))
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    auth = bearer(key)
    lipsync = await ok(await client.post("/api/mv/lipsync", json={"video_job_id": made["clip"],
                                                                  "audio_id": made["audio_id"]}, headers=auth), 202)
    clip = await ok(await client.post(f"{PROJECTS}/{made['pid']}/scenes/{made['scene']}/clips", json={},
                                      headers=auth), 202)
    refusals = [("/api/mv/assemble", {"clips": [{"job_id": made["clip"]}]}),
                (f"{PROJECTS}/{made['pid']}/assemble", {}),
                (f"{PROJECTS}/{made['fresh']}/clips", {}),
                (f"{PROJECTS}/{made['pid']}/scenes/{made['scene']}/lipsync", {}),
                ("/api/mv/lipsync", {"video_job_id": made["clip"], "audio_id": made["audio_id"]})]
    for url, body in refusals:
        refused = await client.post(url, json=body, headers=auth)
        assert refused.status == 429, (url, await refused.text())
        error = (await refused.json())["error"]
        assert error["code"] == "quota_exceeded" and "limit 2" in error["message"], error
        assert int(refused.headers["Retry-After"]) >= 1
    # The jobs are the key's: a finished one frees its place.
    assert (await client.get(f"/api/mv/jobs/{clip['job']['job_id']}", headers=auth)).status == 200
    await client.post(f"/api/mv/jobs/{lipsync['job_id']}/cancel", headers=auth)
    async with asyncio.timeout(30):
        while (await (await client.get(f"/api/mv/jobs/{lipsync['job_id']}", headers=auth)).json())["status"] \
                not in FINAL:
            await asyncio.sleep(0.05)
    await ok(await client.post("/api/mv/assemble", json={"clips": [{"job_id": made["clip"]}]}, headers=auth), 202)
    await client.post(f"/api/mv/jobs/{clip['job']['job_id']}/cancel", headers=auth)
