"""Replicate webhooks: the simulator's signed deliveries and faults, the receiver, and jobs that finish by them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import HookClient, delivery, events_of, running_job, submit
from replicate.exceptions import ReplicateError
from replicate.webhook import Webhooks

from mvserver.app import create_app
from mvserver.appkeys import JOBS, WEBHOOK_RECEIVER
from mvserver.core.config import ConfigError, EnvSettings
from mvserver.core.errors import ErrorInfo
from mvserver.jobs.updates import PushedUpdates
from mvserver.providers.base import Snapshot
from mvserver.providers.replicate import make_client
from mvserver.providers.replicate_webhooks import SeenIds
from mvserver.sandbox.app import Simulator
from mvserver.sandbox.state import SENDER

pytestmark = pytest.mark.both_stores

FINAL = {"succeeded", "failed", "canceled"}


def assert_sequence(events: list[dict[str, Any]], final: str = "succeeded") -> None:
    """Event ids 1..n, one terminal event and it is the last one, progress never going down."""
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert [e["event"] for e in events if e["event"] in FINAL] == [final]
    assert events[-1]["event"] == final
    progress = [e["data"]["progress"] for e in events if e["data"]["progress"] is not None]
    assert progress == sorted(progress)


def polls(sim: Simulator) -> int:
    return sum(1 for route, _ in sim.requests if route == "replicate.get")


async def deliveries_done(sim_server: TestServer, timeout: float = 10.0) -> None:
    """Wait until the simulator has nothing left to deliver: every webhook (late, delayed or retried) was answered."""
    sender = sim_server.app[SENDER]
    async with asyncio.timeout(timeout):
        while sender.tasks:
            await asyncio.sleep(0.02)


async def prediction_record(client: TestClient, sim: Simulator, job_id: str) -> dict[str, Any]:
    """The simulator's record of the job's prediction: what the create request asked for."""
    prediction_id = (await client.app[JOBS].get(job_id)).prediction_id
    return json.loads((sim.state_dir / "predictions" / f"{prediction_id}.json").read_text())


async def test_a_job_finishes_by_its_start_and_completed_webhooks_with_a_single_poll(
    hook_client: HookClient, sim: Simulator
) -> None:
    sim.video_latency = 1.0  # long enough for logs deliveries (one per 500 ms) between start and completed, if asked
    client = await hook_client()
    job = await submit(client)
    events = await events_of(client, job["job_id"])
    assert_sequence(events)
    assert polls(sim) == 1  # the first look after create; the safety poll (30 s) never came
    assert (await prediction_record(client, sim, job["job_id"]))["webhook_events_filter"] == ["start", "completed"]
    assert [(event, status) for event, _, status in sim.webhook_deliveries] == [("start", 200), ("completed", 200)]
    assert len(client.app[WEBHOOK_RECEIVER].seen) == 2  # the server received those two, nothing else
    assert not any("logs" in e["data"] for e in events)


async def test_a_job_that_asks_for_provider_logs_gets_logs_webhooks_and_progress_with_logs(
    hook_client: HookClient, sim: Simulator
) -> None:
    sim.video_latency = 1.0  # long enough for logs deliveries (one per 500 ms) between start and completed
    client = await hook_client()
    job = await submit(client, provider_logs=True)
    events = await events_of(client, job["job_id"])
    assert_sequence(events)
    assert polls(sim) == 1
    record = await prediction_record(client, sim, job["job_id"])
    assert record["webhook_events_filter"] == ["start", "logs", "completed"]
    events_seen = [event for event, _, _ in sim.webhook_deliveries]
    assert events_seen[0] == "start" and events_seen[-1] == "completed" and "logs" in events_seen
    assert all(status == 200 for _, _, status in sim.webhook_deliveries)
    assert any(e["data"].get("logs") for e in events if e["event"] == "progress")


@pytest.mark.parametrize(
    "kind, options",
    [
        ("duplicate", {}),
        ("out_of_order", {"event": "logs"}),  # every logs delivery goes out after the next one, the last after the end
        ("delay", {"seconds": 0.3}),
        ("bad_signature", {"event": "logs"}),
        ("old_timestamp", {"event": "logs"}),
        ("drop", {"event": "logs"}),
    ],
)
async def test_each_webhook_fault_still_ends_the_job_once(
    hook_client: HookClient, sim: Simulator, kind: str, options: dict[str, Any], sim_server: TestServer
) -> None:
    sim.video_latency = 1.0  # long enough for logs deliveries (one per 500 ms) between start and completed
    client = await hook_client()
    sim.add_fault("replicate.webhook", kind, times=100, **options)
    job = await submit(client, provider_logs=True)  # logs deliveries between start and completed, to be faulted
    events = await events_of(client, job["job_id"])
    assert_sequence(events)
    assert polls(sim) == 1  # finished by its completed webhook, not by a poll
    faulted = [status for _, fault, status in sim.webhook_deliveries if fault == kind]
    assert faulted, "the fault hit no delivery"
    if kind in ("bad_signature", "old_timestamp"):
        assert set(faulted) == {401}
    await deliveries_done(sim_server)  # late (out-of-order, delayed) deliveries arrive after the end, change nothing
    assert await events_of(client, job["job_id"]) == events


async def test_a_late_processing_webhook_after_the_end_is_acknowledged_and_ignored(
    hook_client: HookClient, sim: Simulator, sim_server: TestServer
) -> None:
    sim.video_latency = 1.0  # long enough for logs deliveries (one per 500 ms) between start and completed
    client = await hook_client()
    sim.add_fault("replicate.webhook", "out_of_order", times=100, event="logs")
    job = await submit(client, provider_logs=True)
    events = await events_of(client, job["job_id"])
    await deliveries_done(sim_server)
    # the last logs delivery was held back until after "completed": it was answered 200 and moved nothing
    assert [event for event, _, _ in sim.webhook_deliveries][-1] == "logs"
    assert sim.webhook_deliveries[-1][2] == 200
    assert await events_of(client, job["job_id"]) == events
    assert (await (await client.get(f"/api/mv/jobs/{job['job_id']}")).json())["status"] == "succeeded"


async def test_a_dropped_completed_webhook_is_covered_by_the_safety_poll(
    hook_client: HookClient, sim: Simulator
) -> None:
    client = await hook_client(safety=0.5)
    sim.add_fault("replicate.webhook", "drop", event="completed")
    job = await submit(client)
    events = await events_of(client, job["job_id"])
    assert_sequence(events)
    assert polls(sim) >= 2  # the safety poll found the end
    assert not client.app[JOBS].pushed.unreachable  # start arrived: webhooks do get through


async def test_a_bad_signature_on_the_completed_webhook_is_covered_by_the_safety_poll(
    hook_client: HookClient, sim: Simulator, sim_server: TestServer
) -> None:
    sim.webhook_retry_seconds = 1.0
    client = await hook_client(safety=0.5)
    sim.add_fault("replicate.webhook", "bad_signature", event="completed")
    job = await submit(client)
    assert_sequence(await events_of(client, job["job_id"]))
    await deliveries_done(sim_server)  # the retries of the terminal webhook, all refused
    refused = [status for event, _, status in sim.webhook_deliveries if event == "completed"]
    assert refused == [401] * len(refused) and len(refused) > 1


async def test_when_no_webhook_arrives_the_safety_poll_finishes_the_job_and_new_jobs_poll_normally(
    hook_client: HookClient, sim: Simulator
) -> None:
    client = await hook_client(safety=0.5)
    job = await submit(client, prompt="Every webhook of this one is lost [sandbox:webhook-drop]")
    assert_sequence(await events_of(client, job["job_id"]))
    assert client.app[JOBS].pushed.unreachable
    assert all(status is None for _, _, status in sim.webhook_deliveries)
    before = len(sim.webhook_deliveries)
    second = await submit(client)
    assert_sequence(await events_of(client, second["job_id"]))
    assert len(sim.webhook_deliveries) == before  # created without a webhook
    prediction = json.loads(
        (
            sim.state_dir / "predictions" / f"{(await client.app[JOBS].get(second['job_id'])).prediction_id}.json"
        ).read_text()
    )
    assert prediction["webhook"] is None


async def test_a_wrong_secret_refuses_every_delivery_and_polling_takes_over(
    hook_client: HookClient, sim: Simulator
) -> None:
    client = await hook_client(safety=0.5, MV_REPLICATE_WEBHOOK_SECRET="whsec_" + "A" * 44)
    job = await submit(client)
    assert_sequence(await events_of(client, job["job_id"]))
    assert {status for event, _, status in sim.webhook_deliveries if event != "completed"} == {401}
    assert client.app[JOBS].pushed.unreachable


async def test_the_secret_from_the_environment_is_used(hook_client: HookClient, sim: Simulator) -> None:
    client = await hook_client(MV_REPLICATE_WEBHOOK_SECRET=sim.webhook_secret)
    assert client.app[WEBHOOK_RECEIVER].secret == sim.webhook_secret
    job = await submit(client)
    assert_sequence(await events_of(client, job["job_id"]))
    assert polls(sim) == 1


# -- the simulator's deliveries ---------------------------------------------------------------------------------


async def test_simulator_signs_deliveries_like_replicate_and_retries_only_the_end(
    sim: Simulator, sim_server: TestServer, aiohttp_server: Any
) -> None:
    received: list[tuple[float, dict[str, str], str]] = []
    refusals = [500, 503]  # the first two attempts at the terminal delivery fail

    async def receiver(request: web.Request) -> web.Response:
        body = await request.text()
        received.append((time.monotonic(), dict(request.headers), body))
        if json.loads(body)["status"] == "succeeded" and refusals:
            return web.Response(status=refusals.pop(0))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receiver)
    hook = await aiohttp_server(app)
    sim.webhook_retry_seconds = 3.0
    sim.video_latency = 1.0  # the start delivery must leave before a tenth of the latency has passed, even under load
    client = make_client("r8_test", str(sim_server.make_url("/replicate")))
    try:
        secret = await client.webhooks.default.async_secret()
        assert secret.key == sim.webhook_secret and secret.key.startswith("whsec_")
        prediction = await client.models.predictions.async_create(
            model="google/veo-3.1",
            input={"prompt": "a lighthouse at night", "duration": 4},
            webhook=str(hook.make_url("/hook?job=1")),
            webhook_events_filter=["start", "logs", "completed"],
        )
        async with asyncio.timeout(10):
            while sum(json.loads(body)["status"] == "succeeded" for _, _, body in received) < 3:
                await asyncio.sleep(0.05)
        final = (await client._async_client.get(f"/v1/predictions/{prediction.id}")).json()
    finally:
        await client._async_client.aclose()
    bodies = [json.loads(body) for _, _, body in received]
    for _, headers, body in received:
        Webhooks.validate(headers=headers, body=body, secret=secret, tolerance=300)  # raises if not valid
        assert headers["Content-Type"] == "application/json" and "Origin" not in headers
    assert bodies[0]["status"] == "starting" and bodies[-1] == final  # the terminal body is exactly the GET's
    logs_times = [at for (at, _, _), body in zip(received, bodies, strict=False) if body["status"] == "processing"]
    assert logs_times and all(b - a >= 0.45 for a, b in zip(logs_times, logs_times[1:], strict=False))  # throttled
    terminal = [
        headers["webhook-id"]
        for (_, headers, _), body in zip(received, bodies, strict=False)
        if body["status"] == "succeeded"
    ]
    assert len(terminal) == 3 and len(set(terminal)) == 1  # two refusals, retried under the same id
    assert len({headers["webhook-id"] for _, headers, _ in received}) == len(received) - 2


async def test_simulator_rejects_a_malformed_webhook_request(sim_server: TestServer) -> None:
    client = make_client("r8_test", str(sim_server.make_url("/replicate")))
    try:
        with pytest.raises(ReplicateError) as raised:
            await client.models.predictions.async_create(
                model="google/veo-3.1",
                input={"prompt": "x"},
                webhook="not a url",
                webhook_events_filter=["start", "all"],
            )
    finally:
        await client._async_client.aclose()
    assert raised.value.status == 422
    problems = raised.value.response.json()["invalid_fields"]  # type: ignore[attr-defined]
    assert {p["field"] for p in problems} == {"webhook", "webhook_events_filter"}


# -- the receiver -----------------------------------------------------------------------------------------------


async def test_forged_and_replayed_deliveries_get_401_and_change_nothing(
    hook_client: HookClient, sim: Simulator
) -> None:
    client = await hook_client()
    job_id, forged = await running_job(client)
    url = f"/api/mv/webhooks/replicate?job={job_id}"
    other_secret = "whsec_" + "B" * 44
    cases = [
        delivery(other_secret, forged),  # wrong key
        delivery(sim.webhook_secret, forged, age=301),  # replayed: valid signature, stale timestamp
        delivery(sim.webhook_secret, forged, age=-400),  # from the future
    ]
    raw, headers = delivery(sim.webhook_secret, forged)
    cases.append((raw, {k: v for k, v in headers.items() if k != "webhook-signature"}))  # unsigned
    cases.append((raw, {**headers, "webhook-timestamp": "soon"}))
    cases.append((raw, {**headers, "webhook-signature": "v1,***"}))
    cases.append((raw.replace(b"forged", b"FORGED"), headers))  # body changed after signing
    for raw_body, hdrs in cases:
        response = await client.post(url, data=raw_body, headers=hdrs)
        assert response.status == 401, hdrs
        assert (await response.json())["error"]["code"] == "webhook_unverified"
    events = await events_of(client, job_id)
    assert_sequence(events)  # succeeded, as the real prediction did


async def test_receiver_acknowledges_duplicates_unknown_jobs_and_other_predictions(
    hook_client: HookClient, sim: Simulator
) -> None:
    client = await hook_client()
    job_id, body = await running_job(client)
    starting = {**body, "status": "starting", "error": None}
    raw, headers = delivery(sim.webhook_secret, starting, webhook_id="msg_fixed")
    url = f"/api/mv/webhooks/replicate?job={job_id}"
    first = await (await client.post(url, data=raw, headers=headers)).json()
    assert first["status"] in ("accepted", "ignored")  # ignored once the job is past "starting"
    assert (await (await client.post(url, data=raw, headers=headers)).json()) == {"status": "duplicate"}
    unknown = "00000000-0000-4000-8000-000000000000"
    raw, headers = delivery(sim.webhook_secret, starting)
    response = await client.post(f"/api/mv/webhooks/replicate?job={unknown}", data=raw, headers=headers)
    assert (response.status, await response.json()) == (200, {"status": "ignored"})
    raw, headers = delivery(sim.webhook_secret, {**body, "id": "someoneelsesprediction000"})
    response = await client.post(url, data=raw, headers=headers)
    assert (response.status, await response.json()) == (200, {"status": "ignored"})
    assert_sequence(await events_of(client, job_id))


async def test_receiver_rejects_malformed_requests_naming_the_problem(hook_client: HookClient, sim: Simulator) -> None:
    client = await hook_client()
    url = "/api/mv/webhooks/replicate"
    body = {"id": "x", "model": "m", "version": "v", "status": "processing"}
    raw, headers = delivery(sim.webhook_secret, body)
    response = await client.post(url, data=raw, headers={**headers, "Content-Type": "text/plain"})
    assert response.status == 415
    response = await client.post(url + "?job=nope", data=raw, headers=headers)
    assert (response.status, (await response.json())["error"]["field"]) == (400, "job")
    raw, headers = delivery(sim.webhook_secret, {"not": "a prediction"})
    response = await client.post(url + "?job=00000000-0000-4000-8000-000000000000", data=raw, headers=headers)
    assert (response.status, (await response.json())["error"]["code"]) == (400, "invalid_body")
    big = {**body, "logs": "x" * (2 * 1024 * 1024)}
    raw, headers = delivery(sim.webhook_secret, big)
    response = await client.post(url + "?job=00000000-0000-4000-8000-000000000000", data=raw, headers=headers)
    assert response.status == 413
    chunked = await client.post(url, data=_chunks(raw), headers=headers)  # no Content-Length: capped while reading
    assert chunked.status == 413
    fits = {**body, "logs": "x" * (1024 * 1024)}  # a prediction with a megabyte of logs still fits
    raw, headers = delivery(sim.webhook_secret, fits)
    response = await client.post(url + "?job=00000000-0000-4000-8000-000000000000", data=raw, headers=headers)
    assert response.status == 200


async def _chunks(raw: bytes) -> Any:
    for start in range(0, len(raw), 256 * 1024):
        yield raw[start : start + 256 * 1024]


async def test_without_webhooks_the_route_refuses_and_jobs_poll(make_client: Any, sim: Simulator) -> None:
    client = await make_client()
    raw, headers = delivery(sim.webhook_secret, {"id": "x", "model": "m", "version": "v", "status": "processing"})
    response = await client.post(
        "/api/mv/webhooks/replicate?job=00000000-0000-4000-8000-000000000000", data=raw, headers=headers
    )
    assert response.status == 401
    job = await submit(client)
    assert_sequence(await events_of(client, job["job_id"]))
    assert not sim.webhook_deliveries


# -- sandbox mode: webhooks to our own loopback address ----------------------------------------------------------


async def test_sandbox_mode_uses_webhooks_to_its_own_address(make_client: Any) -> None:
    client = await make_client(MV_SANDBOX="true", MV_SANDBOX_VIDEO_SECONDS="1")
    job = await submit(client)
    assert_sequence(await events_of(client, job["job_id"]))
    assert client.app[JOBS].pushed.base_url == f"http://127.0.0.1:{client.port}"
    assert len(client.app[WEBHOOK_RECEIVER].seen) >= 2  # start and completed at least


async def test_sandbox_webhooks_can_be_turned_off(make_client: Any) -> None:
    client = await make_client(MV_SANDBOX="true", MV_SANDBOX_VIDEO_SECONDS="1", MV_SANDBOX_WEBHOOKS="false")
    job = await submit(client)
    assert_sequence(await events_of(client, job["job_id"]))
    assert client.app[JOBS].pushed.base_url is None
    assert len(client.app[WEBHOOK_RECEIVER].seen) == 0


# -- parts -------------------------------------------------------------------------------------------------------


@pytest.mark.store_independent
def test_settings_reject_a_bad_base_url_or_secret(live_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="MV_PUBLIC_BASE_URL"):
        EnvSettings.from_env({"MV_PUBLIC_BASE_URL": "example.com"})
    with pytest.raises(ConfigError, match="MV_REPLICATE_WEBHOOK_SECRET"):
        create_app({**live_env, "MV_REPLICATE_WEBHOOK_SECRET": "secret"})
    assert (
        EnvSettings.from_env({"MV_PUBLIC_BASE_URL": "https://mv.example.com/"}).public_base_url
        == "https://mv.example.com"
    )


def test_seen_ids_are_bounded_in_count_and_time() -> None:
    seen = SeenIds(max_size=3, ttl=0.05)
    assert [seen.add(key) for key in "abca"] == [True, True, True, False]
    seen.add("d")
    assert len(seen) == 3 and seen.add("a")  # "a" was the oldest and went first
    time.sleep(0.06)
    seen.add("e")
    assert len(seen) == 1


async def test_a_start_webhook_before_the_prediction_id_is_saved_is_applied_once_it_is() -> None:
    pushed = PushedUpdates(safety_poll_seconds=5)
    starting = Snapshot(status="starting")
    assert pushed.push("job", "pred1", starting)  # create has not returned: the job knows no prediction id yet
    assert await pushed.wait("job", "pred1", 5) is starting
    late = Snapshot(status="processing", logs="1%\n")
    newer = Snapshot(status="processing", logs="1%\n50%\n")
    done = Snapshot(status="succeeded")
    assert pushed.push("job", "pred1", newer)
    assert not pushed.push("job", "pred1", late)  # older than what is pending
    assert pushed.push("job", "pred1", done)
    assert await pushed.wait("job", "pred1", 5) is done
    assert not pushed.push("job", "pred1", newer)  # never backwards after the end
    assert pushed.push("other", "predX", newer)
    assert await pushed.wait("other", "pred2", 0.01) is None  # another prediction's update is not applied


def test_a_pushed_snapshot_reaches_the_owner_whole() -> None:
    """A webhook's snapshot travels to the job's owner as JSON (``to_dict``, written field by field): every field
    of :class:`Snapshot` makes the trip."""
    sent = Snapshot(
        status="failed",
        progress=0.5,
        logs="12%|#",
        output="https://replicate.delivery/x.mp4",
        error=ErrorInfo("provider_prediction_failed", "out of credit", provider="replicate"),
        metrics={"predict_time": 4.2},
    )
    payload = sent.to_dict()
    assert set(payload) == {f.name for f in dataclasses.fields(Snapshot)}
    assert Snapshot.from_dict(json.loads(json.dumps(payload))) == sent
