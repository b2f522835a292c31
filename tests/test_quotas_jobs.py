"""Quotas on every job-creating POST (lip sync, project clips, assembly) and the blocking project actions: a token
per job (at most the burst), nothing for a malformed request, 429 + Retry-After, and the running-jobs cap queueing
every kind of job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import SINGER_PROMPT, AppClient, make_song, read_sse, wait_for

from mvserver.appkeys import JOBS
from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import KeyLimits, create_key

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
    patch = {"scenes": [{"id": s["id"], "prompt": SINGER_PROMPT, "duration": 4} for s in project["scenes"]]}
    return await ok(
        await client.patch(f"{PROJECTS}/{project['project_id']}", json=patch, headers={"If-Match": project["etag"]}),
        200,
    )


async def keyless_setup(make_client: AppClient, sim: Simulator) -> dict[str, Any]:
    """Made with keys off (so every key may use them): a song, a project whose two scenes have finished chosen clips,
    and a project with two prompted scenes and no clips yet."""
    client = await make_client()
    sim.video_latency = 0.2
    audio_id = await make_song(client, 10.0, "mp3")
    done = await project_with_prompts(client, 2, audio_id)
    pid = done["project_id"]
    started = await ok(await client.post(f"{PROJECTS}/{pid}/clips", json={"generate_audio": False}), 202)
    clips = [job["job_id"] for job in started["jobs"]]
    for job_id in clips:
        assert (await wait_for(client, job_id, lambda s: s["status"] in FINAL, 60))["status"] == "succeeded"
    fresh = await project_with_prompts(client, 2)
    await client.close()  # the keyed app below takes over the same outputs (and Redis prefix)
    return {
        "audio_id": audio_id,
        "clip": clips[0],
        "pid": pid,
        "scene": done["scenes"][0]["id"],
        "fresh": fresh["project_id"],
        "fresh_scene": fresh["scenes"][0]["id"],
    }


async def test_every_job_creating_post_is_charged_after_validation(
    make_client: AppClient, sim: Simulator, tmp_path: Path
) -> None:
    made = await keyless_setup(make_client, sim)
    sim.video_latency = 60.0  # jobs started below stay running
    pid, fresh = made["pid"], made["fresh"]
    one_job = KeyLimits(jobs_per_minute=SLOW, jobs_burst=1, max_running_jobs=None)
    one_call = KeyLimits(blocking_per_minute=SLOW, blocking_burst=1)
    # (route, malformed body and its field, valid body, limits): the malformed request costs nothing, the valid one
    # takes the only token, the same valid request again is refused.
    table = [
        (
            "/api/mv/lipsync",
            {"video_job_id": made["clip"]},
            "audio_id",
            {"video_job_id": made["clip"], "audio_id": made["audio_id"]},
            one_job,
        ),
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
    for (url, malformed, field, valid, _), key in zip(table, keys, strict=False):
        for _ in range(2):
            refused = await client.post(url, json=malformed, headers=bearer(key))
            assert refused.status == 400, (url, await refused.text())
            assert (await refused.json())["error"]["field"] == field
        assert (await client.post(url, json=valid, headers=bearer(key))).status in (200, 202), url
        limited = await client.post(url, json=valid, headers=bearer(key))
        assert limited.status == 429, (url, await limited.text())
        assert (await limited.json())["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 60, url  # half a token a minute

    # A project's "all clips" takes a token per job, at most the burst: the one token of `small` pays for both jobs.
    url = f"{PROJECTS}/{fresh}/clips"
    started = await ok(await client.post(url, json={}, headers=bearer(small)), 202)
    assert len(started["jobs"]) == 2
    limited = await client.post(
        f"{PROJECTS}/{fresh}/scenes/{made['fresh_scene']}/clips", json={}, headers=bearer(small)
    )
    assert limited.status == 429 and (await limited.json())["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 60  # waiting helps: the next token comes then
    # A refusal takes nothing: `two` still has both tokens for the two jobs of a request after one it could not pay.
    assert (await client.post(url, json={"seed": -1}, headers=bearer(two))).status == 400
    me = await ok(await client.get("/api/mv/me", headers=bearer(two)), 200)
    assert me["tokens"]["jobs"] == 2


async def test_the_running_jobs_cap_queues_lipsync_clip_and_assembly_jobs(
    make_client: AppClient, sim: Simulator, tmp_path: Path
) -> None:
    made = await keyless_setup(make_client, sim)
    sim.video_latency = 60.0
    keys_file = tmp_path / "keys.yaml"
    record, key = create_key(keys_file, "capped", KeyLimits(jobs_per_minute=600, jobs_burst=50, max_running_jobs=2))
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    engine = client.app[JOBS]
    auth = bearer(key)
    lipsync = await ok(
        await client.post(
            "/api/mv/lipsync", json={"video_job_id": made["clip"], "audio_id": made["audio_id"]}, headers=auth
        ),
        202,
    )
    clip = await ok(
        await client.post(f"{PROJECTS}/{made['pid']}/scenes/{made['scene']}/clips", json={}, headers=auth), 202
    )
    beyond = [
        ("/api/mv/assemble", {"clips": [{"job_id": made["clip"]}]}),
        (f"{PROJECTS}/{made['pid']}/assemble", {}),
        (f"{PROJECTS}/{made['fresh']}/clips", {}),
        ("/api/mv/lipsync", {"video_job_id": made["clip"], "audio_id": made["audio_id"]}),
    ]
    waiting = []
    for url, body in beyond:  # accepted, and queued behind the key's two running jobs
        answer = await ok(await client.post(url, json=body, headers=auth), 202)
        waiting += [job["job_id"] for job in answer.get("jobs", [answer])]
    assert len(waiting) == 5 and await engine.places(record.id) == (2, 5)
    for job_id in waiting:
        job = await engine.get(job_id)
        assert job is not None and job.status == "queued" and job.last_event_id == 1
    # The jobs are the key's: a finished one lets the next in, in order (the assembly, which runs at once).
    await client.post(f"/api/mv/jobs/{lipsync['job_id']}/cancel", headers=auth)
    async with client.get(f"/api/mv/jobs/{waiting[0]}/events", headers=auth) as stream:
        assert "succeeded" in [event["event"] async for event in read_sse(stream)]
    for job_id in [clip["job"]["job_id"], *waiting]:
        await client.post(f"/api/mv/jobs/{job_id}/cancel", headers=auth)
    assert await engine.places(record.id) == (0, 0)


async def test_the_clips_of_a_six_scene_project_generate_with_default_limits(
    make_client: AppClient, sim: Simulator, tmp_path: Path
) -> None:
    """jobs_burst 5 and 4 running: one request starts all six clips, four run at a time, two wait their turn."""
    keys_file = tmp_path / "keys.yaml"
    record, key = create_key(keys_file, "defaults")
    assert (record.limits.jobs_burst, record.limits.max_running_jobs) == (5, 4)
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    auth = bearer(key)
    project = await ok(
        await client.post(
            PROJECTS, headers=auth, json={"idea": "a song", "character_description": "a singer", "number_of_scenes": 6}
        ),
        201,
    )
    pid = project["project_id"]
    await ok(
        await client.patch(
            f"{PROJECTS}/{pid}",
            headers={**auth, "If-Match": project["etag"]},
            json={"scenes": [{"id": s["id"], "prompt": SINGER_PROMPT, "duration": 4} for s in project["scenes"]]},
        ),
        200,
    )
    sim.video_latency = 2.0
    started = await ok(await client.post(f"{PROJECTS}/{pid}/clips", headers=auth, json={"generate_audio": False}), 202)
    jobs = [job["job_id"] for job in started["jobs"]]
    assert len(jobs) == 6
    me = await ok(await client.get("/api/mv/me", headers=auth), 200)
    assert me["jobs"] == {"running": 4, "waiting": 2} and me["tokens"]["jobs"] < 1  # the burst, 5 tokens, taken
    link = await ok(await client.get(f"/api/mv/events/link?jobs={','.join(jobs)}", headers=auth), 200)
    ended = {}
    async with client.get(link["events_url"], timeout=120) as stream:
        async for event in read_sse(stream):
            if event["event"] in FINAL:
                ended[event["data"]["job_id"]] = event["event"]
    assert ended == {job_id: "succeeded" for job_id in jobs}
    records = [await client.app[JOBS].get(job_id) for job_id in jobs]
    edges = sorted([(job.started_at, 1) for job in records if job] + [(job.finished_at, -1) for job in records if job])
    at_once, most = 0, 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    assert most == 4  # never more than the key's four at once
    me = await ok(await client.get("/api/mv/me", headers=auth), 200)
    assert me["jobs"] == {"running": 0, "waiting": 0}
