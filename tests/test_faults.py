"""Provider faults injected through the simulator.

Each fault ends either in a retry that succeeds or in a failed job (or HTTP error) with a clear code, and leaves no
temporary file under the output directory and no job task running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import AppClient, artefact, has_artefact, leftovers, read_sse, requests_to, stored_names

from mvserver.appkeys import CONFIG, JOBS
from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores

PROMPT = "A lighthouse keeper plays a theremin on the gallery while the storm rolls in."
HTTP_TIMEOUT = 1.5  # jobs.request_timeout_seconds for the hang tests: above a simulated render on a busy machine


@pytest.fixture(autouse=True)
def quick(sim: Simulator, settings_dir: Path) -> None:
    """Predictions end fast and Replicate clips last one second: faults, not latency, decide how long a test takes."""
    sim.video_latency = 0.05
    sim.image_latency = 0.05
    path = settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["allowed"]["duration"] = [1, *videos["allowed"]["duration"]]
    path.write_text(yaml.safe_dump(videos, sort_keys=False))


@pytest.fixture
def outputs(live_env: dict[str, str]) -> Path:
    return Path(live_env["MV_OUTPUT_DIR"])


@pytest.fixture
def jobs_settings(settings_dir: Path) -> Callable[..., None]:
    """``jobs_settings(key=value, ...)`` rewrites ``jobs`` keys of the copied ``videos.yaml`` (before the app runs)."""

    def apply(**changes: Any) -> None:
        path = settings_dir / "videos.yaml"
        videos = yaml.safe_load(path.read_text())
        videos["jobs"].update(changes)
        path.write_text(yaml.safe_dump(videos, sort_keys=False))

    return apply


def images_settings(settings_dir: Path, **changes: Any) -> None:
    path = settings_dir / "images.yaml"
    images = yaml.safe_load(path.read_text())
    images.update(changes)
    path.write_text(yaml.safe_dump(images, sort_keys=False))


async def run_job(client: TestClient, **body: Any) -> tuple[str, list[dict[str, Any]]]:
    """Submit a video job and follow its event stream to the end (Veo on Vertex takes 4 to 8 s clips)."""
    duration = 4 if body.get("backend") == "gemini" else 1
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, "duration": duration, **body})
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    async with asyncio.timeout(20):
        async with client.get(f"/api/mv/jobs/{job_id}/events") as stream:
            events = [event async for event in read_sse(stream)]
    assert events and events[-1]["event"] in ("succeeded", "failed", "canceled")
    return job_id, events


async def settled(client: TestClient, outputs: Path) -> None:
    """The job tasks end soon after the final event, and no temporary file is left behind."""
    manager = client.app[JOBS]
    async with asyncio.timeout(3):
        while manager.tasks:
            await asyncio.sleep(0.01)
    assert manager.tasks == {}
    assert sorted(outputs.rglob("*.part")) == [] and await leftovers(client, "videos") == []


def records(sim: Simulator, kind: str) -> list[Path]:
    return sorted((sim.state_dir / kind).glob("*.json"))


async def succeeded(client: TestClient, outputs: Path, job_id: str, events: list[dict[str, Any]]) -> bytes:
    """Check a successful job: final event, complete MP4 on disk and served; returns the video."""
    final = events[-1]
    assert final["event"] == "succeeded", final["data"]["error"]
    video = await artefact(client, f"videos/{job_id}.mp4")
    assert video[4:8] == b"ftyp" and len(video) == final["data"]["video_bytes"]
    served = await client.get(f"/api/mv/get_video/{job_id}")
    assert served.status == 200 and await served.read() == video
    await settled(client, outputs)
    return video


async def failed(
    client: TestClient, outputs: Path, job_id: str, events: list[dict[str, Any]], code: str, provider: str
) -> dict[str, Any]:
    """Check a failed job: the error names the code and provider, no video exists, get_video says job_failed."""
    final = events[-1]
    assert final["event"] == "failed", final["data"]
    error = final["data"]["error"]
    assert error["code"] == code, error
    assert error["provider"] == provider and error["message"]
    assert not await has_artefact(client, f"videos/{job_id}.mp4")
    answer = await client.get(f"/api/mv/get_video/{job_id}")
    assert answer.status == 409 and (await answer.json())["error"]["code"] == "job_failed"
    await settled(client, outputs)
    return error


def gaps(events: list[dict[str, Any]]) -> list[float]:
    times = [e["data"]["event_time"] for e in events]
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def output_file(sim: Simulator, prediction_id: str) -> bytes:
    return (sim.state_dir / "files" / prediction_id / "output.mp4").read_bytes()


# -- Replicate: polling ------------------------------------------------------------------------------------------


async def test_connection_reset_mid_poll_is_retried(make_client: AppClient, sim: Simulator, outputs: Path) -> None:
    client = await make_client()
    sim.add_fault("replicate.get", "reset", times=2)
    job_id, events = await run_job(client)
    video = await succeeded(client, outputs, job_id, events)
    assert requests_to(sim, "replicate.create") == 1 and len(records(sim, "predictions")) == 1
    assert requests_to(sim, "replicate.get") >= 3
    assert video == output_file(sim, events[-1]["data"]["provider_prediction_id"])


async def test_invalid_json_from_one_poll_is_retried(make_client: AppClient, sim: Simulator, outputs: Path) -> None:
    client = await make_client()
    sim.add_fault("replicate.get", "invalid_json", times=1)
    job_id, events = await run_job(client)
    await succeeded(client, outputs, job_id, events)


async def test_polls_that_keep_answering_invalid_json_fail_the_job_cleanly(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(retry_attempts=2)
    client = await make_client()
    sim.add_fault("replicate.get", "invalid_json", times=100)
    job_id, events = await run_job(client)
    final = events[-1]
    assert final["event"] == "failed"
    error = final["data"]["error"]
    assert error["code"].startswith("provider_") and error["provider"] == "replicate"
    assert "JSON" in error["message"]
    assert "Traceback" not in str(error)
    await settled(client, outputs)


@pytest.mark.parametrize("status", [500, 503])
async def test_a_storm_shorter_than_the_retries_is_ridden_out(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None], status: int
) -> None:
    jobs_settings(retry_attempts=2)
    client = await make_client()
    sim.add_fault("replicate.get", status=status, times=2)
    job_id, events = await run_job(client)
    await succeeded(client, outputs, job_id, events)
    assert not sim.faults  # every injected error was answered and then retried


@pytest.mark.parametrize(
    "status",
    [
        500,
        503,
    ],
)
async def test_a_storm_longer_than_the_retries_fails_with_the_provider_status(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None], status: int
) -> None:
    jobs_settings(retry_attempts=2)
    client = await make_client()
    sim.add_fault("replicate.get", status=status, times=3)
    job_id, events = await run_job(client)
    error = await failed(client, outputs, job_id, events, "provider_unavailable", "replicate")
    assert error["provider_status"] == status
    assert requests_to(sim, "replicate.get") == 3  # the first attempt and exactly retry_attempts retries


async def test_429_on_a_poll_honours_retry_after(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(retry_max_delay_seconds=3.0)
    client = await make_client()
    sim.add_fault("replicate.get", status=429, retry_after=1, times=1)
    job_id, events = await run_job(client)
    await succeeded(client, outputs, job_id, events)
    longest = max(gaps(events))
    assert 0.9 <= longest < 2.5, gaps(events)  # the poll waited for Retry-After (1 s), not the 0.05 s backoff


# -- Replicate: creating the prediction ----------------------------------------------------------------------------


async def test_429_on_create_honours_retry_after_and_creates_one_prediction(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(retry_max_delay_seconds=3.0)
    client = await make_client()
    sim.add_fault("replicate.create", status=429, retry_after=1, times=1)
    job_id, events = await run_job(client)
    await succeeded(client, outputs, job_id, events)
    assert requests_to(sim, "replicate.create") == 2 and len(records(sim, "predictions")) == 1
    submitting = next(e for e in events if e["data"]["stage"] == "submitting")
    created = next(e for e in events if e["data"]["provider_prediction_id"])
    assert 0.9 <= created["data"]["event_time"] - submitting["data"]["event_time"] < 2.5


async def test_503_on_create_is_retried(make_client: AppClient, sim: Simulator, outputs: Path) -> None:
    client = await make_client()
    sim.add_fault("replicate.create", status=503, times=1)
    job_id, events = await run_job(client)
    await succeeded(client, outputs, job_id, events)
    assert requests_to(sim, "replicate.create") == 2 and len(records(sim, "predictions")) == 1


@pytest.mark.parametrize(
    ("kind", "code", "provider_status"),
    [
        ("status", "provider_unavailable", 500),  # the provider may have accepted it: never created twice
        ("reset", "provider_unreachable", None),
    ],
)
async def test_an_ambiguous_create_failure_is_not_retried(
    make_client: AppClient, sim: Simulator, outputs: Path, kind: str, code: str, provider_status: int | None
) -> None:
    client = await make_client()
    sim.add_fault("replicate.create", kind, status=500, times=1)
    job_id, events = await run_job(client)
    error = await failed(client, outputs, job_id, events, code, "replicate")
    assert error.get("provider_status") == provider_status
    assert requests_to(sim, "replicate.create") == 1 and records(sim, "predictions") == []


# -- Replicate: downloading the video ------------------------------------------------------------------------------


@pytest.mark.both_backends
@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_a_broken_download_is_retried_and_the_video_is_whole(
    make_client: AppClient, sim: Simulator, outputs: Path, kind: str
) -> None:
    client = await make_client()
    sim.add_fault("replicate.files.get", kind, times=2)
    job_id, events = await run_job(client)
    video = await succeeded(client, outputs, job_id, events)
    assert requests_to(sim, "replicate.files.get") == 3
    assert video == output_file(sim, events[-1]["data"]["provider_prediction_id"])


@pytest.mark.both_backends
@pytest.mark.parametrize("kind", ["reset", "truncate"])
async def test_a_download_that_keeps_breaking_fails_with_provider_unreachable(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None], kind: str
) -> None:
    jobs_settings(retry_attempts=2)
    client = await make_client()
    sim.add_fault("replicate.files.get", kind, times=100)
    job_id, events = await run_job(client)
    await failed(client, outputs, job_id, events, "provider_unreachable", "replicate")
    # three attempts; aiohttp itself repeats a GET once when a reused keep-alive connection is reset
    assert 3 <= requests_to(sim, "replicate.files.get") <= (6 if kind == "reset" else 3)


# -- hangs past the per-request timeout ----------------------------------------------------------------------------


async def test_a_poll_that_hangs_once_times_out_and_is_retried(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(request_timeout_seconds=HTTP_TIMEOUT)
    client = await make_client()
    sim.add_fault("replicate.get", "hang", times=1)
    started = time.monotonic()
    job_id, events = await run_job(client)
    await succeeded(client, outputs, job_id, events)
    assert time.monotonic() - started >= HTTP_TIMEOUT
    assert max(gaps(events)) >= HTTP_TIMEOUT * 0.9


async def test_a_poll_that_hangs_forever_fails_with_provider_timeout(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(request_timeout_seconds=HTTP_TIMEOUT, retry_attempts=1)
    client = await make_client()
    sim.add_fault("replicate.get", "hang", times=100)
    started = time.monotonic()
    job_id, events = await run_job(client)
    assert time.monotonic() - started < 2 * HTTP_TIMEOUT + 3  # two bounded attempts, far within the job timeout
    await failed(client, outputs, job_id, events, "provider_timeout", "replicate")


@pytest.mark.both_backends
async def test_a_download_that_hangs_forever_fails_with_provider_timeout(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(request_timeout_seconds=HTTP_TIMEOUT, retry_attempts=1)
    client = await make_client()
    assert client.app[CONFIG].videos.jobs.timeout_seconds > 60
    sim.add_fault("replicate.files.get", "hang", times=100)
    started = time.monotonic()
    job_id, events = await run_job(client)
    assert time.monotonic() - started < 2 * HTTP_TIMEOUT + 3
    await failed(client, outputs, job_id, events, "provider_timeout", "replicate")
    assert requests_to(sim, "replicate.files.get") == 2


# -- Veo on Vertex (backend "gemini") --------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_vertex_fetch_storm_within_the_retries_succeeds(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(retry_attempts=2)
    client = await make_client()
    sim.add_fault("vertex.fetch", status=500, times=2)
    job_id, events = await run_job(client, backend="gemini")
    await succeeded(client, outputs, job_id, events)


async def test_vertex_fetch_storm_beyond_the_retries_fails_with_provider_unavailable(
    make_client: AppClient, sim: Simulator, outputs: Path, jobs_settings: Callable[..., None]
) -> None:
    jobs_settings(retry_attempts=2)
    client = await make_client()
    sim.add_fault("vertex.fetch", status=500, times=100)
    job_id, events = await run_job(client, backend="gemini")
    error = await failed(client, outputs, job_id, events, "provider_unavailable", "gemini")
    assert error["provider_status"] == 500
    assert requests_to(sim, "vertex.fetch") == 3


async def test_vertex_predict_429_is_retried_and_creates_one_operation(
    make_client: AppClient, sim: Simulator, outputs: Path
) -> None:
    client = await make_client()
    sim.add_fault("vertex.predict", status=429, times=2)
    job_id, events = await run_job(client, backend="gemini")
    await succeeded(client, outputs, job_id, events)
    assert requests_to(sim, "vertex.predict") == 3 and len(records(sim, "operations")) == 1


async def test_a_failed_vertex_operation_keeps_googles_code_and_words(
    make_client: AppClient, sim: Simulator, outputs: Path
) -> None:
    client = await make_client()
    sim.add_fault("vertex.predict", "fail_prediction", error={"code": 8, "message": "Quota exceeded"})
    job_id, events = await run_job(client, backend="gemini")
    error = await failed(client, outputs, job_id, events, "provider_prediction_failed", "gemini")
    assert error["provider_status"] == 8
    assert "Quota exceeded" in error["message"]
    assert error["provider_error"]["code"] == 8 and error["provider_error"]["message"] == "Quota exceeded"


# -- the image endpoint ------------------------------------------------------------------------------------------------


@pytest.mark.both_backends
@pytest.mark.parametrize(
    ("route", "kind", "status", "code", "provider_status"),
    [
        ("replicate.create", "reset", None, "provider_unreachable", None),
        ("replicate.create", "status", 503, "provider_unavailable", 503),
        ("replicate.files.get", "truncate", None, "provider_unreachable", None),
    ],
)
async def test_image_provider_faults_answer_502_and_write_nothing(
    make_client: AppClient,
    sim: Simulator,
    outputs: Path,
    settings_dir: Path,
    route: str,
    kind: str,
    status: int | None,
    code: str,
    provider_status: int | None,
) -> None:
    images_settings(settings_dir, poll_interval_seconds=0.02)
    client = await make_client()
    sim.add_fault(route, kind, **({"status": status} if status else {}), times=1)
    response = await client.post(
        "/api/mv/generate_character_reference",
        json={"character_description": "a lighthouse keeper in a yellow oilskin"},
    )
    assert response.status == 502, await response.text()
    text = await response.text()
    assert "Traceback" not in text and 'File "' not in text
    error = (await response.json())["error"]
    assert error["code"] == code and error["provider"] == "replicate"
    assert error.get("provider_status") == provider_status
    assert await stored_names(client, "images") == []
    assert sorted(outputs.rglob("*.part")) == []
    retry = await client.post(
        "/api/mv/generate_character_reference",
        json={"character_description": "a lighthouse keeper in a yellow oilskin"},
    )
    assert retry.status == 200  # the fault was one-off: the next request works
