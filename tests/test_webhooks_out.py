"""Webhooks out of jobs, to a real local receiver that verifies every delivery with the ``standardwebhooks``
library: every wanted event arrives, in order, signed; failed attempts are retried; a private address is refused
at submit and at connect time; ``GET .../deliveries`` and ``POST .../redeliver``. Both job stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import PROMPT, SECRET, AppClient, Receiver, events_of, jobs_settings
from standardwebhooks import Webhook

from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import KeyLimits, create_key, read_keys, write_keys

pytestmark = pytest.mark.both_stores

FAST_RETRIES = {
    "webhook_retry_initial_seconds": 0.05,
    "webhook_retry_max_delay_seconds": 0.2,
    "webhook_timeout_seconds": 2,
}


@pytest.fixture
async def receiver_server() -> AsyncIterator[tuple[Receiver, TestServer]]:
    receiver = Receiver(SECRET)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield receiver, server


def hook_url(server: TestServer, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.port}/hook"


@pytest.fixture
async def client(make_client: AppClient, settings_dir: Path) -> TestClient:
    jobs_settings(settings_dir, **FAST_RETRIES)
    return await make_client(MV_WEBHOOK_SECRET=SECRET, MV_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8")


async def submit(client: TestClient, **body: Any) -> str:
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, "duration": 4, **body})
    assert response.status == 202, await response.text()
    return (await response.json())["job_id"]


async def deliveries(client: TestClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/mv/jobs/{job_id}/deliveries")
    assert response.status == 200, await response.text()
    return await response.json()


async def settled(client: TestClient, job_id: str, count: int) -> list[dict[str, Any]]:
    """The job's deliveries once ``count`` of them are no longer pending (the record is saved after each)."""
    async with asyncio.timeout(10):
        while True:
            shown = (await deliveries(client, job_id))["deliveries"]
            if sum(d["status"] != "pending" for d in shown) >= count:
                return shown
            await asyncio.sleep(0.05)


async def test_every_status_change_arrives_signed_and_in_order(
    client: TestClient, sim: Simulator, receiver_server: tuple[Receiver, TestServer]
) -> None:
    receiver, server = receiver_server
    sim.video_latency = 0.3
    job_id = await submit(client, webhook_url=hook_url(server), webhook_events="all")
    await events_of(client, job_id)
    await receiver.until(lambda: "job.succeeded" in receiver.types(job_id))
    assert receiver.types(job_id) == ["job.queued", "job.running", "job.succeeded"]
    event_ids = [d["event_id"] for d in receiver.verified]
    assert event_ids == sorted(event_ids)
    assert receiver.refused == 0
    final = receiver.verified[-1]
    assert final["id"] == f"msg_{job_id}_{final['event_id']}"
    assert final["data"]["status"] == "succeeded" and final["data"]["video_url"]
    shown = await deliveries(client, job_id)
    assert shown["webhook_events"] == "all" and shown["webhook_url"] == hook_url(server)
    made = await settled(client, job_id, 3)
    assert [d["status"] for d in made] == ["delivered"] * 3
    assert all(d["attempts"][-1]["http_status"] == 204 for d in made)
    job = await (await client.get(f"/api/mv/jobs/{job_id}")).json()
    assert job["webhook_url"] == hook_url(server) and job["webhook_events"] == "all"
    # the final delivery carries the job's usage and cost, as its final event does; the earlier ones have none yet
    assert final["data"]["usage"] == job["usage"] and job["usage"]["cost"]["amount_micros"] > 0
    assert [d["data"]["usage"] for d in receiver.verified[:-1]] == [None, None]


async def test_a_receiver_that_fails_the_first_attempts_gets_it_later(
    client: TestClient, receiver_server: tuple[Receiver, TestServer]
) -> None:
    receiver, server = receiver_server
    receiver.fail = 3
    job_id = await submit(client, webhook_url=hook_url(server))  # completed: the final event only
    await receiver.until(lambda: receiver.types(job_id))
    assert receiver.types(job_id) == ["job.succeeded"]
    [delivery] = await settled(client, job_id, 1)
    assert delivery["status"] == "delivered" and delivery["attempt_count"] == 4
    assert [a["http_status"] for a in delivery["attempts"]] == [500, 500, 500, 204]
    gaps = [b["at"] - a["at"] for a, b in zip(delivery["attempts"], delivery["attempts"][1:], strict=False)]
    assert gaps[1] > gaps[0] * 1.3  # exponential backoff


async def test_redeliver_sends_the_last_event_again(
    client: TestClient, receiver_server: tuple[Receiver, TestServer]
) -> None:
    receiver, server = receiver_server
    job_id = await submit(client, webhook_url=hook_url(server))
    await receiver.until(lambda: receiver.types(job_id))
    response = await client.post(f"/api/mv/jobs/{job_id}/redeliver")
    assert response.status == 202, await response.text()
    await receiver.until(lambda: len(receiver.types(job_id)) == 2)
    first, again = receiver.verified
    assert first["id"] == again["id"] and again["type"] == "job.succeeded"  # the same message, sent again
    response = await client.post(f"/api/mv/jobs/{job_id}/redeliver", json={"event_id": 999})
    assert response.status == 400 and (await response.json())["error"]["field"] == "event_id"


@pytest.mark.store_independent
@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        "http://[::1]:9/x",
        "http://192.168.0.1/",
        "ftp://example.com/x",
        "http://user:pw@example.com/",
    ],
)
async def test_a_private_or_bad_url_is_refused_at_submit(make_client: AppClient, url: str) -> None:
    client = await make_client(MV_WEBHOOK_SECRET=SECRET)
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, "webhook_url": url})
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["field"] == "webhook_url"


async def test_a_name_that_resolves_to_loopback_is_refused_when_connecting(
    make_client: AppClient, settings_dir: Path, receiver_server: tuple[Receiver, TestServer]
) -> None:
    receiver, server = receiver_server
    jobs_settings(settings_dir, **FAST_RETRIES)
    client = await make_client(MV_WEBHOOK_SECRET=SECRET)  # no allow-list: loopback is not for webhooks
    job_id = await submit(client, webhook_url=hook_url(server, "localhost"))  # a name passes the submit check
    await events_of(client, job_id)
    async with asyncio.timeout(10):
        while True:
            shown = (await deliveries(client, job_id))["deliveries"]
            if shown and len(shown[0]["attempts"]) >= 2:
                break
            await asyncio.sleep(0.05)
    assert shown[0]["status"] == "pending"
    assert all("refused" in a["error"] and a["http_status"] is None for a in shown[0]["attempts"]), shown[0]["attempts"]
    assert receiver.attempts == 0


@pytest.mark.store_independent
async def test_without_a_secret_a_webhook_is_refused(
    make_client: AppClient, receiver_server: tuple[Receiver, TestServer]
) -> None:
    _, server = receiver_server
    client = await make_client(MV_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8")
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, "webhook_url": hook_url(server)})
    assert response.status == 400 and (await response.json())["error"]["code"] == "webhooks_not_configured"


async def test_a_keys_secret_signs_and_its_default_url_applies(
    make_client: AppClient, settings_dir: Path, tmp_path: Path, receiver_server: tuple[Receiver, TestServer]
) -> None:
    receiver, server = receiver_server
    keys_file = tmp_path / "keys.yaml"
    record, key = create_key(keys_file, "alice", KeyLimits(jobs_per_minute=600, jobs_burst=50))
    assert record.webhook_secret and record.webhook_secret.startswith("whsec_")
    keys = read_keys(keys_file)
    keys.keys[0] = keys.keys[0].model_copy(update={"webhook_url": hook_url(server)})
    write_keys(keys_file, keys)
    receiver.webhook = Webhook(record.webhook_secret)
    jobs_settings(settings_dir, **FAST_RETRIES)
    client = await make_client(
        MV_API_KEYS_FILE=keys_file,
        MV_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        MV_URL_SIGNING_SECRET="test-signing-secret-0123456789abcdefghij",
    )
    response = await client.post(
        "/api/mv/generate_video", json={"prompt": PROMPT}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    await receiver.until(lambda: receiver.types(job_id))
    assert receiver.types(job_id) == ["job.succeeded"] and receiver.refused == 0


async def test_deliveries_survive_a_restart(
    make_client: AppClient, settings_dir: Path, live_env: dict[str, str], receiver_server: tuple[Receiver, TestServer]
) -> None:
    """The receiver is down while the job ends; the app restarts; the delivery still arrives."""
    receiver, server = receiver_server
    receiver.fail = 10**6
    jobs_settings(settings_dir, **{**FAST_RETRIES, "webhook_retry_initial_seconds": 0.5})
    first = await make_client(MV_WEBHOOK_SECRET=SECRET, MV_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8")
    job_id = await submit(first, webhook_url=hook_url(server))
    await receiver.until(lambda: receiver.attempts >= 1)
    await first.close()
    receiver.fail = 0
    second = await make_client(MV_WEBHOOK_SECRET=SECRET, MV_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8")
    await receiver.until(lambda: receiver.types(job_id))
    assert receiver.types(job_id) == ["job.succeeded"]
    assert (await settled(second, job_id, 1))[0]["status"] == "delivered"
