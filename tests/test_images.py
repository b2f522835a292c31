"""Character reference images through the real replicate client against the simulator, and serving them back."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import PROJECT, AppClient, LiveApp, artefact, artefact_json, module_loop, stored_names
from PIL import Image
from yarl import URL

from mvserver.appkeys import CONFIG
from mvserver.core.artefacts import OutputStore
from mvserver.core.errors import ApiError
from mvserver.images.service import load_image
from mvserver.sandbox import replicate_api
from mvserver.sandbox.app import Simulator

DESCRIPTION = "a wiry street violinist in a green velvet coat, round glasses and a red scarf"
ENDPOINT = "/api/mv/generate_character_reference"


def settings_copy(tmp_path: Path, images: dict[str, Any] | None = None, **files: dict[str, Any]) -> Path:
    """A copy of the project's settings with keys of ``images.yaml`` (and other files) replaced."""
    target = tmp_path / "settings"
    if not target.exists():
        shutil.copytree(PROJECT / "settings", target)
    for name, changes in {"images": {"poll_interval_seconds": 0.05, **(images or {})}, **files}.items():
        path = target / f"{name}.yaml"
        data = yaml.safe_load(path.read_text())
        for key, value in changes.items():
            if isinstance(value, dict):
                data[key].update(value)
            else:
                data[key] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return target


@pytest.fixture
async def client(make_client: AppClient, tmp_path: Path) -> TestClient:
    """An app whose Imagen polling is fast (the YAML default polls once a second)."""
    return await make_client(MV_SETTINGS_DIR=settings_copy(tmp_path))


async def generate(client: TestClient, status: int = 200, **body: Any) -> dict[str, Any]:
    response = await client.post(ENDPOINT, json={"character_description": DESCRIPTION, **body})
    assert response.status == status, await response.text()
    return await response.json()


def sent_input(sim: Simulator, prediction_id: str) -> dict[str, Any]:
    record = sim.load("predictions", prediction_id)
    assert record is not None and record["model"] == "google/imagen-4"
    return record["input"]


async def saved_images(client: TestClient) -> list[str]:
    """The stored images and sidecars, and any temporary left behind."""
    return await stored_names(client, "images")


# -- success -----------------------------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_png_is_returned_saved_and_served_byte_for_byte(client: TestClient, sim: Simulator) -> None:
    body = await generate(client)
    image_id = body["image_id"]
    assert uuid.UUID(image_id).version == 4
    assert body["mime_type"] == "image/png" and body["sandbox"] is False
    assert body["image_url"] == f"/api/mv/get_image/{image_id}"
    assert "output_file" not in body  # no server path in answers
    data = base64.b64decode(body["image_base64"])
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG" and image.width == image.height  # 1:1 by default
    assert await artefact(client, f"images/{image_id}.png") == data

    served = await client.get(body["image_url"])
    assert served.status == 200 and served.headers["Content-Type"] == "image/png"
    assert await served.read() == data

    metadata = body["metadata"]
    assert metadata["model"] == "google/imagen-4" and metadata["elapsed_seconds"] > 0
    assert DESCRIPTION in metadata["prompt"]
    assert sent_input(sim, metadata["prediction_id"]) == {
        "prompt": metadata["prompt"],
        "aspect_ratio": "1:1",
        "safety_filter_level": "block_medium_and_above",
        "person_generation": "allow_adult",
        "output_format": "png",
    }  # no empty negative prompt, no null seed
    sidecar = await artefact_json(client, f"images/{image_id}.json")
    assert sidecar["mime_type"] == "image/png" and sidecar["prediction_id"] == metadata["prediction_id"]
    assert sidecar["prompt"] == metadata["prompt"] and sidecar["sandbox"] is False
    assert await saved_images(client) == sorted([f"{image_id}.json", f"{image_id}.png"])


@pytest.mark.parametrize(("fmt", "mime", "pillow"), [("jpg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
@module_loop
async def test_other_formats_and_the_optional_inputs(module_live: LiveApp, fmt: str, mime: str, pillow: str) -> None:
    client, sim = module_live
    body = await generate(client, output_format=fmt, aspect_ratio="16:9", seed=7, negative_prompt="blurry, text")
    assert body["mime_type"] == mime
    with Image.open(io.BytesIO(base64.b64decode(body["image_base64"]))) as image:
        assert image.format == pillow and image.width > image.height
    served = await client.get(body["image_url"])
    assert served.headers["Content-Type"] == mime
    inputs = sent_input(sim, body["metadata"]["prediction_id"])
    assert inputs["seed"] == 7 and inputs["negative_prompt"] == "blurry, text" and inputs["aspect_ratio"] == "16:9"
    assert set(body["metadata"]["defaults_applied"]) == {"safety_filter_level", "person_generation", "number_of_images"}


async def test_defaults_come_from_the_yaml(make_client: AppClient, sim: Simulator, tmp_path: Path) -> None:
    settings = settings_copy(
        tmp_path,
        {"defaults": {"aspect_ratio": "9:16", "output_format": "webp", "safety_filter_level": "block_only_high"}},
    )
    client = await make_client(MV_SETTINGS_DIR=settings)
    body = await generate(client)
    assert body["mime_type"] == "image/webp"
    parameters = body["metadata"]["parameters"]
    assert parameters["aspect_ratio"] == "9:16" and parameters["safety_filter_level"] == "block_only_high"
    assert set(body["metadata"]["defaults_applied"]) == {
        "aspect_ratio",
        "safety_filter_level",
        "person_generation",
        "output_format",
        "negative_prompt",
        "seed",
        "number_of_images",
    }
    inputs = sent_input(sim, body["metadata"]["prediction_id"])
    assert (inputs["aspect_ratio"], inputs["output_format"]) == ("9:16", "webp")


@pytest.mark.both_backends
async def test_sandbox_mode_labels_the_image(make_client: AppClient, tmp_path: Path) -> None:
    settings = settings_copy(tmp_path, sandbox={"image_latency_seconds": 0.05})
    client = await make_client(MV_SETTINGS_DIR=settings, REPLICATE_API_TOKEN=None)  # no token: built-in simulator
    body = await generate(client)
    assert body["sandbox"] is True
    sidecar = await artefact_json(client, f"images/{body['image_id']}.json")
    assert sidecar["sandbox"] is True
    assert (await client.get(body["image_url"])).status == 200


# -- debug mode --------------------------------------------------------------------------------------------------


async def test_debug_mode_logs_the_full_rendered_prompt(
    make_client: AppClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(MV_SETTINGS_DIR=settings_copy(tmp_path), MV_DEBUG_MODE="true")
    caplog.set_level(logging.INFO, logger="mvserver.debug")
    caplog.clear()
    body = await generate(client, aspect_ratio="4:3")
    expected = client.app[CONFIG].render("images.prompt", character_description=DESCRIPTION, aspect_ratio="4:3")
    assert DESCRIPTION in expected and "{{" not in expected
    assert expected == body["metadata"]["prompt"]
    assert expected in caplog.text
    assert "request arguments received" in caplog.text and "defaults applied from settings" in caplog.text


async def test_no_debug_output_when_debug_mode_is_off(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mvserver.debug")
    caplog.clear()
    await generate(client)
    assert [r for r in caplog.records if r.name == "mvserver.debug"] == []


# -- invalid requests --------------------------------------------------------------------------------------------


@module_loop
async def test_unknown_enum_value_names_the_field_and_the_allowed_values(module_live: LiveApp) -> None:
    client, sim = module_live
    error = (await generate(client, 400, aspect_ratio="2:1"))["error"]
    assert error["code"] == "invalid_field" and error["field"] == "aspect_ratio"
    for allowed in ("1:1", "16:9", "9:16", "4:3", "3:4"):
        assert allowed in error["message"]
    assert not any(route == "replicate.create" for route, _ in sim.requests)


@module_loop
async def test_missing_description_is_400(module_live: LiveApp) -> None:
    client = module_live[0]
    response = await client.post(ENDPOINT, json={"aspect_ratio": "1:1"})
    error = (await response.json())["error"]
    assert response.status == 400 and error["code"] == "missing_field" and error["field"] == "character_description"


@module_loop
async def test_a_body_over_the_limit_is_413(module_live: LiveApp) -> None:
    client, sim = module_live
    limit = 16 * 1024 * 1024  # MV_MAX_BODY_MB defaults to 16
    body = json.dumps({"character_description": "x" * (limit + 1024)})
    response = await client.post(ENDPOINT, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 413
    error = (await response.json())["error"]
    assert error["code"] == "request_too_large" and str(limit) in error["message"]
    assert not any(route == "replicate.create" for route, _ in sim.requests)


async def test_the_body_limit_follows_the_environment(make_client: AppClient, tmp_path: Path) -> None:
    client = await make_client(MV_SETTINGS_DIR=settings_copy(tmp_path), MV_MAX_BODY_MB="0.01")
    response = await client.post(ENDPOINT, json={"character_description": "x" * 20_000})
    assert response.status == 413 and (await response.json())["error"]["code"] == "request_too_large"


# -- provider failures -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "ours", "code", "problem"),
    [
        (
            401,
            502,
            "provider_auth_failed",
            {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401},
        ),
        (
            402,
            502,
            "provider_payment_required",
            {
                "title": "Insufficient credit",
                "detail": "You have insufficient credit to run this model.",
                "status": 402,
            },
        ),
        (
            422,
            422,
            "provider_rejected_input",
            {"title": "Input validation failed", "detail": "- input.prompt: prompt is too long\n", "status": 422},
        ),
    ],
)
async def test_provider_http_errors_keep_the_provider_status(
    client: TestClient, sim: Simulator, status: int, ours: int, code: str, problem: dict[str, Any]
) -> None:
    sim.add_fault("replicate.create", status=status, body=problem)
    error = (await generate(client, ours))["error"]
    assert error["code"] == code and error["provider"] == "replicate" and error["provider_status"] == status
    assert (
        error["provider_error"]["detail"] == problem["detail"] and error["provider_error"]["title"] == problem["title"]
    )
    assert problem["detail"].strip() in error["message"]
    assert await saved_images(client) == []


async def test_rate_limit_is_429_with_retry_after(client: TestClient, sim: Simulator) -> None:
    sim.add_fault(
        "replicate.create",
        status=429,
        retry_after=7,
        body={
            "title": "Request was throttled.",
            "detail": "Request was throttled. Expected available in 7 seconds.",
            "status": 429,
        },
    )
    response = await client.post(ENDPOINT, json={"character_description": DESCRIPTION})
    error = (await response.json())["error"]
    assert response.status == 429 and error["code"] == "provider_rate_limited" and error["provider_status"] == 429
    assert response.headers.get("Retry-After") == "7"


async def test_a_failed_prediction_returns_the_provider_error(client: TestClient, sim: Simulator) -> None:
    sim.add_fault("replicate.create", "fail_prediction", error="E005: the input was flagged as sensitive")
    error = (await generate(client, 502))["error"]
    assert error["code"] == "provider_prediction_failed" and error["provider_status"] == "failed"
    assert error["provider_error"] == "E005: the input was flagged as sensitive"
    marked = (await generate(client, 502, character_description=f"{DESCRIPTION} [sandbox:fail]"))["error"]
    assert marked["code"] == "provider_prediction_failed" and "flagged as sensitive" in marked["provider_error"]
    assert await saved_images(client) == []


async def test_a_slow_prediction_times_out_and_is_canceled(
    make_client: AppClient, sim: Simulator, tmp_path: Path
) -> None:
    client = await make_client(MV_SETTINGS_DIR=settings_copy(tmp_path, {"timeout_seconds": 0.4}))
    sim.image_latency = 3600
    error = (await generate(client, 504))["error"]
    assert error["code"] == "provider_timeout" and error["provider"] == "replicate"
    canceled = [path for route, path in sim.requests if route == "replicate.cancel"]
    assert len(canceled) == 1
    prediction_id = canceled[0].split("/")[-2]
    assert sim.load("predictions", prediction_id)["status"] == "canceled"
    assert await saved_images(client) == []


@pytest.mark.parametrize(
    ("output", "message"),
    [(b"<html>not an image</html>", "not a readable image"), ("jpeg", "JPEG image, expected png")],
)
async def test_an_output_that_is_not_the_expected_image_is_502(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, output: Any, message: str
) -> None:
    real = replicate_api.render_character_image

    def wrong(*args: Any, **kwargs: Any) -> bytes:
        return real(*args, **{**kwargs, "output_format": "jpg"}) if output == "jpeg" else output

    monkeypatch.setattr(replicate_api, "render_character_image", wrong)
    error = (await generate(client, 502))["error"]
    assert error["code"] == "provider_bad_output" and message in error["message"]
    assert await saved_images(client) == []


# -- get_image and load_image ------------------------------------------------------------------------------------


@module_loop
async def test_unknown_image_is_404(module_live: LiveApp) -> None:
    client = module_live[0]
    response = await client.get(f"/api/mv/get_image/{uuid.uuid4()}")
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


MALFORMED_IDS = [
    "../x",
    "%2e%2e%2fx",
    "..%2F..%2Fetc%2Fpasswd",
    str(uuid.uuid4()).upper(),
    str(uuid.uuid1()),
    "a" * 500,
    f"{uuid.uuid4()}.png",
    f"{uuid.uuid4()}%00",
]


async def test_malformed_ids_never_reach_the_filesystem(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    touched: list[str] = []

    def spy(self: OutputStore, kind: str, file_id: str, suffix: str) -> Path:
        touched.append(file_id)
        raise AssertionError("the store was asked for a path")

    monkeypatch.setattr(OutputStore, "path", spy)
    for raw in MALFORMED_IDS:
        response = await client.get(URL(f"/api/mv/get_image/{raw}", encoded=True))
        assert response.status in (400, 404), raw
        error = (await response.json())["error"]
        assert error["code"] in ("invalid_id", "not_found") and error["message"], raw
        if response.status == 400:
            assert error["code"] == "invalid_id" and error["field"] == "image_id", raw
    assert touched == []


@module_loop
async def test_load_image_returns_bytes_and_mime_type(module_live: LiveApp) -> None:
    client = module_live[0]
    body = await generate(client, output_format="jpg")
    data, mime_type = await load_image(client.app, body["image_id"])
    assert mime_type == "image/jpeg" and data == base64.b64decode(body["image_base64"])
    with pytest.raises(ApiError) as missing:
        await load_image(client.app, str(uuid.uuid4()))
    assert missing.value.status == 404 and missing.value.info.field == "reference_image_id"
    with pytest.raises(ApiError) as malformed:
        await load_image(client.app, "../../etc/passwd")
    assert malformed.value.status == 400 and malformed.value.info.field == "reference_image_id"


async def wait_canceled(sim: Simulator, count: int) -> set[str]:
    """The predictions the service asked to cancel, once ``count`` of them are recorded as canceled.

    The simulator logs a request before handling it, so the record is polled rather than read at once.
    """
    async with asyncio.timeout(5):
        while True:
            asked = {path.split("/")[-2] for route, path in sim.requests if route == "replicate.cancel"}
            done = {p for p in asked if (sim.load("predictions", p) or {}).get("status") == "canceled"}
            if len(done) >= count:
                return asked
            await asyncio.sleep(0.02)


async def test_an_abandoned_request_cancels_the_prediction_and_saves_nothing(
    sim: Simulator, live_env: dict[str, str]
) -> None:
    """Served as ``python -m mvserver`` serves it (aiohttp does not cancel handlers when a client leaves)."""
    import aiohttp
    from aiohttp import web

    from mvserver.app import create_app

    sim.image_latency = 30
    runner = web.AppRunner(create_app(live_env), handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(
                session.post(
                    f"http://127.0.0.1:{port}/api/mv/generate_character_reference",
                    json={"character_description": "a knight in a paper crown"},
                )
            )
            async with asyncio.timeout(5):
                while not any(route == "replicate.get" for route, _ in sim.requests):
                    await asyncio.sleep(0.02)
            request.cancel()  # the client gives up and its connection closes
        canceled = await wait_canceled(sim, 1)
        assert len(canceled) == 1
        assert list((Path(live_env["MV_OUTPUT_DIR"]) / "images").iterdir()) == []
    finally:
        await runner.cleanup()


# -- several candidate images ------------------------------------------------------------------------------------


@module_loop
async def test_one_image_keeps_the_old_shape_and_lists_it_in_images(module_live: LiveApp) -> None:
    client = module_live[0]
    body = await generate(client)
    assert [image["image_id"] for image in body["images"]] == [body["image_id"]]
    only = body["images"][0]
    assert only["image_url"] == body["image_url"] and only["mime_type"] == body["mime_type"]
    assert only["prediction_id"] == body["metadata"]["prediction_id"] and only["seed"] is None


@pytest.mark.both_backends
async def test_candidate_images_run_in_parallel_each_saved_with_its_own_id(client: TestClient, sim: Simulator) -> None:
    sim.image_latency = 1.0
    body = await generate(client, number_of_images=4, seed=40)
    ids = [image["image_id"] for image in body["images"]]
    assert len(set(ids)) == 4 and ids[0] == body["image_id"]
    predictions = [image["prediction_id"] for image in body["images"]]
    assert len(set(predictions)) == 4 and body["metadata"]["prediction_ids"] == predictions
    created = [sim.load("predictions", p)["created_at"] for p in predictions]
    assert max(created) - min(created) < sim.image_latency  # one after another would be a latency apart
    assert [sent_input(sim, p)["seed"] for p in predictions] == [40, 41, 42, 43]
    assert [image["seed"] for image in body["images"]] == [40, 41, 42, 43]
    for image in body["images"]:
        served = await client.get(image["image_url"])
        assert served.status == 200 and served.headers["Content-Type"] == "image/png"
        sidecar = await artefact_json(client, f"images/{image['image_id']}.json")
        assert sidecar["prediction_id"] == image["prediction_id"] and sidecar["seed"] == image["seed"]
    assert len(await saved_images(client)) == 8


@pytest.mark.parametrize("count", [0, 5, "2", 2.5, None])
@module_loop
async def test_number_of_images_outside_1_to_4_is_400(module_live: LiveApp, count: Any) -> None:
    client, sim = module_live
    error = (await generate(client, 400, number_of_images=count))["error"]
    assert error["code"] == "invalid_field" and error["field"] == "number_of_images"
    assert not any(route == "replicate.create" for route, _ in sim.requests)


@pytest.mark.both_backends
async def test_one_failed_candidate_cancels_the_others_and_saves_nothing(client: TestClient, sim: Simulator) -> None:
    sim.image_latency = 30  # the others are still running when the first poll fails
    sim.add_fault(
        "replicate.get",
        status=401,
        body={"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401},
    )
    error = (await generate(client, 502, number_of_images=3))["error"]
    assert error["code"] == "provider_auth_failed"
    canceled = await wait_canceled(sim, 3)
    assert len(canceled) == 3
    assert await saved_images(client) == []


async def test_an_abandoned_request_cancels_every_candidate(sim: Simulator, live_env: dict[str, str]) -> None:
    """Served as ``python -m mvserver`` serves it (aiohttp does not cancel handlers when a client leaves)."""
    import aiohttp
    from aiohttp import web

    from mvserver.app import create_app

    sim.image_latency = 30
    runner = web.AppRunner(create_app(live_env), handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]

    def routes(name: str) -> list[str]:
        return [path for route, path in sim.requests if route == name]

    try:
        async with aiohttp.ClientSession() as session:
            request = asyncio.ensure_future(
                session.post(
                    f"http://127.0.0.1:{port}/api/mv/generate_character_reference",
                    json={"character_description": "a knight in a paper crown", "number_of_images": 3},
                )
            )
            async with asyncio.timeout(5):
                while len({p.split("/")[-1] for p in routes("replicate.get")}) < 3:
                    await asyncio.sleep(0.02)
            request.cancel()  # the client gives up and its connection closes
        canceled = await wait_canceled(sim, 3)
        assert len(canceled) == 3
        assert list((Path(live_env["MV_OUTPUT_DIR"]) / "images").iterdir()) == []
    finally:
        await runner.cleanup()
