"""The project event stream, ``GET /api/mv/projects/{id}/events``: project writes (from any tab or node), versions
added and chosen, and the project's jobs' events on one SSE connection, with Last-Event-ID resume; on both stores,
and across two nodes on one Redis."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import (
    AppClient,
    finished,
    job_events,
    named,
    new_project,
    provider_env,
    read_sse,
    read_until,
    two_key_client,
    wait_for,
)

from mvserver.app import create_app
from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores
BASE = "/api/mv/projects"
FINAL = ("succeeded", "failed", "canceled")
JOB_EVENTS = ("queued", "running", "progress", *FINAL)


async def test_one_stream_follows_edits_versions_and_clip_jobs(client: TestClient, sim: Simulator) -> None:
    project = await new_project(client)
    pid, scene_ids = project["project_id"], [s["id"] for s in project["scenes"]]
    assert project["events_url"] == f"{BASE}/{pid}/events"
    async with client.get(project["events_url"]) as stream:
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        events = await read_until(stream, [], lambda e: len(e) == 1)
        first = events[0]
        assert first["event"] == "project" and first["retry"] == "3000"
        assert first["data"] == await (await client.get(f"{BASE}/{pid}")).json()  # what GET shows
        assert first["id"] == "2"  # the project's version, no job followed yet

        # another tab edits: the new record arrives, with its ETag
        response = await client.patch(
            f"{BASE}/{pid}", json={"idea": "a rooftop party at dawn"}, headers={"If-Match": project["etag"]}
        )
        await read_until(stream, events, lambda e: len(named(e, "project")) == 2)
        edited = named(events, "project")[-1]["data"]
        assert edited["idea"] == "a rooftop party at dawn" and edited["etag"] == response.headers["ETag"] == '"3"'

        # clips: the record with its new versions, each version, then every job's events to the end
        sim.video_latency = 0.5
        response = await client.post(f"{BASE}/{pid}/clips")
        job_ids = [j["job_id"] for j in (await response.json())["jobs"]]
        await read_until(stream, events, lambda e: finished(job_ids)(e) and len(named(e, "version_chosen")) == 2)
    added = named(events, "version_added")
    assert [(e["data"]["scene_id"], e["data"]["job_id"], e["data"]["kind"]) for e in added] == [
        (s, j, "video") for s, j in zip(scene_ids, job_ids, strict=False)
    ]
    assert all(e["data"]["etag"] == '"5"' for e in added)  # the clips' claim (4), then their versions (5)
    after_clips = named(events, "project")[-1]
    assert events.index(after_clips) < events.index(added[0])
    for job_id in job_ids:
        assert job_events(events)[job_id][-1] == "succeeded"
        own = [e["event"] async for e in _job_stream(client, job_id)]
        assert job_events(events)[job_id] == own[-len(job_events(events)[job_id]) :]  # in order, none twice
    chosen = named(events, "version_chosen")
    assert {(e["data"]["scene_id"], e["data"]["job_id"], e["data"]["previous_job_id"]) for e in chosen} == {
        (s, j, None) for s, j in zip(scene_ids, job_ids, strict=False)
    }
    for event in chosen:  # each comes right after its clip's succeeded event
        before = events[events.index(event) - 1]
        assert (before["event"], before["data"]["job_id"]) == ("succeeded", event["data"]["job_id"])
    # what the stream told equals what GET says
    record = await (await client.get(f"{BASE}/{pid}")).json()
    assert [s["chosen_job_id"] for s in record["scenes"]] == job_ids
    assert record["etag"] == after_clips["data"]["etag"]  # a job ending moves no ETag
    # ids: the version, then each job still followed
    assert events[-1]["id"] == "5"
    assert sorted(part.split("-")[0] for part in after_clips["id"].split(".")[1:]) == sorted(j[:8] for j in job_ids)


async def _job_stream(client: TestClient, job_id: str):  # type: ignore[no-untyped-def]
    async with client.get(f"/api/mv/jobs/{job_id}/events") as response:
        async for event in read_sse(response):
            yield event


async def test_last_event_id_resumes_the_jobs_or_starts_over_after_a_write(client: TestClient, sim: Simulator) -> None:
    project = await new_project(client)
    pid = project["project_id"]
    sim.video_latency = 1.5
    response = await client.post(f"{BASE}/{pid}/clips")
    job_ids = [j["job_id"] for j in (await response.json())["jobs"]]
    async with client.get(f"{BASE}/{pid}/events") as stream:
        first = await read_until(stream, [], lambda e: len(named(e, "progress")) >= 2)
    assert first[0]["event"] == "project"
    cut = first[-1]["id"]
    async with client.get(f"{BASE}/{pid}/events", headers={"Last-Event-ID": cut}) as stream:
        rest = await read_until(stream, [], lambda e: finished(job_ids)(e) and len(named(e, "version_chosen")) == 2)
    assert not named(rest, "project")  # the project did not move: nothing is sent again
    state_shown = {v["job_id"]: v["status"] for s in first[0]["data"]["scenes"] for v in s["versions"]}
    for job_id in job_ids:
        own = [e["event"] async for e in _job_stream(client, job_id)]
        combined = job_events(first + rest)[job_id]
        assert combined == own[len(own) - len(combined) :] and combined[-1] == "succeeded"  # nothing twice or lost
        assert state_shown[job_id] in ("queued", "running")
    assert len(named(rest, "version_chosen")) == 2  # told once the clips succeeded

    # ?after= does the same for a new EventSource; an id of an older version starts with the project again
    async with client.get(f"{BASE}/{pid}/events", params={"after": rest[-1]["id"]}) as stream:
        response = await client.patch(
            f"{BASE}/{pid}", json={"style": "neon"}, headers={"If-Match": first[0]["data"]["etag"]}
        )
        assert response.status == 200, await response.text()
        again = await read_until(stream, [], lambda e: len(e) >= 1)
    assert again[0]["event"] == "project" and again[0]["data"]["style"] == "neon"
    async with client.get(f"{BASE}/{pid}/events", headers={"Last-Event-ID": rest[-1]["id"]}) as stream:
        moved = await read_until(stream, [], lambda e: len(e) >= 1)
    assert moved[0]["event"] == "project" and moved[0]["data"]["etag"] == response.headers["ETag"]
    async with client.get(f"{BASE}/{pid}/events", headers={"Last-Event-ID": "not an id"}) as stream:
        assert (await read_until(stream, [], lambda e: len(e) >= 1))[0]["event"] == "project"


async def test_the_stream_pings_and_reports_bad_input(client: TestClient) -> None:
    project = await new_project(client, scenes=1)
    pid = project["project_id"]
    async with client.get(f"{BASE}/{pid}/events") as stream:
        events = await read_until(stream, [], lambda e: len([x for x in e if "comment" in x]) >= 2, comments=True)
    assert events[0]["event"] == "project" and {"comment": "ping"} in events
    for params, field in (({"after": "1.zz"}, "after"), ({}, None)):
        url = f"{BASE}/{uuid.uuid4()}/events"
        response = await client.get(f"{BASE}/{pid}/events" if field else url, params=params)
        body = await response.json()
        if field:
            assert response.status == 400 and body["error"]["field"] == "after"
        else:
            assert response.status == 404 and body["error"]["code"] == "not_found"
    response = await client.get(f"{BASE}/{pid}/events/link")
    assert await response.json() == {"events_url": f"{BASE}/{pid}/events", "expires_at": None}


async def test_keys_another_keys_project_is_unknown_and_a_signed_link_opens_it(
    make_client: AppClient, tmp_path: Path
) -> None:
    client, alice, bob = await two_key_client(make_client, tmp_path)
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    pid = (await new_project(client, scenes=1, **as_alice))["project_id"]
    assert (await client.get(f"{BASE}/{pid}/events")).status == 401
    for path in (f"{BASE}/{pid}/events", f"{BASE}/{pid}/events/link"):
        response = await client.get(path, headers=as_bob)
        assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    link = await (await client.get(f"{BASE}/{pid}/events/link", params={"after": "2"}, headers=as_alice)).json()
    assert link["events_url"].startswith(f"{BASE}/{pid}/events?after=2&kid=") and link["expires_at"]
    async with client.get(link["events_url"]) as stream:  # an EventSource sends no header
        assert stream.status == 200
        response = await client.post(f"{BASE}/{pid}/clips", headers=as_alice)
        job_id = (await response.json())["jobs"][0]["job_id"]
        events = await read_until(stream, [], finished([job_id]))
    assert events[0]["event"] == "project"  # resumed at version 2; the clips moved it to 3
    tampered = link["events_url"].replace("after=2", "after=1")
    assert (await client.get(tampered)).status == 403


async def test_two_nodes_on_one_redis_see_each_others_writes_and_jobs(
    redis_url: str, sim_server: TestServer, tmp_path: Path, settings_dir: Path, aiohttp_client: Any
) -> None:
    """Node A streams what node B writes and runs (in one test process: two apps, one Redis, one output dir)."""
    store = {"MV_REDIS_URL": redis_url, "MV_REDIS_PREFIX": f"mvtest:{uuid.uuid4().hex[:10]}:"}
    env = provider_env(sim_server, tmp_path / "outputs", settings_dir, store)
    a = await aiohttp_client(create_app(env))
    b = await aiohttp_client(create_app(env))
    project = await new_project(b)
    pid = project["project_id"]
    async with a.get(f"{BASE}/{pid}/events") as stream:
        events = await read_until(stream, [], lambda e: len(e) == 1)
        response = await b.patch(f"{BASE}/{pid}", json={"style": "noir"}, headers={"If-Match": project["etag"]})
        assert response.status == 200
        await read_until(stream, events, lambda e: len(named(e, "project")) == 2)
        assert named(events, "project")[-1]["data"]["style"] == "noir"
        response = await b.post(f"{BASE}/{pid}/clips")
        job_ids = [j["job_id"] for j in (await response.json())["jobs"]]
        await read_until(stream, events, lambda e: finished(job_ids)(e) and len(named(e, "version_chosen")) == 2)
    assert [e["data"]["job_id"] for e in named(events, "version_added")] == job_ids
    for job_id in job_ids:
        await wait_for(b, job_id, lambda s: s["status"] in FINAL)
        assert job_events(events)[job_id][-1] == "succeeded"
