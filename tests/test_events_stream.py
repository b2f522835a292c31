"""One SSE connection for many jobs: ``GET /api/mv/events?jobs=…``, with a resume id for every job's position."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import LiveApp, events_of, module_loop, read_sse, submit

from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores


def by_job(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for event in events:
        seen[event["data"]["job_id"]].append(event["event"])
    return seen


async def stream(
    client: TestClient, job_ids: list[str], last_event_id: str | None = None, stop_after: int | None = None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    received = []
    async with client.get("/api/mv/events", params={"jobs": ",".join(job_ids)}, headers=headers) as response:
        assert response.status == 200, await response.text()
        async for event in read_sse(response):
            received.append(event)
            if stop_after is not None and len(received) == stop_after:
                break
    return received


async def test_one_stream_carries_every_event_of_every_job_then_ends(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.5
    job_ids = [(await submit(client))["job_id"] for _ in range(8)]  # more than a browser's six connections
    events = await stream(client, job_ids)
    seen = by_job(events)
    assert set(seen) == set(job_ids)
    for job_id in job_ids:
        alone = [e["event"] for e in await events_of(client, job_id)]
        assert seen[job_id] == alone  # the same events, in the same order, each once
        assert alone[-1] == "succeeded"
    positions = [list(map(int, e["id"].split("."))) for e in events]
    assert all(len(p) == len(job_ids) for p in positions)
    assert positions[-1] == [len(by_job(events)[j]) for j in job_ids]  # the last id holds every job's last event
    assert events[0]["retry"] == "3000"


async def test_a_reconnect_with_the_last_id_resumes_every_job_where_it_stood(
    client: TestClient, sim: Simulator
) -> None:
    sim.video_latency = 1.0
    job_ids = [(await submit(client))["job_id"] for _ in range(3)]
    first = await stream(client, job_ids, stop_after=5)
    rest = await stream(client, job_ids, last_event_id=first[-1]["id"])
    combined = by_job(first + rest)
    for job_id in job_ids:
        alone = await events_of(client, job_id)
        assert combined[job_id] == [e["event"] for e in alone]  # nothing repeated, nothing missed


async def test_a_new_stream_with_after_resumes_each_job_including_a_new_one(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.3
    first_id = (await submit(client))["job_id"]
    first = await stream(client, [first_id])
    second_id = (await submit(client))["job_id"]
    async with client.get(
        "/api/mv/events", params={"jobs": f"{second_id},{first_id}", "after": f"0.{first[-1]['id']}"}
    ) as response:
        resumed = [event async for event in read_sse(response)]
    assert set(by_job(resumed)) == {second_id}  # the finished first job sends nothing again
    assert by_job(resumed)[second_id][-1] == "succeeded"


async def test_finished_jobs_replay_and_the_stream_closes(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.2
    job_id = (await submit(client))["job_id"]
    alone = await events_of(client, job_id)
    replay = await stream(client, [job_id])
    assert [e["event"] for e in replay] == [e["event"] for e in alone]
    assert await stream(client, [job_id], last_event_id=replay[-1]["id"]) == []


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "missing_field"),
        ("jobs=", 400, "missing_field"),
        ("jobs=not-a-uuid", 400, "invalid_id"),
        ("jobs=0b4e7c1e-3f5a-4c39-9d2a-5f0e7b8c9d10", 404, "not_found"),
        ("jobs=0b4e7c1e-3f5a-4c39-9d2a-5f0e7b8c9d10,0b4e7c1e-3f5a-4c39-9d2a-5f0e7b8c9d10", 400, "invalid_field"),
    ],
)
@module_loop
async def test_bad_job_lists_are_refused_naming_the_field(
    module_live: LiveApp, query: str, status: int, code: str
) -> None:
    client = module_live[0]
    response = await client.get(f"/api/mv/events?{query}")
    assert response.status == status
    error = (await response.json())["error"]
    assert error["code"] == code and error["field"] == "jobs"


async def test_the_number_of_jobs_per_stream_is_limited_by_settings(make_client: Any, settings_dir: Any) -> None:
    videos = yaml.safe_load((settings_dir / "videos.yaml").read_text())
    videos["jobs"]["sse_max_jobs_per_stream"] = 2
    (settings_dir / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
    client = await make_client()
    ids = ",".join(f"0b4e7c1e-3f5a-4c39-9d2a-5f0e7b8c9d1{i}" for i in range(3))
    response = await client.get(f"/api/mv/events?jobs={ids}")
    assert response.status == 400
    assert "at most 2" in (await response.json())["error"]["message"]
