"""Retention with a tiny TTL, on both job stores: finished jobs, their files and old images and scenes go; running
jobs stay; an expired id answers 410 ``expired`` while its tombstone lasts, then 404."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import AppClient, artefact_keys, events_of, has_artefact, png_base64, submit, wait_for

from mvserver.appkeys import JOBS
from mvserver.jobs.retention import sweep_interval
from mvserver.sandbox.app import Simulator

pytestmark = [pytest.mark.both_stores, pytest.mark.both_backends]

RETENTION_HOURS = 0.0006  # 2.16 s


@pytest.fixture
def short_retention(settings_dir: Path) -> None:
    path = settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["jobs"]["retention_hours"] = RETENTION_HOURS
    path.write_text(yaml.safe_dump(videos, sort_keys=False))


async def status_of(client: TestClient, url: str) -> tuple[int, dict[str, Any]]:
    async with client.get(url) as response:
        return response.status, await response.json()


async def stored(client: TestClient, job_id: str) -> bool:
    """Whether the job store still holds anything of the job (record or event log)."""
    store = client.app[JOBS].store
    if hasattr(store, "r"):
        return bool(await store.r.exists(store.k("job", job_id), store.k("ev", job_id)))
    return any(store.outputs.path("jobs", job_id, suffix).exists() for suffix in (".json", ".events.jsonl"))


async def test_finished_jobs_and_old_files_expire_running_jobs_stay(
    make_client: AppClient, sim: Simulator, short_retention: None, live_env: dict[str, str]
) -> None:
    outputs = Path(live_env["MV_OUTPUT_DIR"])
    client = await make_client()
    sim.video_latency = 0.2
    done = await submit(client, reference_image_base64=png_base64(), duration=8)
    events = await events_of(client, done["job_id"])
    assert events[-1]["event"] == "succeeded"
    job_id = done["job_id"]
    keys = [f"videos/{job_id}.mp4", f"videos/{job_id}.jpg", f"jobs/{job_id}.ref"]  # the video, poster, reference
    lock = outputs / "jobs" / f"{job_id}.ffmpeg.lock"  # the run lock an assembly job leaves on its node's disk
    lock.touch()
    assert all([await has_artefact(client, key) for key in keys])
    image = await client.post("/api/mv/generate_character_reference", json={"character_description": "a heron"})
    assert image.status == 200
    scenes = await client.post(
        "/api/mv/create_scenes", json={"idea": "a heron learns jazz", "character_description": "a grey heron"}
    )
    assert scenes.status == 200
    assert await artefact_keys(client, "images") and await artefact_keys(client, "scenes")

    sim.video_latency = 60
    running = await submit(client)
    await wait_for(client, running["job_id"], lambda s: s["stage"] == "generating")

    async with asyncio.timeout(RETENTION_HOURS * 3600 + 10 * sweep_interval(RETENTION_HOURS * 3600) + 5):
        while (await status_of(client, done["status_url"]))[0] != 410:
            await asyncio.sleep(0.1)
    status, body = await status_of(client, done["status_url"])
    assert status == 410 and body["error"]["code"] == "expired"
    for url in (done["events_url"], done["video_url"]):
        status, body = await status_of(client, url)
        assert status == 410 and body["error"]["code"] == "expired"
    assert not await stored(client, job_id)
    async with asyncio.timeout(5):  # the job's files go right after its record, in the same sweep
        while any([await has_artefact(client, key) for key in keys]) or lock.exists():
            await asyncio.sleep(0.05)
    async with asyncio.timeout(5):  # written a moment after the job finished, they go a moment later
        while await artefact_keys(client, "images") or await artefact_keys(client, "scenes"):
            await asyncio.sleep(0.1)

    status, body = await status_of(client, running["status_url"])
    assert status == 200 and body["status"] == "running"
    assert await stored(client, running["job_id"])

    async with asyncio.timeout(RETENTION_HOURS * 3600 + 10 * sweep_interval(RETENTION_HOURS * 3600) + 5):
        while (await status_of(client, done["status_url"]))[0] != 404:  # the tombstone ran out
            await asyncio.sleep(0.1)
    await client.delete(running["status_url"])


@pytest.mark.store_independent
async def test_retention_zero_runs_no_sweeper(make_client: AppClient, settings_dir: Path) -> None:
    path = settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["jobs"]["retention_hours"] = 0
    path.write_text(yaml.safe_dump(videos, sort_keys=False))
    await make_client()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "retention-sweeper"]
