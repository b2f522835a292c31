"""Access control of jobs on both job stores: the running-jobs quota of a key counted by the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mvserver.auth import KeyLimits, create_key
from mvserver.jobs import JOBS

from conftest import AppClient

pytestmark = pytest.mark.both_stores

SECRET = "test-signing-secret-0123456789abcdefghij"
VIDEO = {"prompt": "a drummer on a rooftop", "duration": 4, "generate_audio": False}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_running_jobs_cap_counts_the_keys_queued_and_running_jobs(make_client: AppClient, tmp_path: Path,
                                                                         sim: Any) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice_record, alice = create_key(keys_file, "alice", KeyLimits(jobs_per_minute=600, jobs_burst=50,
                                                                  max_running_jobs=2))
    _, bob = create_key(keys_file, "bob", KeyLimits(jobs_per_minute=600, jobs_burst=50, max_running_jobs=2))
    sim.video_latency = 60.0  # the jobs stay running for the whole test
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    started = []
    for _ in range(2):
        response = await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(alice))
        assert response.status == 202, await response.text()
        started.append((await response.json())["job_id"])
    assert await client.app[JOBS].running_jobs(alice_record.id) == 2
    over = await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(alice))
    assert over.status == 429, await over.text()
    error = (await over.json())["error"]
    assert error["code"] == "quota_exceeded" and "limit 2" in error["message"]
    assert int(over.headers["Retry-After"]) >= 1
    # Another key has its own count.
    assert (await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(bob))).status == 202
    # A finished (here canceled) job frees its place.
    canceled = await client.post(f"/api/mv/jobs/{started[0]}/cancel", headers=bearer(alice))
    assert canceled.status == 200
    async with asyncio.timeout(30):  # a running job's cancel may outlast the request on a loaded machine
        while (await (await client.get(f"/api/mv/jobs/{started[0]}", headers=bearer(alice))).json())["status"] \
                != "canceled":
            await asyncio.sleep(0.05)
    assert await client.app[JOBS].running_jobs(alice_record.id) == 1
    assert (await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(alice))).status == 202
    assert await client.app[JOBS].running_jobs(alice_record.id) == 2
