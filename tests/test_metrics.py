"""``GET /metrics`` (``MV_METRICS=true``): Prometheus text parsed by prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, HookClient, delivery, running_job
from prometheus_client.parser import text_string_to_metric_families

from mvserver.appkeys import METRICS
from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import KeyLimits, create_key
from mvserver.web.metrics import WEBHOOK_OUTCOMES

SECRET = "test-signing-secret-0123456789abcdefghij"
SCENES = {
    "idea": "a drummer on a rooftop at dusk",
    "character_description": "a tall woman in a red coat",
    "number_of_scenes": 2,
}


async def scrape(client: TestClient, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics`` keyed by (name, labels)."""
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_request_and_provider_metrics_move(make_client: AppClient, sim: Simulator) -> None:
    client = await make_client(MV_METRICS="true")
    before = await scrape(client)
    route = {"method": "POST", "route": "/api/mv/create_scenes"}
    assert value(before, "mv_http_requests_total", **route, status="200") == 0
    for _ in range(2):
        assert (await client.post("/api/mv/create_scenes", json=SCENES)).status == 200
    assert (await client.post("/api/mv/create_scenes", json={})).status == 400
    sim.add_fault("gemini.generate", status=503, times=1)
    assert (await client.post("/api/mv/create_scenes", json=SCENES)).status == 502
    after = await scrape(client)
    assert value(after, "mv_http_requests_total", **route, status="200") == 2
    assert value(after, "mv_http_requests_total", **route, status="400") == 1
    assert value(after, "mv_http_requests_total", **route, status="502") == 1
    assert value(after, "mv_http_request_duration_seconds_count", **route) == 4
    call = {"provider": "gemini", "operation": "generate_content"}
    assert value(after, "mv_provider_call_duration_seconds_count", **call, outcome="ok") == 2
    assert value(after, "mv_provider_call_duration_seconds_count", **call, outcome="error") == 1
    assert value(after, "mv_provider_errors_total", **call, code="provider_unavailable") == 1
    # Unknown paths share one label: a client cannot grow the label set.
    for n in range(3):
        await client.get(f"/no/such/path/{n}")
    unmatched = await scrape(client)
    assert value(unmatched, "mv_http_requests_total", method="GET", route="unmatched", status="404") == 3
    for name in ("mv_job_queue_depth", "mv_sse_subscribers"):
        assert (name, frozenset()) in unmatched


async def test_replicate_calls_are_timed(make_client: AppClient) -> None:
    client = await make_client(MV_METRICS="true")
    image = await client.post(
        "/api/mv/generate_character_reference", json={"character_description": "a tall woman in a red coat"}
    )
    assert image.status == 200
    samples = await scrape(client)
    created = value(
        samples, "mv_provider_call_duration_seconds_count", provider="replicate", operation="create", outcome="ok"
    )
    polled = value(
        samples, "mv_provider_call_duration_seconds_count", provider="replicate", operation="get", outcome="ok"
    )
    assert created == 1 and polled >= 1


async def test_each_app_has_its_own_registry(make_client: AppClient) -> None:
    first = await make_client(MV_METRICS="true")
    second = await make_client(MV_METRICS="true")
    assert first.app[METRICS].registry is not second.app[METRICS].registry
    await first.get("/api/mv/health")
    health = {"method": "GET", "route": "/api/mv/health", "status": "200"}
    assert value(await scrape(first), "mv_http_requests_total", **health) == 1
    assert value(await scrape(second), "mv_http_requests_total", **health) == 0


async def test_metrics_need_a_key_and_count_refusals(make_client: AppClient, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(keys_file, "tight", KeyLimits(blocking_per_minute=1, blocking_burst=1))
    client = await make_client(MV_METRICS="true", MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    auth = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/metrics")).status == 401
    assert (await client.post("/api/mv/create_scenes", json=SCENES, headers=auth)).status == 200
    for _ in range(2):
        assert (await client.post("/api/mv/create_scenes", json=SCENES, headers=auth)).status == 429
    samples = await scrape(client, auth)
    assert value(samples, "mv_rate_limit_refusals_total", bucket="blocking", code="rate_limited") == 2
    assert value(samples, "mv_auth_failures_total", code="auth_required") == 1
    route = {"method": "POST", "route": "/api/mv/create_scenes"}
    assert value(samples, "mv_http_requests_total", **route, status="429") == 2


async def scrape_until(client: TestClient, moved: Any, timeout: float = 5.0) -> dict[tuple[str, frozenset], float]:
    """Scrape until ``moved(samples)`` (the counter is bumped just after the final event is written)."""
    async with asyncio.timeout(timeout):
        while not moved(samples := await scrape(client)):
            await asyncio.sleep(0.02)
    return samples


async def test_job_metrics_move_when_jobs_run_and_streams_open(make_client: AppClient, sim: Simulator) -> None:
    sim.video_latency = 0.3
    client = await make_client(MV_METRICS="true")
    video = {"prompt": "a drummer on a rooftop", "duration": 4, "generate_audio": False}
    accepted = await (await client.post("/api/mv/generate_video", json=video)).json()
    backend = accepted["backend"]
    finished = {"status": "succeeded", "kind": "video", "backend": backend}
    assert value(await scrape(client), "mv_jobs_finished_total", **finished) == 0
    async with client.get(f"/api/mv/jobs/{accepted['job_id']}/events") as stream:
        assert stream.status == 200
        assert value(await scrape(client), "mv_sse_subscribers") == 1
        await stream.read()  # the stream ends after the job's final event
    after = await scrape_until(client, lambda samples: value(samples, "mv_jobs_finished_total", **finished) > 0)
    assert value(after, "mv_jobs_finished_total", **finished) == 1
    job = await (await client.get(f"/api/mv/jobs/{accepted['job_id']}")).json()
    cost = job["usage"]["cost"]
    assert cost["amount_micros"] > 0
    assert value(after, "mv_job_cost_micros_total", model=job["model"], basis=cost["basis"]) == cost["amount_micros"]
    assert value(after, "mv_sse_subscribers") == 0
    sim.video_latency = 60.0
    second = await (await client.post("/api/mv/generate_video", json=video)).json()
    canceled = await client.post(f"/api/mv/jobs/{second['job_id']}/cancel")
    assert (await canceled.json())["status"] == "canceled"
    final = await scrape_until(
        client,
        lambda samples: value(samples, "mv_jobs_finished_total", status="canceled", kind="video", backend=backend) > 0,
    )
    assert value(final, "mv_jobs_finished_total", status="canceled", kind="video", backend=backend) == 1
    assert value(final, "mv_jobs_finished_total", **finished) == 1


def job_gauges(samples: dict[tuple[str, frozenset], float]) -> dict[tuple[str, str, str], float]:
    """The non-zero ``mv_jobs`` series as {(status, kind, backend): value}."""
    gauges = {}
    for (name, labels), number in samples.items():
        if name == "mv_jobs" and number:
            tags = dict(labels)
            gauges[(tags["status"], tags["kind"], tags["backend"])] = number
    return gauges


@pytest.mark.both_stores
async def test_job_gauges_count_the_stores_unfinished_jobs_at_each_scrape(
    make_client: AppClient, sim: Simulator, job_store_kind: str
) -> None:
    sim.video_latency = 60.0  # the jobs stay running until they are canceled
    client = await make_client(MV_METRICS="true", MV_MAX_CONCURRENT_JOBS="1")
    before = await scrape(client)
    assert job_gauges(before) == {} and value(before, "mv_job_queue_depth") == 0
    video = {"prompt": "a drummer on a rooftop", "duration": 4, "generate_audio": False}
    ids = []
    for backend in ("replicate", "replicate", "gemini"):
        response = await client.post("/api/mv/generate_video", json={**video, "backend": backend})
        assert response.status == 202, await response.text()
        ids.append((await response.json())["job_id"])
    # One slot: the first job runs, the other two wait for it.
    expected = {
        ("running", "video", "replicate"): 1,
        ("queued", "video", "replicate"): 1,
        ("queued", "video", "gemini"): 1,
    }
    samples = await scrape_until(client, lambda s: job_gauges(s) == expected)
    assert value(samples, "mv_job_queue_depth") == 2
    clients = [client]
    if job_store_kind == "redis":
        # A second process on the same Redis takes the next job; both report the same cluster-wide numbers.
        other = await make_client(MV_METRICS="true", MV_MAX_CONCURRENT_JOBS="1")
        clients.append(other)
        expected = {("running", "video", "replicate"): 2, ("queued", "video", "gemini"): 1}
        for each in clients:
            samples = await scrape_until(each, lambda s: job_gauges(s) == expected, timeout=15)
            assert value(samples, "mv_job_queue_depth") == 1
    for job_id in ids:
        canceled = await client.post(f"/api/mv/jobs/{job_id}/cancel")
        assert (await canceled.json())["status"] == "canceled"
    for each in clients:
        after = await scrape_until(each, lambda s: job_gauges(s) == {})
        assert value(after, "mv_job_queue_depth") == 0
        assert ("mv_jobs", frozenset({"status": "queued", "kind": "video", "backend": "gemini"}.items())) in after
    finished = 0.0
    for each in clients:  # each process counts the jobs it finished
        samples = await scrape(each)
        finished += sum(
            value(samples, "mv_jobs_finished_total", status="canceled", kind="video", backend=backend)
            for backend in ("replicate", "gemini")
        )
    assert finished == 3


async def test_a_census_that_fails_shows_unknown_not_zero(make_client: AppClient, sim: Simulator) -> None:
    sim.video_latency = 60.0
    client = await make_client(MV_METRICS="true")
    response = await client.post("/api/mv/generate_video", json={"prompt": "a drummer", "duration": 4})
    assert response.status == 202
    assert job_gauges(await scrape_until(client, lambda s: bool(job_gauges(s))))
    metrics = client.app[METRICS]
    working = metrics.census

    async def unreachable() -> Any:
        raise ConnectionError("store down")

    metrics.census = unreachable
    samples = await scrape(client)
    assert job_gauges(samples) == {} and math.isnan(value(samples, "mv_job_queue_depth"))
    assert value(samples, "mv_http_requests_total", method="POST", route="/api/mv/generate_video", status="202") == 1
    metrics.census = working
    assert job_gauges(await scrape(client)) == {("running", "video", "replicate"): 1}


@pytest.mark.both_stores
async def test_webhook_deliveries_are_counted_by_outcome(hook_client: HookClient, sim: Simulator) -> None:
    client = await hook_client(MV_METRICS="true")

    def deliveries(samples: dict[tuple[str, frozenset], float]) -> dict[str, float]:
        return {
            outcome: value(samples, "mv_webhook_deliveries_total", provider="replicate", outcome=outcome)
            for outcome in WEBHOOK_OUTCOMES
        }

    before = await scrape(client)
    assert all(
        ("mv_webhook_deliveries_total", frozenset({"provider": "replicate", "outcome": o}.items())) in before
        for o in WEBHOOK_OUTCOMES
    )
    assert set(deliveries(before).values()) == {0}
    # A real job: the simulator signs and sends its webhooks, and the job applies them.
    job_id, forged = await running_job(client)
    finished = await scrape_until(
        client,
        lambda s: value(s, "mv_jobs_finished_total", status="succeeded", kind="video", backend="replicate") == 1,
        timeout=15,
    )
    counted = deliveries(finished)
    assert counted["accepted"] >= 2  # at least the start and the completed delivery
    url = f"/api/mv/webhooks/replicate?job={job_id}"
    raw, headers = delivery("whsec_" + "B" * 44, forged)
    assert (await client.post(url, data=raw, headers=headers)).status == 401
    raw, headers = delivery(sim.webhook_secret, forged, webhook_id="msg_twice")
    for _ in range(2):
        assert (await client.post(url, data=raw, headers=headers)).status == 200  # job finished, then a duplicate
    raw, headers = delivery(sim.webhook_secret, forged)
    unknown = "/api/mv/webhooks/replicate?job=00000000-0000-4000-8000-000000000000"
    assert (await client.post(unknown, data=raw, headers=headers)).status == 200
    raw, headers = delivery(sim.webhook_secret, {"not": "a prediction"})
    assert (await client.post(unknown, data=raw, headers=headers)).status == 400
    after = deliveries(await scrape(client))
    moved = {outcome: after[outcome] - counted[outcome] for outcome in WEBHOOK_OUTCOMES}
    assert moved == {
        **{o: 0 for o in WEBHOOK_OUTCOMES},
        "bad_signature": 1,
        "job_finished": 1,
        "duplicate": 1,
        "unknown_job": 1,
        "malformed": 1,
    }
