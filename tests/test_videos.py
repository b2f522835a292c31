"""Video jobs through the real replicate and google-genai clients against the simulator: SSE, files, failures, restart.

Every test runs on both job stores (files and Redis)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from helpers import (
    PROMPT,
    LiveApp,
    events_of,
    module_loop,
    png_base64,
    probe_media,
    read_sse,
    statuses,
    submit,
    wait_for,
)
from PIL import Image

from mvserver.appkeys import ARTEFACTS, JOBS, STORE
from mvserver.core.artefacts import artefact_key
from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores


@pytest.mark.both_backends
async def test_a_video_an_earlier_run_stored_is_never_overwritten(client: TestClient, sim: Simulator) -> None:
    """A job taken over after an earlier run stored its video (and died before saying so) downloads again: the
    create-only write keeps the stored video, and the job succeeds with it."""
    sim.video_latency = 1.0
    job_id = (await submit(client))["job_id"]
    stored = b"\x00\x00\x00\x18ftypmp42 stored by the earlier run"
    await client.app[ARTEFACTS].put_bytes(artefact_key("videos", job_id, ".mp4"), stored)
    state = await wait_for(client, job_id, lambda s: s["status"] not in ("queued", "running"), timeout=60)
    assert state["status"] == "succeeded" and state["video_bytes"] == len(stored), state
    assert await (await client.get(f"/api/mv/get_video/{job_id}")).read() == stored


@pytest.mark.both_backends
async def test_sse_reports_every_stage_and_the_video_is_served_with_ranges(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 1.0  # long enough for progress events between the start and the end
    accepted = await submit(client, reference_image_base64=png_base64(), duration=8)
    assert accepted["status"] == "queued"
    events = await events_of(client, accepted["job_id"])

    names = statuses(events)
    assert names[0] == "queued" and names[1] == "running" and names[-1] == "succeeded"
    assert "progress" in names
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    fractions = [e["data"]["progress"] for e in events if e["data"]["progress"] is not None]
    assert fractions and fractions == sorted(fractions) and 0 < fractions[0] < 1 and fractions[-1] == 1.0
    final = events[-1]["data"]
    assert final["video_url"] == f"/api/mv/get_video/{accepted['job_id']}"
    assert final["provider_prediction_id"] and final["error"] is None
    assert ("replicate.files.create", "/replicate/v1/files") in sim.requests  # reference image uploaded

    video = await client.get(final["video_url"])
    assert video.status == 200 and video.headers["Content-Type"] == "video/mp4"
    body = await video.read()
    assert body[4:8] == b"ftyp" and len(body) == final["video_bytes"]
    ranged = await client.get(final["video_url"], headers={"Range": "bytes=0-99"})
    assert ranged.status == 206
    assert ranged.headers["Content-Range"] == f"bytes 0-99/{len(body)}"
    assert await ranged.read() == body[:100]


async def test_job_status_json_matches_the_final_event(client: TestClient) -> None:
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    state = await (await client.get(accepted["status_url"])).json()
    assert state["status"] == "succeeded" == events[-1]["event"]
    assert state["request"]["full_prompt"].startswith(PROMPT)
    assert "16:9" in state["request"]["full_prompt"]  # the rules template interpolates the aspect ratio
    assert set(state["request"]["defaults_applied"]) >= {"aspect_ratio", "generate_audio", "backend"}


async def test_a_failed_prediction_reaches_sse_and_json_with_the_provider_error(
    client: TestClient, sim: Simulator
) -> None:
    sim.add_fault("replicate.create", "fail_prediction", error="E005: the input was flagged as sensitive")
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "failed"
    error = events[-1]["data"]["error"]
    assert error["code"] == "provider_prediction_failed"
    assert error["provider"] == "replicate" and error["provider_status"] == "failed"
    assert error["provider_error"] == "E005: the input was flagged as sensitive"
    state = await (await client.get(accepted["status_url"])).json()
    assert state["status"] == "failed" and state["error"] == error
    not_ready = await client.get(f"/api/mv/get_video/{accepted['job_id']}")
    assert not_ready.status == 409 and (await not_ready.json())["error"]["code"] == "job_failed"


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "provider_auth_failed"), (422, "provider_rejected_input"), (402, "provider_payment_required")],
)
async def test_a_rejected_create_fails_the_job_with_the_provider_status(
    client: TestClient, sim: Simulator, status: int, code: str
) -> None:
    detail = {"title": "Input validation failed", "detail": "- input.prompt: too long", "status": status}
    sim.add_fault("replicate.create", status=status, body=detail)
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    error = events[-1]["data"]["error"]
    assert events[-1]["event"] == "failed"
    assert error["code"] == code and error["provider_status"] == status
    assert "too long" in json.dumps(error["provider_error"])


async def test_transient_errors_while_polling_are_retried(client: TestClient, sim: Simulator) -> None:
    sim.add_fault("replicate.get", status=503, times=2)
    sim.add_fault("replicate.get", status=429, retry_after=0, times=1)
    sim.add_fault("replicate.get", "reset", times=1)
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "succeeded"


async def test_persistent_outage_fails_the_job_after_the_retries(client: TestClient, sim: Simulator) -> None:
    sim.add_fault("replicate.get", status=500, times=100)
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    error = events[-1]["data"]["error"]
    assert events[-1]["event"] == "failed"
    assert error["code"] == "provider_unavailable" and error["provider_status"] == 500


async def test_cancel_stops_the_provider_prediction(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    accepted = await submit(client)
    running = await wait_for(client, accepted["job_id"], lambda s: s["provider_prediction_id"])
    response = await client.delete(accepted["status_url"])
    assert response.status == 200
    state = await response.json()
    assert state["status"] == "canceled" and state["error"]["code"] == "job_canceled"
    prediction_id = running["provider_prediction_id"]
    assert ("replicate.cancel", f"/replicate/v1/predictions/{prediction_id}/cancel") in sim.requests
    assert sim.load("predictions", prediction_id)["status"] == "canceled"
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "canceled"
    again = await client.post(f"/api/mv/jobs/{accepted['job_id']}/cancel")
    assert (await again.json())["status"] == "canceled"


async def test_last_event_id_resumes_exactly(client: TestClient) -> None:
    accepted = await submit(client)
    full = await events_of(client, accepted["job_id"])
    assert len(full) >= 4
    middle = full[len(full) // 2]
    resumed = await events_of(client, accepted["job_id"], last_event_id=middle["id"])
    assert [e["id"] for e in resumed] == [e["id"] for e in full if int(e["id"]) > int(middle["id"])]
    assert resumed[-1]["event"] == "succeeded"


async def test_a_subscriber_that_reconnects_mid_job_misses_nothing(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 1.5
    accepted = await submit(client)
    seen: list[dict[str, Any]] = []
    async with client.get(accepted["events_url"]) as response:
        async for event in read_sse(response):
            seen.append(event)
            if event["event"] == "progress" and event["data"]["progress"]:
                break  # drop the connection mid-job
    rest = await events_of(client, accepted["job_id"], last_event_id=seen[-1]["id"])
    ids = [int(e["id"]) for e in seen + rest]
    assert ids == list(range(1, len(ids) + 1))
    assert rest[-1]["event"] == "succeeded"


async def test_many_subscribers_all_see_the_same_events_and_leave_no_waiters(client: TestClient) -> None:
    accepted = await submit(client)
    results = await asyncio.gather(*(events_of(client, accepted["job_id"]) for _ in range(20)))
    assert all(statuses(r) == statuses(results[0]) for r in results)
    assert accepted["job_id"] not in client.app[JOBS].store._wakers


def waiting_subscribers(app: web.Application, job_id: str) -> int:
    """How many SSE subscribers wait for the job's next event.

    The one place that reads the job engine's internals (the file store's ``_wakers``: one future per job that
    every waiting subscriber awaits), so that it is the only line to change if the store changes.
    """
    waker = app[JOBS].store._wakers.get(job_id)
    return 0 if waker is None or waker.done() else len(waker._callbacks or ())


def handler_tasks() -> list[asyncio.Task[Any]]:
    """The tasks in which aiohttp runs request handlers (one per request in flight)."""
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "RequestHandler._handle_request"]


async def test_a_disconnected_subscriber_is_released(
    sim: Simulator, live_env: dict[str, str], settings_dir: Path
) -> None:
    """Served as ``python -m mvserver`` serves it: aiohttp does not cancel a handler when its client leaves, so the
    stream itself has to notice, on a job that sends no event that could reveal the closed connection."""
    import aiohttp
    import yaml

    from mvserver.app import create_app

    videos = yaml.safe_load((settings_dir / "videos.yaml").read_text())
    videos["jobs"].update(poll_interval_seconds=60, sse_ping_interval_seconds=0.2)  # one poll, then silence
    (settings_dir / "videos.yaml").write_text(yaml.safe_dump(videos))
    sim.video_latency = 120
    app = create_app(live_env)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/api/mv/generate_video", json={"prompt": PROMPT, "duration": 4}) as created:
                accepted = await created.json()
            job_id = accepted["job_id"]
            async with asyncio.timeout(10):  # the one poll is done: no further event until the job ends
                while not any(route == "replicate.get" for route, _ in sim.requests):
                    await asyncio.sleep(0.02)
            async with session.get(f"{base}{accepted['events_url']}") as response:
                assert (await anext(read_sse(response)))["event"] == "queued"
                async with asyncio.timeout(5):  # the history is sent and the handler waits for the next event
                    while waiting_subscribers(app, job_id) != 1:
                        await asyncio.sleep(0.02)
                assert len(handler_tasks()) == 1
            # The client has gone (the connection is closed when the response context exits).
            async with asyncio.timeout(5):  # noticed at the next ping (0.2 s)
                while handler_tasks() or waiting_subscribers(app, job_id):
                    await asyncio.sleep(0.05)
            async with session.get(f"{base}{accepted['status_url']}") as state:
                assert (await state.json())["status"] == "running"  # the job itself goes on
            async with session.delete(f"{base}{accepted['status_url']}") as canceled:
                assert (await canceled.json())["status"] == "canceled"
    finally:
        await runner.cleanup()


@pytest.mark.both_backends
async def test_gemini_backend_runs_a_job_through_vertex(client: TestClient, sim: Simulator) -> None:
    accepted = await submit(client, backend="gemini", reference_image_base64=png_base64("teal"))
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "succeeded", events[-1]
    assert any(route == "vertex.predict" for route, _ in sim.requests)
    assert any(route == "vertex.fetch" for route, _ in sim.requests)
    body = await (await client.get(events[-1]["data"]["video_url"])).read()
    assert body[4:8] == b"ftyp"


@pytest.mark.both_backends
async def test_a_finished_video_and_its_record_survive_a_restart(make_client: Any, live_env: dict[str, str]) -> None:
    first = await make_client()
    accepted = await submit(first)
    events = await events_of(first, accepted["job_id"])
    video = await (await first.get(events[-1]["data"]["video_url"])).read()
    await first.close()

    second = await make_client()
    state = await (await second.get(accepted["status_url"])).json()
    assert state["status"] == "succeeded"
    assert await (await second.get(state["video_url"])).read() == video
    replay = await events_of(second, accepted["job_id"])
    assert statuses(replay) == statuses(events)


async def test_a_running_job_resumes_polling_after_a_restart(make_client: Any, sim: Simulator) -> None:
    sim.video_latency = 1.5
    first = await make_client()
    accepted = await submit(first)
    running = await wait_for(
        first, accepted["job_id"], lambda s: s["provider_prediction_id"] and s["stage"] == "generating"
    )
    creates = sum(1 for route, _ in sim.requests if route == "replicate.create")
    seen_before = [(e.id, e.event) for e in await first.app[JOBS].events(accepted["job_id"], 0)]
    await first.close()  # shutdown mid-job: the record stays "running"

    second = await make_client()
    events = await events_of(second, accepted["job_id"])
    assert events[-1]["event"] == "succeeded"
    replayed = [(int(e["id"]), e["event"]) for e in events]
    assert replayed[: len(seen_before)] == seen_before  # every event delivered before the restart is kept
    assert [i for i, _ in replayed] == list(range(1, len(replayed) + 1))  # ids continue without reuse or gaps
    assert events[-1]["data"]["provider_prediction_id"] == running["provider_prediction_id"]
    assert sum(1 for route, _ in sim.requests if route == "replicate.create") == creates  # no second prediction
    assert (await (await second.get(events[-1]["data"]["video_url"])).read())[4:8] == b"ftyp"


async def test_get_video_answers_not_ready_unknown_and_malformed(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 30
    accepted = await submit(client)
    not_ready = await client.get(f"/api/mv/get_video/{accepted['job_id']}")
    assert not_ready.status == 409 and (await not_ready.json())["error"]["code"] == "video_not_ready"
    unknown = await client.get("/api/mv/get_video/0b4e7c1e-3f5a-4c39-9d2a-5f0e7b8c9d10")
    assert unknown.status == 404
    for bad in (
        "..%2F..%2Fetc%2Fpasswd",
        "not-a-uuid",
        "0B4E7C1E-3F5A-4C39-9D2A-5F0E7B8C9D10",
        "0b4e7c1e-3f5a-1c39-9d2a-5f0e7b8c9d10",
        "a" * 300,
    ):
        response = await client.get(f"/api/mv/get_video/{bad}")
        assert response.status in (400, 404)
        assert "error" in await response.json()
    await client.delete(accepted["status_url"])


@pytest.mark.store_independent
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"backend": "sora"}, "backend"),
        ({"duration": 5}, "duration"),
        ({"duration": "8"}, "duration"),
        ({"aspect_ratio": "4:3"}, "aspect_ratio"),
        ({"generate_audio": "yes"}, "generate_audio"),
        ({"seed": -1}, "seed"),
        ({"prompt": "   "}, "prompt"),
        ({"reference_image_base64": "not base64!"}, "reference_image_base64"),
        ({"reference_image_base64": base64.b64encode(b"plain text, not an image").decode()}, "reference_image_base64"),
        ({"reference_image_id": "../../etc/passwd"}, "reference_image_id"),
        ({"video_rules_template": "{{ missing_variable }}"}, "video_rules_template"),
        ({"video_rules_template": "{{ prompt.__class__.__mro__ }}"}, "video_rules_template"),
        ({"video_rules_template": "{{ prompt "}, "video_rules_template"),  # does not parse
        ({"video_rules_template": "{% if prompt %}x{% endif %}"}, "video_rules_template"),  # a statement
        ({"colour": "red"}, "colour"),
        ({"aspect_ratio": "1:1"}, "aspect_ratio"),
        ({"reference_image_base64": png_base64(), "duration": 4}, "duration"),
        ({"reference_image_base64": png_base64(), "duration": 8, "aspect_ratio": "9:16"}, "aspect_ratio"),
    ],
)
@module_loop
async def test_bad_video_requests_name_the_field(module_live: LiveApp, body: dict[str, Any], field: str) -> None:
    client = module_live[0]  # one app for the module's refusals: none of them may create a job
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, **body})
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["field"] == field
    assert error["code"] == ("unknown_field" if field == "colour" else "invalid_field")
    assert error["message"].startswith(field)
    assert not list((Path(client.app[STORE].root) / "jobs").glob("*.json"))


@pytest.mark.store_independent
async def test_a_rules_template_error_lists_the_variables_it_may_use(client: TestClient) -> None:
    response = await client.post(
        "/api/mv/generate_video", json={"prompt": PROMPT, "video_rules_template": "{{ prompt|upper }}"}
    )
    assert (await response.json())["error"][
        "message"
    ] == "video_rules_template: only {{ prompt }}, {{ aspect_ratio }}, {{ duration }} may be used"


async def test_a_reference_image_may_be_a_base64_data_uri(client: TestClient, sim: Simulator) -> None:
    accepted = await submit(client, reference_image_base64=f"data:image/png;base64,{png_base64()}", duration=8)
    state = await (await client.get(accepted["status_url"])).json()
    assert state["request"]["has_reference_image"] is True
    await client.delete(accepted["status_url"])
    plain = await client.post(
        "/api/mv/generate_video",
        json={"prompt": PROMPT, "duration": 8, "reference_image_base64": f"data:image/png,{png_base64()}"},
    )
    error = (await plain.json())["error"]
    assert plain.status == 400 and error["field"] == "reference_image_base64" and "base64-encoded" in error["message"]


@pytest.mark.store_independent
async def test_unknown_backend_lists_the_available_ones(client: TestClient) -> None:
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, "backend": "sora"})
    message = (await response.json())["error"]["message"]
    assert "replicate" in message and "gemini" in message


async def test_custom_rules_template_and_debug_output(make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(MV_DEBUG_MODE="true")
    with caplog.at_level("INFO", logger="mvserver.debug"):
        accepted = await submit(client, aspect_ratio="9:16", video_rules_template="Vertical {{ aspect_ratio }} only.")
    state = await (await client.get(accepted["status_url"])).json()
    assert state["request"]["full_prompt"] == f"{PROMPT}\n\nVertical 9:16 only."
    logged = caplog.text
    assert "request arguments received" in logged and "defaults applied" in logged
    assert f"{PROMPT}\n\nVertical 9:16 only." in logged
    await client.delete(accepted["status_url"])


async def test_debug_output_shortens_an_inline_image(make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(MV_DEBUG_MODE="true")
    noise = Image.effect_noise((200, 200), 64).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    assert len(image) > 2000
    with caplog.at_level("INFO", logger="mvserver.debug"):
        accepted = await submit(client, reference_image_base64=image, duration=8)
    assert image not in caplog.text
    assert f"{image[:80]}... ({len(image)} characters)" in caplog.text
    await client.delete(accepted["status_url"])


async def test_jobs_beyond_the_concurrency_limit_queue_in_order(make_client: Any, sim: Simulator) -> None:
    sim.video_latency = 0.4
    client = await make_client(MV_MAX_CONCURRENT_JOBS=1)
    jobs = [await submit(client) for _ in range(3)]
    second = await (await client.get(jobs[1]["status_url"])).json()
    assert second["status"] == "queued"
    finals = [await wait_for(client, j["job_id"], lambda s: s["status"] == "succeeded") for j in jobs]
    starts = [f["started_at"] for f in finals]
    assert starts == sorted(starts)
    assert finals[1]["started_at"] >= finals[0]["finished_at"] - 0.01


async def test_a_job_past_its_timeout_fails_and_cancels_the_prediction(
    make_client: Any, sim: Simulator, settings_dir: Path
) -> None:
    import yaml

    videos = yaml.safe_load((settings_dir / "videos.yaml").read_text())
    videos["jobs"]["timeout_seconds"] = 0.5
    (settings_dir / "videos.yaml").write_text(yaml.safe_dump(videos))
    sim.video_latency = 30
    client = await make_client()
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "failed"
    assert events[-1]["data"]["error"]["code"] == "job_timeout"
    assert any(route == "replicate.cancel" for route, _ in sim.requests)


@pytest.mark.both_backends
async def test_sandbox_mode_renders_a_labelled_h264_clip_of_the_requested_shape(
    make_client: Any, tmp_path: Path
) -> None:
    client = await make_client(
        GEMINI_API_KEY=None,
        REPLICATE_API_TOKEN=None,
        GOOGLE_VERTEX_API_KEY=None,
        MV_REPLICATE_BASE_URL=None,
        MV_VERTEX_BASE_URL=None,
        MV_GEMINI_BASE_URL=None,
        MV_SANDBOX_VIDEO_SECONDS=0.5,
    )
    health = await (await client.get("/api/mv/health")).json()
    assert health["mode"] == "sandbox"
    for backend in ("replicate", "gemini"):
        accepted = await submit(client, backend=backend, aspect_ratio="9:16", duration=6, generate_audio=False)
        assert accepted["sandbox"] is True
        events = await events_of(client, accepted["job_id"])
        assert events[-1]["event"] == "succeeded" and events[-1]["data"]["sandbox"] is True
        clip = tmp_path / f"{backend}.mp4"
        clip.write_bytes(await (await client.get(events[-1]["data"]["video_url"])).read())
        media = probe_media(clip)
        assert media["video_codec"] == "h264" and media["pix_fmt"] == "yuv420p"
        assert (media["width"], media["height"]) == (360, 640)
        assert abs(media["duration"] - 6) < 0.1
        assert media["audio_codec"] is None


@pytest.mark.file_store_only
async def test_a_torn_last_event_line_is_cut_off_before_the_job_resumes(
    make_client: Any, sim: Simulator, live_env: dict[str, str]
) -> None:
    sim.video_latency = 1.0
    first = await make_client()
    accepted = await submit(first)
    await wait_for(first, accepted["job_id"], lambda s: s["provider_prediction_id"] and s["stage"] == "generating")
    good = [(e.id, e.event) for e in await first.app[JOBS].events(accepted["job_id"], 0)]
    await first.close()
    log = Path(live_env["MV_OUTPUT_DIR"]) / "jobs" / f"{accepted['job_id']}.events.jsonl"
    with log.open("a") as handle:
        handle.write('{"id": 99, "event": "prog')  # a write cut short by a crash

    second = await make_client()
    events = await events_of(second, accepted["job_id"])
    assert [(int(e["id"]), e["event"]) for e in events][: len(good)] == good
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "succeeded"
    lines = log.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(1, len(lines) + 1))
