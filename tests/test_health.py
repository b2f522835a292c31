"""Health, liveness and readiness, and what a node leaves in Redis: readiness fails while the store is unreachable,
liveness does not; a node's wake stream and its dispatch consumer do not outlive it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from helpers import AppClient, RedisServer
from redis.asyncio import Redis

from mvserver.appkeys import JOBS
from mvserver.jobs import redis_store
from mvserver.jobs.redis_store import GROUP, RedisJobStore


async def answers(client: Any) -> dict[str, tuple[int, Any]]:
    result = {}
    for name in ("health", "health/live", "health/ready"):
        response = await client.get(f"/api/mv/{name}")
        result[name] = (response.status, await response.json())
    return result


async def test_readiness_fails_while_redis_is_down_and_liveness_does_not(
    make_client: AppClient, redis_process: RedisServer
) -> None:
    client = await make_client(MV_REDIS_URL=redis_process.url, MV_REDIS_PREFIX="mvh:")
    up = await answers(client)
    assert up["health/live"] == (200, {"status": "ok"})
    assert up["health/ready"] == (200, {"status": "ready", "store": "redis"})
    assert up["health"][0] == 200 and up["health"][1]["status"] == "ok"
    assert up["health"][1]["store"] == {"kind": "redis", "reachable": True}

    redis_process.stop()
    down = await answers(client)
    assert down["health/live"] == (200, {"status": "ok"})
    status, body = down["health/ready"]
    assert status == 503 and body["error"]["code"] == "store_unavailable"
    assert down["health"][0] == 200  # health keeps answering (a page reads keys_required from it), and says so
    assert down["health"][1]["status"] == "degraded" and down["health"][1]["store"]["reachable"] is False
    assert down["health"][1]["auth"] == up["health"][1]["auth"]

    redis_process.start()
    again = await answers(client)
    assert again["health/ready"][0] == 200 and again["health"][1]["status"] == "ok"


async def test_readiness_on_the_file_store_and_without_a_key(make_client: AppClient, tmp_path: Path) -> None:
    from mvserver.web.access.auth import KeyLimits, create_key

    keys_file = tmp_path / "keys.yaml"
    create_key(keys_file, "someone", KeyLimits())
    client = await make_client(
        MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET="test-signing-secret-0123456789abcdefghij"
    )
    result = await answers(client)  # no Authorization header: probes carry no key
    assert result["health/ready"] == (200, {"status": "ready", "store": "files"})
    assert result["health/live"] == (200, {"status": "ok"})
    assert result["health"][1]["store"] == {"kind": "files", "reachable": True}


async def test_the_openapi_document_lists_liveness_readiness_and_the_store_503(make_client: AppClient) -> None:
    client = await make_client()
    paths = (await (await client.get("/api/mv/openapi.json")).json())["paths"]
    assert set(paths["/api/mv/health/ready"]["get"]["responses"]) >= {"200", "503"}
    assert "503" not in paths["/api/mv/health/live"]["get"]["responses"]
    assert "503" not in paths["/api/mv/health"]["get"]["responses"]
    assert "store_unavailable" in paths["/api/mv/projects"]["post"]["responses"]["503"]["description"]
    assert "503" in paths["/api/mv/projects/{project_id}"]["patch"]["responses"]


async def test_following_a_job_leaves_no_key_of_the_node_in_redis(
    make_client: AppClient, redis_process: RedisServer
) -> None:
    """A node follows jobs through pub/sub subscriptions: nothing of its own is written to Redis that could outlive
    it (its former wake stream needed an expiry for that)."""
    client = await make_client(MV_REDIS_URL=redis_process.url, MV_REDIS_PREFIX="mvw:")
    node = client.app[JOBS].store.node
    redis = Redis.from_url(redis_process.url)
    try:
        created = await client.post("/api/mv/generate_video", json={"prompt": "a cat on a roof", "duration": 4})
        job_id = (await created.json())["job_id"]
        async with client.get(f"/api/mv/jobs/{job_id}/events") as stream:
            await stream.content.readline()
        assert await redis.keys(f"mvw:*{node}*") == []
    finally:
        await redis.aclose()


async def test_dispatch_consumers_of_long_gone_nodes_are_dropped(
    redis_process: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "IDLE_CONSUMER_SECONDS", 0.2)
    redis = Redis.from_url(redis_process.url, decode_responses=True)
    first = RedisJobStore(redis_process.url, prefix="mvc:", lease_seconds=0.01, node="deadbeef0001")
    await first.open()
    await first.close()
    await redis.xgroup_createconsumer("mvc:dispatch", GROUP, "deadbeef0001")  # it read the dispatch stream once
    await asyncio.sleep(0.3)  # idle longer than IDLE_CONSUMER_SECONDS
    await redis.xgroup_createconsumer("mvc:dispatch", GROUP, "livebeef0002")  # just seen: kept
    second = RedisJobStore(redis_process.url, prefix="mvc:", lease_seconds=0.01, node="secondnode03")
    try:
        await second.open()
        names = {c["name"] for c in await redis.xinfo_consumers("mvc:dispatch", GROUP)}
        assert "deadbeef0001" not in names and "livebeef0002" in names
    finally:
        await second.close()
        await redis.aclose()
