"""The simulated Replicate API, driven through the official ``replicate`` client (and raw HTTP where the client hides it)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import replicate
from aiohttp.test_utils import TestServer
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError
from replicate.prediction import Prediction
from yarl import URL

from mvserver.core.artefacts import LocalArtefacts, OutputStore
from mvserver.core.errors import ApiError
from mvserver.providers.base import VideoRequest
from mvserver.providers.outputs import OutputHosts, url_origin
from mvserver.providers.replicate import ReplicateProvider, make_client
from mvserver.sandbox import replicate_api
from mvserver.sandbox.app import Simulator, create_simulator_app

IMAGE_PROMPT = "Full-body character reference of a lanky lighthouse keeper in a yellow raincoat"
VIDEO_PROMPT = "The lighthouse keeper waves from the gallery as the beam sweeps over a stormy sea"
ClientFactory = Callable[[TestServer], replicate.Client]


def png_bytes(colour: str = "teal", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def base_url(server: TestServer) -> str:
    return f"{str(server.make_url('')).rstrip('/')}/replicate"


@pytest.fixture
async def make_replicate() -> AsyncIterator[ClientFactory]:
    """``make_replicate(server)``: an official client pointed at a simulator; transports are closed afterwards."""
    transports: list[httpx.AsyncHTTPTransport] = []

    def build(server: TestServer) -> replicate.Client:
        transports.append(httpx.AsyncHTTPTransport())
        client = replicate.Client(api_token="r8_test", base_url=base_url(server), transport=transports[-1])
        client.poll_interval = 0.05
        return client

    yield build
    for transport in transports:
        await transport.aclose()


@pytest.fixture
def rc(make_replicate: ClientFactory, sim_server: TestServer) -> replicate.Client:
    return make_replicate(sim_server)


async def download(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def finish(rc: replicate.Client, prediction: Prediction, timeout: float = 10.0) -> Prediction:
    async with asyncio.timeout(timeout):
        await prediction.async_wait()
    return prediction


async def create_image(rc: replicate.Client, **inputs: Any) -> Prediction:
    return await rc.models.predictions.async_create(model="google/imagen-4", input={"prompt": IMAGE_PROMPT, **inputs})


# -- lifecycle ---------------------------------------------------------------------------------------------------


async def test_prediction_goes_starting_processing_succeeded_with_parsed_progress(
    rc: replicate.Client, sim: Simulator, sim_server: TestServer
) -> None:
    sim.image_latency = 0.8
    prediction = await create_image(rc, output_format="png", aspect_ratio="16:9")
    assert prediction.status == "starting" and prediction.logs == "" and prediction.progress is None
    assert prediction.model == "google/imagen-4" and prediction.version and prediction.output is None
    assert prediction.urls["get"] == f"{base_url(sim_server)}/v1/predictions/{prediction.id}"
    assert prediction.input == {"prompt": IMAGE_PROMPT, "output_format": "png", "aspect_ratio": "16:9"}
    statuses, fractions = [prediction.status], []
    async with asyncio.timeout(5):
        while prediction.status not in ("succeeded", "failed", "canceled"):
            await asyncio.sleep(0.04)
            await prediction.async_reload()
            if prediction.status != statuses[-1]:
                statuses.append(prediction.status)
            if prediction.status == "processing":
                assert prediction.progress is not None and prediction.progress.total == 100
                fractions.append(prediction.progress.percentage)
    assert statuses == ["starting", "processing", "succeeded"]
    assert fractions == sorted(fractions) and 0 < fractions[0] < 1
    assert prediction.progress.percentage == 1.0 and prediction.error is None
    assert prediction.completed_at and prediction.started_at and prediction.metrics["predict_time"] > 0

    assert isinstance(prediction.output, str) and prediction.output.startswith(f"{base_url(sim_server)}/files/")
    status, headers, body = await download(prediction.output)
    assert status == 200 and headers["Content-Type"] == "image/png"
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "PNG" and image.width > image.height  # 16:9
    status, headers, part = await download(prediction.output, Range="bytes=0-9")
    assert status == 206 and part == body[:10] and headers["Content-Range"] == f"bytes 0-9/{len(body)}"


@pytest.mark.parametrize(("fmt", "pillow"), [("jpg", "JPEG"), ("webp", "WEBP")])
async def test_image_output_format_is_honoured(rc: replicate.Client, fmt: str, pillow: str) -> None:
    prediction = await finish(rc, await create_image(rc, output_format=fmt, seed=5))
    assert prediction.status == "succeeded" and prediction.output.endswith(f".{fmt}")
    _, _, body = await download(prediction.output)
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == pillow


async def test_prefer_wait_holds_the_create_until_the_output_exists(rc: replicate.Client, sim: Simulator) -> None:
    sim.image_latency = 0.3
    output = await rc.async_run("google/imagen-4", input={"prompt": IMAGE_PROMPT}, wait=5)
    assert isinstance(output, str) and output.endswith(".jpg")  # imagen-4 defaults to jpg
    assert [route for route, _ in sim.requests] == ["replicate.create"]  # no polling was needed


async def test_output_is_rendered_once_for_concurrent_polls(
    rc: replicate.Client, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = replicate_api.render_character_image

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(replicate_api, "render_character_image", counting)
    sim.image_latency = 0.1
    prediction = await create_image(rc)
    await asyncio.sleep(0.15)
    polled = await asyncio.gather(*(rc.predictions.async_get(prediction.id) for _ in range(8)))
    assert {p.status for p in polled} == {"succeeded"} and len({p.output for p in polled}) == 1
    assert len(calls) == 1


# -- videos and files --------------------------------------------------------------------------------------------


async def test_veo_renders_an_mp4_from_a_reference_uploaded_through_the_files_api(
    rc: replicate.Client, sim: Simulator, sim_server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = replicate_api.render_video

    async def spying(dest: Path, **kwargs: Any) -> None:
        seen.append(kwargs)
        await real(dest, **kwargs)

    monkeypatch.setattr(replicate_api, "render_video", spying)
    sim.video_latency = 0.3
    reference = io.BytesIO(png_bytes())
    reference.name = "reference.png"
    prediction = await rc.models.predictions.async_create(
        model="google/veo-3.1",
        input={
            "prompt": VIDEO_PROMPT,
            "duration": 2,
            "aspect_ratio": "9:16",
            "generate_audio": False,
            "reference_images": [reference],
        },
    )
    assert ("replicate.files.create", "/replicate/v1/files") in sim.requests
    uploaded = prediction.input["reference_images"][0]
    assert uploaded.startswith(f"{base_url(sim_server)}/files/") and uploaded.endswith("/reference.png")

    prediction = await finish(rc, prediction)
    assert prediction.status == "succeeded" and prediction.output.endswith(".mp4")
    status, headers, body = await download(prediction.output)
    assert status == 200 and headers["Content-Type"] == "video/mp4" and body[4:8] == b"ftyp"
    assert seen == [
        {
            "prompt": VIDEO_PROMPT,
            "duration": 2,
            "aspect_ratio": "9:16",
            "reference_image": png_bytes(),
            "generate_audio": False,
            "seed": None,
        }
    ]


async def test_veo_reads_a_data_uri_reference(
    rc: replicate.Client, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytes | None] = []

    async def fake_render(dest: Path, **kwargs: Any) -> None:
        seen.append(kwargs["reference_image"])
        dest.write_bytes(b"\x00\x00\x00\x18ftypmp42")

    monkeypatch.setattr(replicate_api, "render_video", fake_render)
    sim.video_latency = 0.1
    reference = io.BytesIO(png_bytes("red"))
    reference.name = "red.png"
    prediction = await rc.models.predictions.async_create(
        model="google/veo-3.1",
        input={"prompt": VIDEO_PROMPT, "reference_images": [reference]},
        file_encoding_strategy="base64",
    )
    assert prediction.input["reference_images"][0].startswith("data:image/png;base64,")
    assert not any(route == "replicate.files.create" for route, _ in sim.requests)
    assert (await finish(rc, prediction)).status == "succeeded"
    assert seen == [png_bytes("red")]


async def test_an_unreadable_reference_fails_the_prediction(rc: replicate.Client, sim: Simulator) -> None:
    sim.video_latency = 0.1
    prediction = await rc.models.predictions.async_create(
        model="google/veo-3.1", input={"prompt": VIDEO_PROMPT, "reference_images": ["https://example.invalid/a.png"]}
    )
    prediction = await finish(rc, prediction)
    assert prediction.status == "failed" and "could not download" in prediction.error


async def test_files_api_stores_and_serves_an_upload(rc: replicate.Client) -> None:
    data = png_bytes("navy")
    upload = io.BytesIO(data)
    upload.name = "navy.png"
    created = await rc.files.async_create(upload, metadata={"purpose": "test"})
    assert created.name == "navy.png" and created.content_type == "image/png" and created.size == len(data)
    assert created.checksums["sha256"] == hashlib.sha256(data).hexdigest() and created.metadata == {"purpose": "test"}
    assert created.expires_at > created.created_at
    status, headers, body = await download(created.urls["get"])
    assert status == 200 and body == data and headers["Content-Type"] == "image/png"


async def test_files_api_skips_a_nested_multipart_part(sim_server: TestServer) -> None:
    """A part that is itself multipart is no form field: the upload is read from the fields around it (it used to
    fail with a 500, the nested reader having no field name)."""
    data = png_bytes("olive")
    form = aiohttp.MultipartWriter("form-data")
    nested = aiohttp.MultipartWriter("mixed")
    nested.append(b"not a field")
    form.append(nested)
    form.append(data, {"Content-Type": "image/png"}).set_content_disposition(
        "form-data", name="content", filename="olive.png"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url(sim_server)}/v1/files", data=form, headers={"Authorization": "Bearer r8_test"}) as r,
    ):
        assert r.status == 201
        created = await r.json()
    assert created["name"] == "olive.png" and created["size"] == len(data)
    status, _, body = await download(created["urls"]["get"])
    assert status == 200 and body == data


@pytest.mark.parametrize(
    "path",
    [
        "/replicate/files/aaaaaaaaaaaaaaaaaaaaaaaaaa/x.png",
        "/replicate/files/../../etc/passwd",
        "/replicate/files/%2e%2e/simulator.json",
        "/replicate/files/ABC/x.png",
    ],
)
async def test_file_urls_outside_the_store_are_not_found(sim_server: TestServer, path: str) -> None:
    status, _, _ = await download(f"{str(sim_server.make_url('')).rstrip('/')}{path}")
    assert status == 404


# -- cancel, failures, restart -----------------------------------------------------------------------------------


async def test_cancel_stops_a_running_prediction_and_is_persisted(rc: replicate.Client, sim: Simulator) -> None:
    sim.image_latency = 30
    prediction = await create_image(rc)
    canceled = await rc.predictions.async_cancel(prediction.id)
    assert canceled.status == "canceled" and canceled.completed_at and canceled.output is None
    assert ("replicate.cancel", f"/replicate/v1/predictions/{prediction.id}/cancel") in sim.requests
    assert sim.load("predictions", prediction.id)["status"] == "canceled"
    assert (await rc.predictions.async_get(prediction.id)).status == "canceled"


async def test_cancel_after_the_end_changes_nothing(rc: replicate.Client, sim: Simulator) -> None:
    sim.image_latency = 0.05
    prediction = await finish(rc, await create_image(rc))
    again = await rc.predictions.async_cancel(prediction.id)
    assert again.status == "succeeded" and again.output == prediction.output


async def test_fail_prediction_fault_ends_the_next_prediction_failed(rc: replicate.Client, sim: Simulator) -> None:
    sim.add_fault("replicate.create", "fail_prediction", error="E6716: Director: unexpected error handling prediction")
    sim.image_latency = 0.1
    first = await finish(rc, await create_image(rc))
    second = await finish(rc, await create_image(rc))
    assert first.status == "failed" and first.error == "E6716: Director: unexpected error handling prediction"
    assert first.output is None and second.status == "succeeded"
    with pytest.raises(ModelError) as raised:
        await rc.async_run("google/imagen-4", input={"prompt": f"{IMAGE_PROMPT} [sandbox:fail]"}, wait=False)
    assert raised.value.prediction.status == "failed" and "flagged as sensitive" in raised.value.prediction.error


async def test_state_survives_a_simulator_restart(
    rc: replicate.Client,
    sim: Simulator,
    make_replicate: ClientFactory,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    sim.image_latency = 0.3
    finished = await finish(rc, await create_image(rc))
    pending = await create_image(rc)

    restarted = Simulator(sim.state_dir, image_latency=99)  # a new process: records come from disk
    server = await aiohttp_server(create_simulator_app(restarted))
    rc2 = make_replicate(server)
    pending = await finish(rc2, await rc2.predictions.async_get(pending.id))
    assert pending.status == "succeeded" and pending.output.startswith(base_url(server))  # latency kept per record
    again = await rc2.predictions.async_get(finished.id)
    assert again.status == "succeeded" and again.output.startswith(base_url(server))
    _, _, before = await download(finished.output)
    _, _, after = await download(again.output)
    assert before == after


# -- errors ------------------------------------------------------------------------------------------------------


async def test_invalid_input_is_rejected_with_replicate_problem_json(
    rc: replicate.Client, sim_server: TestServer
) -> None:
    with pytest.raises(ReplicateError) as missing:
        await rc.models.predictions.async_create(model="google/imagen-4", input={"aspect_ratio": "1:1"})
    assert missing.value.status == 422 and missing.value.title == "Input validation failed"
    assert "prompt is required" in missing.value.detail

    async with aiohttp.ClientSession(headers={"Authorization": "Bearer r8_test"}) as session:
        url = f"{base_url(sim_server)}/v1/models/google/veo-3.1/predictions"
        async with session.post(
            url, json={"input": {"prompt": "x", "aspect_ratio": "2:1", "duration": "8"}}
        ) as response:
            assert response.status == 422
            body = await response.json()
    assert body["status"] == 422 and body["title"] == "Input validation failed"
    fields = {item["field"]: item for item in body["invalid_fields"]}
    assert fields["input.aspect_ratio"]["type"] == "enum" and '"16:9"' in fields["input.aspect_ratio"]["description"]
    assert fields["input.duration"]["description"] == "Invalid type. Expected: integer, given: string"
    assert "- input.aspect_ratio: " in body["detail"] and "- input.duration: " in body["detail"]


async def test_unknown_model_and_prediction_are_404(rc: replicate.Client) -> None:
    with pytest.raises(ReplicateError) as model:
        await rc.models.predictions.async_create(model="google/imagen-9", input={"prompt": "x"})
    assert model.value.status == 404 and model.value.title == "Not found"
    with pytest.raises(ReplicateError) as prediction:
        await rc.predictions.async_get("aaaaaaaaaaaaaaaaaaaaaaaaaa")
    assert prediction.value.status == 404


async def test_requests_without_a_token_are_401(sim_server: TestServer) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"{base_url(sim_server)}/v1/models/google/imagen-4/predictions"
        async with session.post(url, json={"input": {"prompt": "x"}}) as response:
            assert response.status == 401
            body = await response.json()
    assert body == {
        "title": "Unauthenticated",
        "detail": "You did not pass a valid authentication token",
        "status": 401,
    }


async def test_transport_faults_apply_by_route_name(rc: replicate.Client, sim: Simulator) -> None:
    sim.image_latency = 0.05
    sim.add_fault("replicate.get", status=503, times=2)  # GETs are retried by the client
    prediction = await finish(rc, await create_image(rc))
    assert prediction.status == "succeeded"
    assert sum(route == "replicate.get" for route, _ in sim.requests) >= 3
    sim.add_fault(
        "replicate.files.create", status=500, body={"title": "Internal error", "detail": "boom", "status": 500}
    )
    with pytest.raises(ReplicateError) as raised:
        await rc.files.async_create(io.BytesIO(b"x"))
    assert raised.value.status == 500 and raised.value.detail == "boom"


async def test_a_stalled_download_sends_its_head_pauses_then_sends_the_rest(
    rc: replicate.Client, sim: Simulator, sim_server: TestServer
) -> None:
    data = os.urandom(600_000)  # several of the stall's chunks after the head
    upload = io.BytesIO(data)
    upload.name = "clip.mp4"
    created = await rc.files.async_create(upload)
    sim.add_fault("replicate.files.get", "stall", after_bytes=1000, seconds=0.3)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.get(created.urls["get"]) as response:
        assert response.status == 200 and response.content_length == len(data)
        head = await response.content.readexactly(1000)
        async with session.get(str(sim_server.make_url("/_sim/faults"))) as listed:
            faults = await listed.json()
        rest = await response.read()
    assert time.monotonic() - started >= 0.3
    assert head + rest == data
    assert faults["faults"] == []  # used up
    [stall] = faults["applied"]
    assert stall == {
        "route": "replicate.files.get",
        "kind": "stall",
        "path": URL(created.urls["get"]).path,
        "bytes_sent": 1000,
        "size": len(data),
    }
    status, _, body = await download(created.urls["get"])  # the next download is whole and prompt
    assert status == 200 and body == data


@pytest.mark.parametrize("done", [1, 9, 45, 99, 100])
def test_progress_lines_parse_with_the_client(done: int) -> None:
    line = replicate_api.tqdm_line(done, 100, done / 10, 10.0)
    progress = Prediction.Progress.parse(f"some log line\n{line}\n")
    assert progress is not None and (progress.current, progress.total) == (done, 100)
    assert progress.percentage == pytest.approx(done / 100)


def test_data_uri_decoding() -> None:
    data = png_bytes()
    assert replicate_api._data_uri_bytes("data:image/png;base64," + base64.b64encode(data).decode()) == data
    with pytest.raises(replicate_api.InputFileError):
        replicate_api._data_uri_bytes("data:image/png;base64,@@@")


# -- the server's Replicate provider: creates and polls sent with aiohttp, as the client library sent them ----------


@pytest.fixture
async def provider(sim_server: TestServer, tmp_path: Path) -> AsyncIterator[ReplicateProvider]:
    """The service's provider against the simulator, with a short per-request timeout."""
    async with aiohttp.ClientSession() as session:
        built = ReplicateProvider(
            make_client("r8_test", base_url(sim_server), 1.0),
            session,
            LocalArtefacts(OutputStore(tmp_path / "outputs")),
            video_model="google/veo-3.1",
            request_timeout=1.0,
            sandbox=False,
            output_hosts=OutputHosts((url_origin(sim_server.make_url("/")) or "",)),
            video_max_bytes=1 << 24,
            image_max_bytes=1 << 24,
        )
        yield built
        await built.aclose()


def video_request(**changes: Any) -> VideoRequest:
    return VideoRequest(
        prompt=VIDEO_PROMPT, negative_prompt="", aspect_ratio="16:9", duration=4, generate_audio=False, **changes
    )


async def test_the_providers_create_sends_the_webhook_its_events_and_cancel_after_without_waiting(
    provider: ReplicateProvider, sim: Simulator
) -> None:
    sim.video_latency = 30
    prediction = await provider.create(
        "google/veo-3.1",
        {"prompt": VIDEO_PROMPT, "duration": 4},
        "http://127.0.0.1:9/hook?job=j1",
        cancel_after=89.2,
    )
    assert prediction.status == "starting"  # answered at once: no ``Prefer: wait``
    record = sim.load("predictions", prediction.id)
    assert record is not None and record["cancel_after"] == 90  # rounded up, as the Cancel-After header says
    assert record["webhook"] == "http://127.0.0.1:9/hook?job=j1"
    assert record["webhook_events_filter"] == ["start", "completed"]
    assert record["input"] == {"prompt": VIDEO_PROMPT, "duration": 4}
    with_logs = await provider.create("google/veo-3.1", {"prompt": VIDEO_PROMPT}, "http://127.0.0.1:9/h", logs=True)
    again = sim.load("predictions", with_logs.id)
    assert again is not None and again["webhook_events_filter"] == ["start", "logs", "completed"]
    assert again["cancel_after"] is None and "webhook" in again
    plain = sim.load("predictions", (await provider.create("google/imagen-4", {"prompt": IMAGE_PROMPT})).id)
    assert plain is not None and plain["webhook"] is None and plain["webhook_events_filter"] is None
    polled = await provider.poll(prediction.id)
    assert polled.status in ("starting", "processing")


async def test_the_providers_create_uploads_a_reference_image_through_the_files_api(
    provider: ReplicateProvider, sim: Simulator, sim_server: TestServer
) -> None:
    sim.video_latency = 30
    prediction_id = await provider.start(video_request(reference_image=png_bytes(), reference_mime_type="image/png"))
    assert ("replicate.files.create", "/replicate/v1/files") in sim.requests
    record = sim.load("predictions", prediction_id)
    assert record is not None
    (uploaded,) = record["input"]["reference_images"]
    assert uploaded.startswith(f"{base_url(sim_server)}/files/") and uploaded.endswith("/reference.png")


async def test_the_providers_create_maps_validation_errors_and_keeps_retry_after(
    provider: ReplicateProvider, sim: Simulator
) -> None:
    with pytest.raises(ApiError) as invalid:
        await provider.create("google/veo-3.1", {"prompt": "x", "aspect_ratio": "2:1"}, "not a url")
    assert invalid.value.status == 422 and invalid.value.info.code == "provider_rejected_input"
    assert invalid.value.info.provider_status == 422
    assert "input.aspect_ratio" in json.dumps(invalid.value.info.provider_error)
    sim.add_fault("replicate.create", status=429, retry_after=7, times=1)
    with pytest.raises(ApiError) as limited:
        await provider.create("google/imagen-4", {"prompt": IMAGE_PROMPT})
    assert limited.value.info.provider_status == 429 and limited.value.retry_after == 7
    sim.add_fault("replicate.create", "reset", times=1)
    with pytest.raises(ApiError) as reset:
        await provider.create("google/imagen-4", {"prompt": IMAGE_PROMPT})
    assert reset.value.status == 502 and reset.value.info.code == "provider_unreachable"
    assert sorted((sim.state_dir / "predictions").glob("*.json")) == []  # none of the three created one


async def test_a_create_that_gets_no_answer_times_out_like_a_poll(provider: ReplicateProvider, sim: Simulator) -> None:
    sim.add_fault("replicate.create", "hang", times=1)
    started = time.monotonic()
    with pytest.raises(ApiError) as hung:
        async with asyncio.timeout(10):  # the client library's create waited without a limit
            await provider.create("google/imagen-4", {"prompt": IMAGE_PROMPT})
    assert hung.value.status == 504 and hung.value.info.code == "provider_timeout"
    assert time.monotonic() - started < 5
