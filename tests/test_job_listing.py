"""``GET /api/mv/jobs`` on both job stores: the caller's jobs newest first, filters, cursor pages, ownership, bad
parameters, the scan budget, and retention dropping index entries."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, LiveApp, module_loop, submit, two_key_client, wait_for

from mvserver.appkeys import JOBS
from mvserver.core.artefacts import new_id
from mvserver.jobs import Job
from mvserver.jobs.file_store import _lines_before
from mvserver.jobs.listing import JobQuery, list_jobs
from mvserver.jobs.store import index_entry
from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores


async def listed(client: TestClient, query: str = "", headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.get(f"/api/mv/jobs{query}", headers=headers)
    assert response.status == 200, await response.text()
    return await response.json()


async def all_pages(client: TestClient, query: str, headers: dict[str, str] | None = None) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = await listed(client, query + (f"&cursor={cursor}" if cursor else ""), headers)
        pages.append([job["job_id"] for job in page["jobs"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


async def test_jobs_are_listed_newest_first_in_cursor_pages(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30  # they stay running
    created = [(await submit(client))["job_id"] for _ in range(5)]
    pages = await all_pages(client, "?limit=2")
    assert [len(page) for page in pages][:3] == [2, 2, 1]
    assert [job_id for page in pages for job_id in page] == created[::-1]
    first = (await listed(client, "?limit=1"))["jobs"][0]
    assert first["job_id"] == created[-1] and first["kind"] == "video" and first["status"] in ("queued", "running")
    assert first["status_url"] == f"/api/mv/jobs/{created[-1]}" and "request" not in first
    assert (await listed(client))["next_cursor"] is None  # all 5 fit in the default page of 20


async def test_filters_by_status_kind_and_project(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.1
    done = (await submit(client))["job_id"]
    await wait_for(client, done, lambda state: state["status"] == "succeeded")
    sim.video_latency = 30
    running = (await submit(client))["job_id"]
    project_id = new_id()
    linked = (
        await client.app[JOBS].submit(
            Job(
                id=new_id(),
                backend="replicate",
                model="google/veo-3.1",
                sandbox=False,
                request={"prompt": "p", "duration": 4, "project_id": project_id},
                owner=None,
            )
        )
    ).id
    assert [j["job_id"] for j in (await listed(client, "?status=succeeded"))["jobs"]] == [done]
    assert {j["job_id"] for j in (await listed(client, "?kind=video"))["jobs"]} == {done, running, linked}
    assert (await listed(client, "?kind=assembly"))["jobs"] == []
    by_project = (await listed(client, f"?project_id={project_id}"))["jobs"]
    assert [j["job_id"] for j in by_project] == [linked] and by_project[0]["project_id"] == project_id
    assert (await listed(client, f"?project_id={new_id()}"))["jobs"] == []


@pytest.mark.store_independent
@pytest.mark.parametrize(
    "query, field",
    [
        ("?status=done", "status"),
        ("?kind=movie", "kind"),
        ("?limit=0", "limit"),
        ("?limit=101", "limit"),
        ("?limit=ten", "limit"),
        ("?limit=%C2%B2", "limit"),
        ("?limit=-1", "limit"),
        ("?cursor=abc", "cursor"),
        ("?cursor=" + "9" * 16 + "-x", "cursor"),
        ("?project_id=../etc", "project_id"),
    ],
)
@module_loop
async def test_bad_parameters_are_400_naming_the_field(module_live: LiveApp, query: str, field: str) -> None:
    client = module_live[0]
    response = await client.get(f"/api/mv/jobs{query}")
    assert response.status == 400
    assert (await response.json())["error"]["field"] == field


async def test_each_key_lists_only_its_own_jobs(make_client: AppClient, tmp_path: Path, sim: Simulator) -> None:
    sim.video_latency = 30
    client, alice, bob = await two_key_client(make_client, tmp_path)
    mine = {}
    for name, key in (("alice", alice), ("bob", bob), ("alice", alice)):
        response = await client.post(
            "/api/mv/generate_video",
            json={"prompt": "a heron", "duration": 4},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status == 202
        mine.setdefault(name, []).append((await response.json())["job_id"])
    alice_jobs = (await listed(client, headers={"Authorization": f"Bearer {alice}"}))["jobs"]
    assert [job["job_id"] for job in alice_jobs] == mine["alice"][::-1]
    assert all("sig=" in job["signed_urls"]["events_url"] for job in alice_jobs)
    bob_jobs = (await listed(client, headers={"Authorization": f"Bearer {bob}"}))["jobs"]
    assert [job["job_id"] for job in bob_jobs] == mine["bob"]
    assert (await client.get("/api/mv/jobs")).status == 401


async def test_a_page_examines_a_bounded_number_of_entries(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    for _ in range(6):
        await submit(client)
    store = client.app[JOBS].store
    rare = JobQuery(owner=None, status="failed", limit=5)
    page = await list_jobs(store, rare, budget=4)
    assert page.jobs == [] and page.next_cursor is not None  # 4 looked at, none matched: continue from there
    rest = await list_jobs(store, JobQuery(owner=None, status="failed", limit=5, cursor=page.next_cursor), budget=4)
    assert rest.jobs == [] and rest.next_cursor is None  # the last 2 entries, then the end


async def test_retention_drops_the_index_entries_of_removed_jobs(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.1
    job_id = (await submit(client))["job_id"]
    await wait_for(client, job_id, lambda state: state["status"] == "succeeded")
    async with asyncio.timeout(5):  # the record is final a moment before the job's task lets go of it
        while job_id in client.app[JOBS].tasks:
            await asyncio.sleep(0.01)
    store = client.app[JOBS].store
    assert len(await store.index(None, None, 10)) == 1
    assert await store.expire(finished_before=10**10, tombstone_until=10**10) == [job_id]
    assert await store.index(None, None, 10) == []
    assert (await listed(client))["jobs"] == []


async def test_concurrent_creation_keeps_the_index_sorted(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    created = await asyncio.gather(*(submit(client) for _ in range(12)))
    entries = await client.app[JOBS].store.index(None, None, 100)
    assert entries == sorted(entries, reverse=True) and len(entries) == 12
    assert {entry[17:] for entry in entries} == {job["job_id"] for job in created}
    pages = await all_pages(client, "?limit=5")
    assert [job_id for page in pages for job_id in page] == [entry[17:] for entry in entries]


@pytest.mark.file_store_only
async def test_the_file_index_skips_torn_lines_and_finds_a_cursor_by_binary_search(
    tmp_path: Path, job_store_kind: str
) -> None:
    entries = [index_entry(1_000_000 + n, new_id()) for n in range(3000)]
    path = tmp_path / "owner.idx"
    path.write_bytes(("\n".join(entries) + "\n").encode() + b"0000000002000000-torn")
    assert _lines_before(path, None, 3) == entries[::-1][:3]
    assert _lines_before(path, entries[1500], 4) == entries[1496:1500][::-1]
    assert _lines_before(path, entries[0], 4) == []
    assert _lines_before(path, entries[2], 10) == entries[:2][::-1]
    assert _lines_before(tmp_path / "missing.idx", None, 3) == []
