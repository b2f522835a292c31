"""Every request that starts jobs answers 202 in one envelope: ``jobs`` (each with ``kind``), ``job`` and its fields
at the top level when one job started, ``project`` on a project's routes; absolute URLs with MV_PUBLIC_BASE_URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from helpers import SINGER_PROMPT, AppClient, free_port, make_song, wait_for

from mvserver.sandbox.app import Simulator

PROJECTS = "/api/mv/projects"
FINAL = ("succeeded", "failed", "canceled")
JOB_FIELDS = {"job_id", "kind", "status", "backend", "sandbox", "status_url", "events_url", "video_url"}


async def started(
    client: TestClient, path: str, body: dict[str, Any], *, many: bool = False, project: bool = False
) -> dict[str, Any]:
    """POST a job-starting route and check its envelope; returns the body."""
    response = await client.post(path, json=body)
    assert response.status == 202, await response.text()
    envelope = await response.json()
    assert isinstance(envelope["jobs"], list)
    for job in envelope["jobs"]:
        assert set(job) >= JOB_FIELDS, job
        assert job["status_url"] == f"/api/mv/jobs/{job['job_id']}"
        assert job["events_url"] == f"/api/mv/jobs/{job['job_id']}/events"
        assert job["video_url"] == f"/api/mv/get_video/{job['job_id']}"
    if many:
        assert "job" not in envelope and "job_id" not in envelope and "Location" not in response.headers
    else:
        (job,) = envelope["jobs"]
        assert envelope["job"] == job
        assert {name: envelope[name] for name in job} == job  # the same fields at the top level, as before
        assert response.headers["Location"] == job["status_url"]
    if project:
        assert response.headers["ETag"] == envelope["project"]["etag"]
        assert all(job["project_id"] == envelope["project"]["project_id"] for job in envelope["jobs"])
    else:
        assert "project" not in envelope
    return envelope


async def finished(client: TestClient, job_id: str) -> dict[str, Any]:
    state = await wait_for(client, job_id, lambda s: s["status"] in FINAL, 60)
    assert state["status"] == "succeeded", state
    return state


async def test_every_job_starting_route_answers_the_same_envelope(client: TestClient, sim: Simulator) -> None:
    video = await started(
        client, "/api/mv/generate_video", {"prompt": SINGER_PROMPT, "duration": 4, "generate_audio": False}
    )
    assert video["kind"] == "video"
    await finished(client, video["job_id"])
    audio_id = await make_song(client, 12.0, "mp3")
    lipsync = await started(client, "/api/mv/lipsync", {"video_job_id": video["job_id"], "audio_id": audio_id})
    assert lipsync["job"]["kind"] == "lipsync"
    assembly = await started(client, "/api/mv/assemble", {"clips": [{"job_id": video["job_id"]}]})
    assert assembly["jobs"][0]["kind"] == "assembly"

    response = await client.post(
        PROJECTS,
        json={"idea": "a song", "character_description": "a singer", "audio_id": audio_id, "number_of_scenes": 2},
    )
    project = await response.json()
    pid, scenes = project["project_id"], [s["id"] for s in project["scenes"]]
    patch = {"scenes": [{"id": s, "prompt": SINGER_PROMPT, "duration": 4} for s in scenes]}
    response = await client.patch(f"{PROJECTS}/{pid}", json=patch, headers={"If-Match": project["etag"]})
    assert response.status == 200, await response.text()

    clips = await started(client, f"{PROJECTS}/{pid}/clips", {"generate_audio": False}, many=True, project=True)
    assert [(j["kind"], j["scene_id"]) for j in clips["jobs"]] == [("video", s) for s in scenes]
    for job in clips["jobs"]:
        await finished(client, job["job_id"])
    again = await started(client, f"{PROJECTS}/{pid}/clips", {}, many=True, project=True)
    assert again["jobs"] == []  # nothing missing: the same envelope, with no job

    one = await started(client, f"{PROJECTS}/{pid}/scenes/{scenes[0]}/clips", {}, project=True)
    assert (one["kind"], one["scene_id"]) == ("video", scenes[0])
    synced = await started(client, f"{PROJECTS}/{pid}/scenes/{scenes[1]}/lipsync", {}, project=True)
    assert (synced["job"]["kind"], synced["job"]["scene_id"]) == ("lipsync", scenes[1])
    assembled = await started(client, f"{PROJECTS}/{pid}/assemble", {}, project=True)
    assert assembled["kind"] == "assembly" and "scene_id" not in assembled
    assert assembled["project"]["assembly_job_id"] == assembled["job_id"]


async def test_urls_are_absolute_on_the_public_base_url_signed_ones_too(make_client: AppClient, tmp_path: Path) -> None:
    from mvserver.web.access.auth import KeyLimits, create_key

    _, key = create_key(tmp_path / "keys.yaml", "frontend", KeyLimits(jobs_per_minute=600, jobs_burst=50))
    base = f"http://127.0.0.1:{free_port()}/mv"  # nothing listens there: only the URLs are looked at
    client = await make_client(
        MV_PUBLIC_BASE_URL=base,
        MV_API_KEYS_FILE=tmp_path / "keys.yaml",
        MV_URL_SIGNING_SECRET="test-signing-secret-0123456789abcdefghij",
    )
    headers = {"Authorization": f"Bearer {key}"}
    response = await client.post(
        "/api/mv/generate_video", json={"prompt": SINGER_PROMPT, "duration": 4}, headers=headers
    )
    assert response.status == 202, await response.text()
    body = await response.json()
    job_id = body["job_id"]
    assert response.headers["Location"] == body["status_url"] == f"{base}/api/mv/jobs/{job_id}"
    assert body["job"]["events_url"] == f"{base}/api/mv/jobs/{job_id}/events"
    signed = body["job"]["signed_urls"]
    assert signed["video_url"].startswith(f"{base}/api/mv/get_video/{job_id}?")
    # the signed link works as it is once the base is taken off (this test's server is not at the public address)
    status = await client.get(signed["status_url"].removeprefix(base))
    assert status.status == 200 and (await status.json())["job_id"] == job_id
    await client.delete(f"/api/mv/jobs/{job_id}", headers=headers)


async def test_the_openapi_document_shares_one_envelope_schema(client: TestClient) -> None:
    from mvserver.openapi.schemas import JOB_CREATING_PATHS

    document = await (await client.get("/api/mv/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert set(schemas["AcceptedJob"]["required"]) == JOB_FIELDS
    assert schemas["JobsAccepted"]["properties"]["job"] == {"$ref": "#/components/schemas/AcceptedJob"}
    for path in JOB_CREATING_PATHS:
        answer = document["paths"][path]["post"]["responses"]["202"]
        assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobsAccepted"}, path
