"""Webhooks out on real ``python -m mvserver`` processes sharing one Redis: the node retrying a delivery is killed
(kill -9) and the delivery still arrives, from the survivor, verified with the ``standardwebhooks`` library."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import CLUSTER_PROMPT, SECRET, Cluster, Receiver, final, nodes_up, sim_up, until, with_signal

pytestmark = pytest.mark.cluster


@pytest.fixture
async def receiver_server() -> AsyncIterator[tuple[Receiver, TestServer]]:
    receiver = Receiver(SECRET, fail=10**6)  # down until the test says otherwise
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield receiver, server


async def test_a_node_killed_mid_retry_loses_no_delivery(
    cluster: Cluster, http: aiohttp.ClientSession, receiver_server: tuple[Receiver, TestServer]
) -> None:
    receiver, server = receiver_server
    path = cluster.settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["jobs"].update(
        webhook_retry_initial_seconds=0.2, webhook_retry_max_delay_seconds=0.5, webhook_timeout_seconds=0.5
    )
    path.write_text(yaml.safe_dump(videos, sort_keys=False))
    cluster.extra_env = {"MV_WEBHOOK_SECRET": SECRET, "MV_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"}
    await sim_up(http, cluster)
    [first] = await nodes_up(http, cluster, 1)
    url = f"http://127.0.0.1:{server.port}/hook"
    async with http.post(
        f"{first}/api/mv/generate_video",
        json={"prompt": CLUSTER_PROMPT, "duration": 4, "webhook_url": url, "webhook_events": "all"},
    ) as response:
        assert response.status == 202, await response.text()
        job_id = (await response.json())["job_id"]
    await until(http, first, job_id, final)
    await receiver.until(lambda: receiver.attempts >= 2, timeout=30)  # the only node is retrying the first one
    [second] = await nodes_up(http, cluster, 1)
    owner = cluster.nodes[0][0]
    with_signal(owner, signal.SIGKILL)
    owner.wait(timeout=10)
    failed_before = receiver.attempts
    receiver.fail = 0  # the receiver is back: the survivor delivers everything, in order
    await receiver.until(lambda: "job.succeeded" in receiver.types(job_id), timeout=60)
    assert receiver.attempts > failed_before and receiver.refused == 0
    assert receiver.types(job_id) == ["job.queued", "job.running", "job.succeeded"]
    async with http.get(f"{second}/api/mv/jobs/{job_id}/deliveries") as response:
        shown = await response.json()
    assert [d["status"] for d in shown["deliveries"]][:3] == ["delivered"] * 3
    assert shown["deliveries"][0]["attempt_count"] >= 3  # failed on the killed node, then delivered by the survivor
