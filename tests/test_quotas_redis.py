"""Per-key token buckets in Redis: counters shared by every app (process) that uses the same Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import AppClient, RedisServer
from redis.asyncio import Redis

from mvserver.web.access.auth import KeyLimits, create_key
from mvserver.web.access.quotas import RedisRateLimiter, set_rate_limiter

SECRET = "test-signing-secret-0123456789abcdefghij"
SCENES = {
    "idea": "a drummer on a rooftop at dusk",
    "character_description": "a tall woman in a red coat",
    "number_of_scenes": 2,
}


@pytest.fixture
def redis_url(redis_process: RedisServer) -> str:
    return redis_process.url


@pytest.fixture
async def redis_clients(redis_url: str) -> AsyncIterator[list[Redis]]:
    clients = [Redis.from_url(redis_url) for _ in range(2)]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


async def test_buckets_are_shared_and_refill(redis_clients: list[Redis]) -> None:
    first, second = (RedisRateLimiter(client) for client in redis_clients)
    assert await first.acquire("k1:jobs", 2.0, 3) == 0
    assert await second.acquire("k1:jobs", 2.0, 3) == 0
    assert await first.acquire("k1:jobs", 2.0, 3) == 0
    wait = await second.acquire("k1:jobs", 2.0, 3)  # the burst of 3 is spent across both
    assert 0 < wait <= 0.5
    assert await first.acquire("k2:jobs", 2.0, 3) == 0  # another bucket is untouched
    await asyncio.sleep(wait + 0.05)
    assert await second.acquire("k1:jobs", 2.0, 3) == 0  # refilled at 2 tokens/s
    ttl = await redis_clients[0].pttl("mv:bucket:k1:jobs")
    assert 0 < ttl <= 2500  # an idle bucket disappears once it would be full again


async def test_a_request_of_several_jobs_takes_its_tokens_all_or_none(redis_clients: list[Redis]) -> None:
    limiter = RedisRateLimiter(redis_clients[0])
    assert await limiter.acquire("k1:jobs", 0.01, 5, cost=3) == 0
    wait = await limiter.acquire("k1:jobs", 0.01, 5, cost=3)  # 2 left: nothing taken
    assert wait == pytest.approx(100, abs=1)
    assert await limiter.acquire("k1:jobs", 0.01, 5, cost=2) == 0
    assert await limiter.acquire("k1:jobs", 0.01, 5) > 0


async def test_two_apps_share_a_keys_quota(make_client: AppClient, tmp_path: Path, redis_clients: list[Redis]) -> None:
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(keys_file, "shared", KeyLimits(blocking_per_minute=1, blocking_burst=2))
    env: dict[str, Any] = {"MV_API_KEYS_FILE": keys_file, "MV_URL_SIGNING_SECRET": SECRET}
    apps = [await make_client(**env), await make_client(**env)]
    for client, redis in zip(apps, redis_clients, strict=False):
        set_rate_limiter(client.app, RedisRateLimiter(redis))
    auth = {"Authorization": f"Bearer {key}"}
    assert (await apps[0].post("/api/mv/create_scenes", json=SCENES, headers=auth)).status == 200
    assert (await apps[1].post("/api/mv/create_scenes", json=SCENES, headers=auth)).status == 200
    for client in apps:
        refused = await client.post("/api/mv/create_scenes", json=SCENES, headers=auth)
        assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60


async def test_with_a_redis_url_two_apps_share_a_keys_quota_by_themselves(
    make_client: AppClient, tmp_path: Path, redis_url: str, redis_clients: list[Redis]
) -> None:
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(keys_file, "shared", KeyLimits(blocking_per_minute=1, blocking_burst=2))
    env: dict[str, Any] = {
        "MV_API_KEYS_FILE": keys_file,
        "MV_URL_SIGNING_SECRET": SECRET,
        "MV_REDIS_URL": redis_url,
        "MV_REDIS_PREFIX": "mvq:",
    }
    apps = [await make_client(**env), await make_client(**env)]
    auth = {"Authorization": f"Bearer {key}"}
    assert (await apps[0].post("/api/mv/create_scenes", json=SCENES, headers=auth)).status == 200
    assert (await apps[1].post("/api/mv/create_scenes", json=SCENES, headers=auth)).status == 200
    for client in apps:  # each app alone would still have a token: the burst of 2 is spent across both
        refused = await client.post("/api/mv/create_scenes", json=SCENES, headers=auth)
        assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limited"
    assert await redis_clients[0].keys("mvq:bucket:*") == [f"mvq:bucket:{key.split('_')[1]}:blocking".encode()]


async def test_after_a_redis_restart_no_request_is_a_500(
    make_client: AppClient, tmp_path: Path, redis_process: RedisServer
) -> None:
    """A restart drops every pooled connection (the buckets', the job store's, the projects'): a request that meets
    a dead one is answered 503 ``store_unavailable`` with Retry-After (or goes through), never 500; and while Redis
    is down, every route that needs it says 503 ``store_unavailable``."""
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(
        keys_file, "restart", KeyLimits(jobs_per_minute=600, jobs_burst=50, blocking_per_minute=600, blocking_burst=50)
    )
    client = await make_client(
        MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET, MV_REDIS_URL=redis_process.url, MV_REDIS_PREFIX="mvr:"
    )
    auth = {"Authorization": f"Bearer {key}"}
    video = {"prompt": "a drummer on a rooftop at dusk", "duration": 4}
    requests = [
        ("POST", "/api/mv/generate_video", video),
        ("POST", "/api/mv/create_scenes", SCENES),
        ("POST", "/api/mv/projects", {"idea": "a song", "character_description": "a singer"}),
    ]

    async def answers() -> list[tuple[int, str | None]]:
        result = []
        for method, path, body in requests:
            response = await client.request(method, path, json=body, headers=auth)
            code = (await response.json()).get("error", {}).get("code") if response.status >= 400 else None
            if response.status == 503:
                assert int(response.headers["Retry-After"]) >= 1
            result.append((response.status, code))
        return result

    assert [status for status, _ in await answers()] == [202, 200, 201]
    redis_process.stop()
    assert await answers() == [(503, "store_unavailable")] * len(requests)
    redis_process.start()
    after = await answers()  # the first use of each dead pooled connection
    assert all(status in (200, 201, 202) or code == "store_unavailable" for status, code in after), after
    assert [status for status, _ in await answers()] == [202, 200, 201]
