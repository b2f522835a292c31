"""Veo on Vertex through the real google-genai client against the simulator, and Gemini scenes through it too."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import probe_media
from PIL import Image

from mvserver.core.artefacts import ArtefactExists, LocalArtefacts, OutputStore, artefact_key, new_id
from mvserver.core.errors import ApiError
from mvserver.providers.base import Snapshot, VideoRequest
from mvserver.providers.gemini import GeminiProvider, make_api_client, make_vertex_client
from mvserver.sandbox import gemini_api
from mvserver.sandbox.app import Simulator, create_simulator_app
from mvserver.scenes.service import SceneList

MODEL = "veo-3.1-fast-generate-preview"
NAME_PREFIX = f"projects/sandbox/locations/us-central1/publishers/google/models/{MODEL}/operations/"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 96), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def _request(prompt: str = "A drummer on a rooftop at dawn", **changes: Any) -> VideoRequest:
    values: dict[str, Any] = dict(
        prompt=prompt, negative_prompt="blurry", aspect_ratio="16:9", duration=4, generate_audio=True, seed=7
    )
    values.update(changes)
    return VideoRequest(**values)


def _base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def _provider(server: TestServer, store: LocalArtefacts, *, with_api_client: bool = False) -> GeminiProvider:
    vertex = make_vertex_client(
        api_key="test-vertex-key", project=None, location="us-central1", base_url=f"{_base(server)}/vertex"
    )
    api = make_api_client("test-gemini-key", f"{_base(server)}/gemini") if with_api_client else None
    return GeminiProvider(
        api,
        vertex,
        store,
        video_model=MODEL,
        person_generation="allow_all",
        resolution="720p",
        sandbox=False,
        video_sandbox=False,
        video_max_bytes=256 * 1024 * 1024,
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalArtefacts:
    return LocalArtefacts(OutputStore(tmp_path / "out"))


@pytest.fixture
async def provider(sim: Simulator, sim_server: TestServer, store: LocalArtefacts) -> AsyncIterator[GeminiProvider]:
    sim.video_latency = 0.5
    gemini = _provider(sim_server, store)
    yield gemini
    await gemini.aclose()


async def _finish(provider: GeminiProvider, name: str, timeout: float = 15.0) -> list[Snapshot]:
    """Poll until the operation is done; every snapshot seen, in order."""
    seen: list[Snapshot] = []
    async with asyncio.timeout(timeout):
        while not seen or not seen[-1].done:
            if seen:
                await asyncio.sleep(0.1)
            seen.append(await provider.poll(name))
    return seen


def _operation(sim: Simulator, name: str) -> dict[str, Any]:
    return json.loads((sim.state_dir / "operations" / f"{name.rsplit('/', 1)[1]}.json").read_text())


# -- lifecycle -------------------------------------------------------------------------------------------------------


async def test_lifecycle_with_reference_image(provider: GeminiProvider, sim: Simulator, store: LocalArtefacts) -> None:
    image = _png()
    name = await provider.start(_request(reference_image=image, reference_mime_type="image/png"))
    assert name.startswith(NAME_PREFIX)

    seen = await _finish(provider, name)
    assert seen[0].status == "processing"
    assert seen[-1].status == "succeeded" and seen[-1].error is None

    key = artefact_key("videos", new_id(), ".mp4")
    size = await provider.download(seen[-1], name, key)
    dest = store.file(key)
    data = dest.read_bytes()
    assert size == len(data) > 1000
    assert data[4:8] == b"ftyp"
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no .part leftovers
    with pytest.raises(ArtefactExists):  # a retried or taken-over download never overwrites a stored video
        await provider.download(seen[-1], name, key)
    assert dest.read_bytes() == data and [p.name for p in dest.parent.iterdir()] == [dest.name]
    info = probe_media(dest)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["duration"] == pytest.approx(4, abs=0.2)

    record = _operation(sim, name)  # the SDK's wire parameters arrived and were understood
    assert (record["duration"], record["aspect_ratio"], record["seed"]) == (4, "16:9", 7)
    assert record["negative_prompt"] == "blurry"
    assert (record["person_generation"], record["resolution"]) == ("allow_all", "720p")
    assert (sim.state_dir / "files" / f"{record['id']}.reference").read_bytes() == image
    routes = {route for route, _ in sim.requests}
    assert {"vertex.predict", "vertex.fetch"} <= routes


async def test_video_is_rendered_once_under_concurrent_fetches(
    provider: GeminiProvider, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = gemini_api.render_video

    async def counting(dest: Path, **kwargs: Any) -> None:
        calls.append(dest)
        await real(dest, **kwargs)

    monkeypatch.setattr(gemini_api, "render_video", counting)
    sim.video_latency = 0.1  # the operation is done by the time the three fetches arrive
    name = await provider.start(_request())
    await asyncio.sleep(sim.video_latency)
    snapshots = await asyncio.gather(*(provider.poll(name) for _ in range(3)))
    assert [s.status for s in snapshots] == ["succeeded"] * 3
    assert (await provider.poll(name)).status == "succeeded"
    assert len(calls) == 1


# -- failures reported by the operation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            {"code": 8, "message": "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests"},
            8,
            "Quota exceeded",
        ),
        ("the renderer fell over", 13, "the renderer fell over"),
    ],
)
async def test_failed_operation_keeps_google_code_and_message(
    provider: GeminiProvider, sim: Simulator, error: Any, code: int, message: str
) -> None:
    sim.add_fault("vertex.predict", "fail_prediction", error=error)
    name = await provider.start(_request())
    final = (await _finish(provider, name))[-1]
    assert final.status == "failed"
    assert final.error is not None
    assert final.error.code == "provider_prediction_failed"
    assert final.error.provider == "gemini"
    assert final.error.provider_status == code
    assert final.error.provider_error["code"] == code
    assert message in final.error.provider_error["message"]
    assert message in final.error.message
    assert not any(sim.faults)  # the fault was used up: the next operation succeeds
    assert (await _finish(provider, await provider.start(_request())))[-1].status == "succeeded"


async def test_fail_marker_in_prompt(provider: GeminiProvider) -> None:
    final = (await _finish(provider, await provider.start(_request("a storm [sandbox:fail]"))))[-1]
    assert final.status == "failed"
    assert final.error is not None and final.error.provider_status == 13


async def test_content_filtered(provider: GeminiProvider, sim: Simulator) -> None:
    name = await provider.start(_request("a duel [sandbox:filtered]"))
    final = (await _finish(provider, name))[-1]
    assert final.status == "failed"
    assert final.error is not None
    assert final.error.code == "provider_content_filtered"
    assert isinstance(final.error.provider_error, list) and "Support codes" in final.error.provider_error[0]
    assert not (sim.state_dir / "files" / f"{name.rsplit('/', 1)[1]}.mp4").exists()  # nothing rendered


# -- HTTP errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "google_status", "ours", "code"),
    [
        (401, "UNAUTHENTICATED", 502, "provider_auth_failed"),
        (429, "RESOURCE_EXHAUSTED", 429, "provider_rate_limited"),
        (500, "INTERNAL", 502, "provider_unavailable"),
    ],
)
async def test_http_errors_on_predict(
    provider: GeminiProvider, sim: Simulator, status: int, google_status: str, ours: int, code: str
) -> None:
    body = {"error": {"code": status, "message": f"simulated {google_status}", "status": google_status}}
    sim.add_fault("vertex.predict", "status", status=status, body=body, retry_after=3 if status == 429 else None)
    with pytest.raises(ApiError) as caught:
        await provider.start(_request())
    error = caught.value
    assert (error.status, error.info.code, error.info.provider_status) == (ours, code, status)
    assert google_status in error.info.message and "simulated" in error.info.message
    assert error.retry_after == (3 if status == 429 else None)
    assert list((sim.state_dir / "operations").iterdir()) == []


async def test_transport_fault_on_fetch_then_recovery(provider: GeminiProvider, sim: Simulator) -> None:
    name = await provider.start(_request())
    sim.add_fault("vertex.fetch", "status", status=503)
    with pytest.raises(ApiError) as caught:
        await provider.poll(name)
    assert (caught.value.info.code, caught.value.info.provider_status) == ("provider_unavailable", 503)
    assert caught.value.transient
    assert (await _finish(provider, name))[-1].status == "succeeded"


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        ({"duration": 9}, "durationSeconds"),
        ({"duration": 2}, "durationSeconds"),
        ({"aspect_ratio": "4:3"}, "aspectRatio"),
        ({"prompt": ""}, "prompt"),
        ({"seed": -1}, "seed"),
    ],
)
async def test_invalid_parameters_rejected_like_vertex(
    provider: GeminiProvider, sim: Simulator, changes: dict[str, Any], mentions: str
) -> None:
    with pytest.raises(ApiError) as caught:
        await provider.start(_request(**changes))
    error = caught.value
    assert (error.status, error.info.code, error.info.provider_status) == (422, "provider_rejected_input", 400)
    assert "INVALID_ARGUMENT" in error.info.message and mentions in error.info.message
    assert list((sim.state_dir / "operations").iterdir()) == []


async def test_image_without_prompt_is_accepted(provider: GeminiProvider, sim: Simulator) -> None:
    name = await provider.start(_request("", reference_image=_png(), reference_mime_type="image/png"))
    assert _operation(sim, name)["has_reference"] is True


async def test_unknown_operation_is_not_found(provider: GeminiProvider) -> None:
    with pytest.raises(ApiError) as caught:
        await provider.poll(f"{NAME_PREFIX}{new_id()}")
    assert (caught.value.info.code, caught.value.info.provider_status) == ("provider_not_found", 404)


async def _post(server: TestServer, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url(path),
            data=body if isinstance(body, str) else json.dumps(body),
            headers={"Content-Type": "application/json", **headers},
        ) as response:
            return response.status, await response.json()


async def test_wire_errors_in_google_shape(sim_server: TestServer) -> None:
    predict = f"/vertex/v1beta1/publishers/google/models/{MODEL}:predictLongRunning"
    fetch = f"/vertex/v1beta1/projects/p/locations/l/publishers/google/models/{MODEL}:fetchPredictOperation"
    valid = {"instances": [{"prompt": "x"}], "parameters": {"durationSeconds": 4}}
    key = {"x-goog-api-key": "k"}

    status, body = await _post(sim_server, predict, valid, {})
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED" and body["error"]["code"] == 401
    status, body = await _post(sim_server, predict, "{nope", key)
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    status, body = await _post(sim_server, fetch, {"operationName": "operations/123"}, key)
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    status, body = await _post(sim_server, f"/vertex/v1beta1/publishers/google/models/{MODEL}:predict", valid, key)
    assert status == 404 and body["error"]["status"] == "NOT_FOUND"


async def test_project_scoped_predict_and_running_metadata(sim: Simulator, sim_server: TestServer) -> None:
    """The project/location path form names the operation after them; while running only times are reported."""
    sim.video_latency = 60
    scope = "projects/my-proj/locations/europe-west4"
    predict = f"/vertex/v1beta1/{scope}/publishers/google/models/{MODEL}:predictLongRunning"
    image = {"bytesBase64Encoded": base64.b64encode(_png()).decode(), "mimeType": "image/png"}
    instances = [{"prompt": "x", "image": image}]
    status, body = await _post(sim_server, predict, {"instances": instances}, {"x-goog-api-key": "k"})
    assert status == 200
    name = body["name"]
    assert name.startswith(f"{scope}/publishers/google/models/{MODEL}/operations/")
    fetch = f"/vertex/v1beta1/{name.rpartition('/operations/')[0]}:fetchPredictOperation"
    status, body = await _post(sim_server, fetch, {"operationName": name}, {"x-goog-api-key": "k"})
    assert status == 200
    assert body["name"] == name and body["done"] is False
    assert set(body["metadata"]) == {"@type", "createTime", "updateTime"}
    assert "response" not in body and "error" not in body


# -- restart ---------------------------------------------------------------------------------------------------------


async def test_operation_survives_simulator_restart(
    sim: Simulator,
    sim_server: TestServer,
    provider: GeminiProvider,
    store: LocalArtefacts,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    name = await provider.start(_request())
    await sim_server.close()

    restarted = Simulator(sim.state_dir, video_latency=0.5)
    server = await aiohttp_server(create_simulator_app(restarted))
    gemini = _provider(server, store)
    try:
        final = (await _finish(gemini, name))[-1]
        assert final.status == "succeeded"
        key = artefact_key("videos", new_id(), ".mp4")
        await gemini.download(final, name, key)
        assert (await store.get_bytes(key))[4:8] == b"ftyp"
    finally:
        await gemini.aclose()


# -- scenes path -----------------------------------------------------------------------------------------------------


async def test_generate_content_still_works(sim_server: TestServer, store: LocalArtefacts) -> None:
    gemini = _provider(sim_server, store, with_api_client=True)
    try:
        prompt = "Write exactly 3 scenes about: a lost umbrella\nStyle: noir"
        parsed, raw = await gemini.generate_json("gemini-2.5-pro", prompt, SceneList, temperature=0.7, timeout=10)
    finally:
        await gemini.aclose()
    assert isinstance(parsed, SceneList)
    assert len(parsed.scenes) == 3
    assert "a lost umbrella" in parsed.scenes[0].description
    assert json.loads(raw)["scenes"][2]["negative_description"]
