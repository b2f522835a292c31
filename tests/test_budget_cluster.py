"""A key's monthly budget raced by 30 parallel requests on 2 real nodes on one Redis never goes over: the hold is
one Lua script (``usage_store.HOLD``), so nodes cannot interleave a check and an add."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import CLUSTER_PROMPT, Cluster, nodes_up, sim_up

from mvserver.web.access.auth import KeyLimits, create_key

pytestmark = pytest.mark.cluster


@pytest.mark.video_seconds(120)  # the admitted jobs stay running: their holds stay estimates through the burst
async def test_a_budget_raced_on_two_nodes_never_goes_over(
    cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    limits = KeyLimits(jobs_per_minute=6000, jobs_burst=100, max_running_jobs=100, monthly_budget=10.0)
    _, key = create_key(keys_file, "racer", limits)  # room for 6 clips of 4 s at 0.40/s
    cluster.extra_env = {
        "MV_API_KEYS_FILE": str(keys_file),
        "MV_URL_SIGNING_SECRET": "cluster-signing-secret-0123456789abcdef",
    }
    await sim_up(http, cluster)
    a, b = await nodes_up(http, cluster, 2)
    auth = {"Authorization": f"Bearer {key}"}

    async def post(base: str) -> tuple[int, dict[str, Any]]:
        async with http.post(
            f"{base}/api/mv/generate_video", json={"prompt": CLUSTER_PROMPT, "duration": 4}, headers=auth
        ) as response:
            return response.status, await response.json()

    answers = await asyncio.gather(*(post((a, b)[n % 2]) for n in range(30)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] * 6 + [402] * 24, statuses
    assert {body["error"]["code"] for status, body in answers if status == 402} == {"budget_exceeded"}
    assert {body["error"]["budget"]["remaining"] for status, body in answers if status == 402} == {0.4}
    for base in (a, b):
        async with http.get(f"{base}/api/mv/usage", headers=auth) as response:
            assert (await response.json())["budget"]["spent"] == 9.6
        async with http.get(f"{base}/api/mv/jobs", headers=auth) as response:
            assert len((await response.json())["jobs"]) == 6
    assert len(cluster.predictions()) <= 6  # refused jobs never reached the provider
