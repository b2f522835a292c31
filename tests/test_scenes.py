"""``POST /api/mv/create_scenes``: the real google-genai client against the provider simulator."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import artefact, artefact_json, artefact_keys

from mvserver.app import create_app
from mvserver.sandbox import gemini_api
from mvserver.sandbox.app import Simulator, create_simulator_app
from mvserver.sandbox.state import SIMULATOR

PROJECT = Path(__file__).resolve().parent.parent
URL = "/api/mv/create_scenes"
IDEA = "a cat who wants to become a jazz drummer"
CHARACTER = "a ginger tabby cat with a tiny black beret and round green eyes"
SETTINGS = yaml.safe_load((PROJECT / "settings" / "scenes.yaml").read_text())
DEFAULTS: dict[str, Any] = SETTINGS["defaults"]
OPTIONAL = list(DEFAULTS)
GOOGLE_429 = {"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}
GOOGLE_401 = {
    "error": {"code": 401, "message": "API key not valid. Please pass a valid API key.", "status": "UNAUTHENTICATED"}
}
GOOGLE_500 = {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}


def body(**extra: Any) -> dict[str, Any]:
    return {"idea": IDEA, "character_description": CHARACTER, **extra}


def render_prompt(template: str, params: dict[str, Any]) -> str:
    """The prompt as the YAML template renders it, computed independently of the service."""
    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(**params).strip()


def generate_calls(sim: Simulator) -> list[str]:
    """Paths of the generateContent requests the simulator received."""
    return [path for route, path in sim.requests if route == "gemini.generate"]


def debug_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mvserver.debug"]


def debug_entry(messages: list[str], title: str) -> str:
    """The text of the single debug record whose title contains ``title``."""
    found = [m for m in messages if title in m.split("\n", 1)[0]]
    assert len(found) == 1, (title, [m.split("\n", 1)[0] for m in messages])
    return found[0].split("\n", 1)[1]


async def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    if field is None:
        assert "field" not in error
    else:
        assert error["field"] == field
    return error


Shared = tuple[TestClient, Simulator]
shared = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shared]:
    """One app (all providers 'live', pointed at one simulator) for the tests that need no special settings."""
    root = tmp_path_factory.mktemp("shared")
    sim = Simulator(root / "simulator", scenes_latency=0.0)
    async with TestServer(create_simulator_app(sim)) as sim_server:
        base = str(sim_server.make_url("")).rstrip("/")
        env = {
            "GEMINI_API_KEY": "test-gemini-key",
            "REPLICATE_API_TOKEN": "r8_test",
            "GOOGLE_VERTEX_API_KEY": "test-vertex-key",
            "MV_GEMINI_BASE_URL": f"{base}/gemini",
            "MV_VERTEX_BASE_URL": f"{base}/vertex",
            "MV_REPLICATE_BASE_URL": f"{base}/replicate",
            "MV_OUTPUT_DIR": str(root / "outputs"),
            "MV_SETTINGS_DIR": str(PROJECT / "settings"),
        }
        async with TestClient(TestServer(create_app(env))) as client:
            yield client, sim


@pytest.fixture
def app(shared_app: Shared) -> Shared:
    """The shared app with its simulator reset: no pending faults, no recorded requests, no latency."""
    client, sim = shared_app
    sim.faults.clear()
    sim.requests.clear()
    sim.scenes_latency = 0.0
    return client, sim


# -- happy path -----------------------------------------------------------------------------------------------


@pytest.fixture
async def recorder(
    sim: Simulator, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> tuple[TestServer, list[dict[str, Any]]]:
    """A Gemini stand-in that records each request body and answers with the simulator's ``generate_content``."""
    bodies: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        return await gemini_api.generate_content(request)

    app = web.Application()
    app[SIMULATOR] = sim
    app.router.add_post("/gemini/{version}/models/{model_method}", record)
    return await aiohttp_server(app), bodies


@pytest.mark.both_backends
async def test_happy_path_writes_scenes_files_and_metadata(make_client, recorder) -> None:
    server, bodies = recorder
    client = await make_client(MV_GEMINI_BASE_URL=str(server.make_url("/gemini")))
    response = await client.post(URL, json=body(number_of_scenes=3, camera_angle="low angle"))
    assert response.status == 200, await response.text()
    data = await response.json()

    scenes = data["scenes"]
    assert len(scenes) == 3
    for scene in scenes:
        assert set(scene) == {"description", "negative_description"}
        assert scene["description"].strip() and scene["negative_description"].strip()
    assert CHARACTER in scenes[0]["description"]  # the simulator writes from the prompt it received
    assert data["sandbox"] is False

    meta = data["metadata"]
    assert meta["model"] == SETTINGS["model"]
    assert meta["parameters"] == {
        **DEFAULTS,
        "idea": IDEA,
        "character_description": CHARACTER,
        "number_of_scenes": 3,
        "camera_angle": "low angle",
    }
    assert sorted(meta["defaults_applied"]) == sorted(set(OPTIONAL) - {"number_of_scenes", "camera_angle"})
    assert isinstance(meta["elapsed_seconds"], (int, float)) and meta["elapsed_seconds"] >= 0
    assert meta["attempts"] == 1

    scenes_id = data["scenes_id"]
    saved = await artefact_json(client, f"scenes/{scenes_id}.json")
    assert saved["scenes"] == scenes and saved["scenes_id"] == scenes_id and saved["metadata"] == meta
    markdown = (await artefact(client, f"scenes/{scenes_id}.md")).decode()
    assert all(scene["description"] in markdown for scene in scenes)
    assert IDEA in markdown
    assert "files" not in data  # no server path in answers

    served = await client.get(data["urls"]["json"])
    assert served.status == 200 and served.content_type == "application/json"
    assert (await served.json())["scenes"] == scenes
    served_md = await client.get(data["urls"]["markdown"])
    assert served_md.status == 200 and served_md.content_type == "text/markdown"
    assert await served_md.text() == markdown

    assert len(bodies) == 1
    config = bodies[0]["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config["responseSchema"]
    assert schema["type"].upper() == "OBJECT"
    item = schema["properties"]["scenes"]["items"]
    assert set(item["properties"]) == {"description", "negative_description"}
    assert config["temperature"] == SETTINGS["temperature"]
    prompt = bodies[0]["contents"][0]["parts"][0]["text"]
    assert IDEA in prompt and CHARACTER in prompt and "low angle" in prompt


@shared
async def test_all_defaults_applied_when_only_required_fields_sent(app: Shared) -> None:
    client, sim = app
    response = await client.post(URL, json=body())
    assert response.status == 200, await response.text()
    data = await response.json()
    assert len(data["scenes"]) == DEFAULTS["number_of_scenes"]
    assert sorted(data["metadata"]["defaults_applied"]) == sorted(OPTIONAL)
    assert len(generate_calls(sim)) == 1
    assert f"/models/{SETTINGS['model']}:generateContent" in generate_calls(sim)[0]


@pytest.mark.parametrize(
    "path",
    [
        "/api/mv/get_scenes/00000000-0000-4000-8000-000000000000.json",
        "/api/mv/get_scenes/00000000-0000-4000-8000-000000000000.md",
    ],
)
@shared
async def test_get_scenes_unknown_id_is_404(app: Shared, path: str) -> None:
    client, _ = app
    await assert_error(await client.get(path), 404, "not_found")


@shared
async def test_get_scenes_rejects_non_uuid(app: Shared) -> None:
    client, _ = app
    await assert_error(await client.get("/api/mv/get_scenes/..%2F..%2Fsettings.json"), 400, "invalid_id", "scenes_id")


# -- debug mode -----------------------------------------------------------------------------------------------


async def test_debug_mode_logs_arguments_defaults_config_prompt_and_reply(make_client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mvserver.debug")
    client = await make_client(MV_DEBUG_MODE="true")
    sent = body(number_of_scenes=2, video_type="music video")
    response = await client.post(URL, json=sent)
    assert response.status == 200, await response.text()
    data = await response.json()
    messages = debug_messages(caplog)

    config = json.loads(debug_entry(messages, "config params loaded at start-up"))
    assert config["scenes"]["model"] == SETTINGS["model"]
    assert config["scenes"]["defaults"] == DEFAULTS
    assert config["env"]["gemini_api_key"] == "set"  # secrets are never printed
    assert "test-gemini-key" not in "\n".join(messages)

    assert json.loads(debug_entry(messages, "request arguments received")) == sent
    defaults = json.loads(debug_entry(messages, "defaults applied"))
    assert defaults == {k: v for k, v in DEFAULTS.items() if k not in sent}

    prompt = debug_entry(messages, "prompt sent to Gemini")
    assert "{{" not in prompt and "{%" not in prompt
    for value in [
        IDEA,
        CHARACTER,
        "music video",
        DEFAULTS["character_characteristics"],
        DEFAULTS["video_characteristics"],
        DEFAULTS["camera_angle"],
    ]:
        assert value in prompt, value
    assert prompt == render_prompt(SETTINGS["prompt"], data["metadata"]["parameters"])
    assert data["metadata"]["parameters"]["number_of_scenes"] == 2

    raw = json.loads(debug_entry(messages, "raw reply from Gemini"))
    assert raw["scenes"] == data["scenes"]


async def test_debug_off_logs_nothing_to_debug_logger(make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="mvserver.debug")
    client = await make_client(MV_DEBUG_MODE="false")
    response = await client.post(URL, json=body())
    assert response.status == 200
    assert debug_messages(caplog) == []


async def test_every_default_and_the_prompt_come_from_yaml(
    make_client, sim: Simulator, caplog, settings_dir: Path
) -> None:
    """``settings_dir`` (conftest) is the copy of ``settings/`` the app under test loads."""
    scenes = yaml.safe_load((settings_dir / "scenes.yaml").read_text())
    scenes["model"] = "gemini-test-model"
    scenes["defaults"]["camera_angle"] = "bird's-eye drone"
    scenes["defaults"]["video_characteristics"] = "grainy 16mm film, handheld"
    scenes["defaults"]["number_of_scenes"] = 2
    marker = "You are QA-MARKER-7, a prompt writer for a text-to-video model."
    scenes["prompt"] = scenes["prompt"].replace(scenes["prompt"].split("\n", 1)[0], marker)
    (settings_dir / "scenes.yaml").write_text(yaml.safe_dump(scenes, sort_keys=False))

    caplog.set_level(logging.INFO, logger="mvserver.debug")
    client = await make_client(MV_DEBUG_MODE="1")
    response = await client.post(URL, json=body())
    assert response.status == 200, await response.text()
    data = await response.json()

    meta = data["metadata"]
    prompt = debug_entry(debug_messages(caplog), "prompt sent to Gemini")
    assert prompt.startswith(marker)
    assert "bird's-eye drone" in prompt and "grainy 16mm film, handheld" in prompt
    assert DEFAULTS["video_characteristics"] not in prompt
    assert prompt == render_prompt(scenes["prompt"], meta["parameters"])
    assert meta["model"] == "gemini-test-model"
    assert meta["parameters"]["camera_angle"] == "bird's-eye drone"
    assert meta["parameters"]["video_characteristics"] == "grainy 16mm film, handheld"
    assert meta["parameters"]["number_of_scenes"] == 2 and len(data["scenes"]) == 2
    assert "/models/gemini-test-model:generateContent" in generate_calls(sim)[0]


# -- bad input ------------------------------------------------------------------------------------------------

LIMIT = SETTINGS["limits"]["text_max_chars"]


@pytest.mark.parametrize(
    ("payload", "code", "field"),
    [
        pytest.param(b'{"idea": "x",', "invalid_json", None, id="invalid-json"),
        pytest.param(b"\xff\xfe not utf-8", "invalid_json", None, id="not-utf8"),
        pytest.param(b"", "invalid_json", None, id="empty-body"),
        pytest.param(json.dumps([body()]).encode(), "invalid_json", None, id="json-array"),
        pytest.param({"character_description": CHARACTER}, "missing_field", "idea", id="missing-idea"),
        pytest.param({"idea": IDEA}, "missing_field", "character_description", id="missing-character"),
        pytest.param(
            body(character_description="   \n\t "), "invalid_field", "character_description", id="blank-character"
        ),
        pytest.param(body(character_description=""), "invalid_field", "character_description", id="empty-character"),
        pytest.param(body(number_of_scenes="4"), "invalid_field", "number_of_scenes", id="count-string"),
        pytest.param(body(idea=5), "invalid_field", "idea", id="idea-number"),
        pytest.param(body(idea=None), "invalid_field", "idea", id="idea-null"),
        pytest.param(body(number_of_scenes=True), "invalid_field", "number_of_scenes", id="count-bool"),
        pytest.param(body(number_of_scenes=4.5), "invalid_field", "number_of_scenes", id="count-fraction"),
        pytest.param(body(number_of_scenes=0), "invalid_field", "number_of_scenes", id="count-zero"),
        pytest.param(body(number_of_scenes=13), "invalid_field", "number_of_scenes", id="count-13"),
        pytest.param(body(number_of_scenes=-1), "invalid_field", "number_of_scenes", id="count-negative"),
        pytest.param(body(camera_angle=["front"]), "invalid_field", "camera_angle", id="angle-list"),
        pytest.param(body(mood="happy"), "unknown_field", "mood", id="unknown-field"),
        pytest.param(body(idea="x" * (LIMIT + 1)), "invalid_field", "idea", id="idea-too-long"),
        pytest.param(
            body(video_characteristics="y" * (LIMIT + 1)), "invalid_field", "video_characteristics", id="style-too-long"
        ),
    ],
)
@shared
async def test_bad_input_is_400_naming_the_field(app: Shared, payload: Any, code: str, field: str | None) -> None:
    client, sim = app
    if isinstance(payload, bytes):
        response = await client.post(URL, data=payload, headers={"Content-Type": "application/json"})
    else:
        response = await client.post(URL, json=payload)
    await assert_error(response, 400, code, field)
    assert generate_calls(sim) == []  # nothing reaches the provider


@shared
async def test_text_at_the_limit_is_accepted(app: Shared) -> None:
    client, _ = app
    response = await client.post(URL, json=body(idea="x" * LIMIT, number_of_scenes=1))
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("count", [1, 12])
@shared
async def test_number_of_scenes_bounds_are_accepted(app: Shared, count: int) -> None:
    client, _ = app
    response = await client.post(URL, json=body(number_of_scenes=count))
    assert response.status == 200, await response.text()
    assert len((await response.json())["scenes"]) == count


@shared
async def test_wrong_method_is_405_json(app: Shared) -> None:
    client, _ = app
    response = await client.get(URL)
    await assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# -- provider failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "google_body", "ours", "code"),
    [
        (401, GOOGLE_401, 502, "provider_auth_failed"),
        (
            403,
            {
                "error": {
                    "code": 403,
                    "message": "Permission denied on resource project.",
                    "status": "PERMISSION_DENIED",
                }
            },
            502,
            "provider_auth_failed",
        ),
        (
            400,
            {"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}},
            422,
            "provider_rejected_input",
        ),
        (500, GOOGLE_500, 502, "provider_unavailable"),
        (
            503,
            {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
            502,
            "provider_unavailable",
        ),
    ],
)
@shared
async def test_provider_http_errors_keep_status_and_words(
    app: Shared, status: int, google_body: dict, ours: int, code: str
) -> None:
    client, sim = app
    sim.add_fault("gemini.generate", "status", status=status, body=google_body)
    response = await client.post(URL, json=body())
    error = await assert_error(response, ours, code)
    assert error["provider"] == "gemini"
    assert error["provider_status"] == status
    words = google_body["error"]["message"]
    assert words in error["message"]
    assert words in json.dumps(error["provider_error"])
    assert len(generate_calls(sim)) == 1  # an error answer is not retried as a malformed reply


@shared
async def test_provider_rate_limit_is_429_with_retry_after(app: Shared) -> None:
    client, sim = app
    sim.add_fault("gemini.generate", "status", status=429, body=GOOGLE_429, retry_after=7)
    response = await client.post(URL, json=body())
    error = await assert_error(response, 429, "provider_rate_limited")
    assert error["provider"] == "gemini" and error["provider_status"] == 429
    assert "Resource has been exhausted" in error["message"]
    assert "RESOURCE_EXHAUSTED" in json.dumps(error["provider_error"])
    assert response.headers.get("Retry-After") == "7"


@shared
async def test_a_rejected_api_key_is_an_auth_failure_not_bad_input(app: Shared) -> None:
    """Google answers an invalid key with 400 INVALID_ARGUMENT and reason API_KEY_INVALID."""
    client, sim = app
    google_400 = {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        }
    }
    sim.add_fault("gemini.generate", "status", status=400, body=google_400)
    response = await client.post(URL, json=body())
    error = await assert_error(response, 502, "provider_auth_failed")
    assert error["provider_status"] == 400 and "API_KEY_INVALID" in json.dumps(error["provider_error"])


@shared
async def test_one_malformed_reply_is_retried(app: Shared) -> None:
    client, sim = app
    sim.add_fault("gemini.generate", "fail_prediction")
    response = await client.post(URL, json=body(number_of_scenes=3))
    assert response.status == 200, await response.text()
    data = await response.json()
    assert data["metadata"]["attempts"] == 2
    assert len(data["scenes"]) == 3
    assert len(generate_calls(sim)) == 2


@shared
async def test_two_malformed_replies_are_502(app: Shared) -> None:
    client, sim = app
    before = await artefact_keys(client, "scenes")
    sim.add_fault("gemini.generate", "fail_prediction", times=2)
    response = await client.post(URL, json=body())
    error = await assert_error(response, 502, "provider_malformed_output")
    assert error["provider"] == "gemini"
    assert len(generate_calls(sim)) == 2
    assert await artefact_keys(client, "scenes") == before  # nothing saved


@shared
async def test_wrong_scene_count_is_retried_then_502(app: Shared) -> None:
    client, sim = app
    one_scene = '{"scenes": [{"description": "a", "negative_description": "b"}]}'
    sim.add_fault("gemini.generate", "fail_prediction", error=one_scene, times=2)
    response = await client.post(URL, json=body(number_of_scenes=3))
    error = await assert_error(response, 502, "provider_malformed_output")
    assert "3" in error["message"]
    assert len(generate_calls(sim)) == 2


@shared
async def test_wrong_scene_count_once_then_right(app: Shared) -> None:
    client, sim = app
    one_scene = '{"scenes": [{"description": "a", "negative_description": "b"}]}'
    sim.add_fault("gemini.generate", "fail_prediction", error=one_scene)
    response = await client.post(URL, json=body(number_of_scenes=3))
    assert response.status == 200, await response.text()
    data = await response.json()
    assert data["metadata"]["attempts"] == 2 and len(data["scenes"]) == 3


@shared
async def test_blank_scene_description_counts_as_malformed(app: Shared) -> None:
    client, sim = app
    blank = '{"scenes": [{"description": "  ", "negative_description": "b"}]}'
    sim.add_fault("gemini.generate", "fail_prediction", error=blank, times=2)
    response = await client.post(URL, json=body(number_of_scenes=1))
    await assert_error(response, 502, "provider_malformed_output")


# -- sandbox without an API key ------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_missing_api_key_runs_scenes_in_sandbox(make_client, sim: Simulator) -> None:
    client = await make_client(GEMINI_API_KEY=None)
    health = await (await client.get("/api/mv/health")).json()
    assert health["providers"]["gemini_scenes"] == "sandbox"
    assert health["providers"]["replicate"] == "live"
    assert health["mode"] == "sandbox"

    response = await client.post(URL, json=body(number_of_scenes=2))
    assert response.status == 200, await response.text()
    data = await response.json()
    assert data["sandbox"] is True and data["metadata"]["sandbox"] is True
    assert len(data["scenes"]) == 2
    assert generate_calls(sim) == []  # answered by the app's own simulator, not the configured URL
    markdown = (await artefact(client, f"scenes/{data['scenes_id']}.md")).decode()
    assert "sandbox" in markdown.split("\n", 1)[0]


async def test_blank_api_key_counts_as_missing(make_client) -> None:
    client = await make_client(GEMINI_API_KEY="   ")
    health = await (await client.get("/api/mv/health")).json()
    assert health["providers"]["gemini_scenes"] == "sandbox"


# -- concurrency ----------------------------------------------------------------------------------------------


@shared
async def test_concurrent_requests_do_not_block_each_other(app: Shared) -> None:
    client, sim = app
    sim.scenes_latency = 0.5
    started = time.monotonic()
    responses = await asyncio.gather(
        *(client.post(URL, json=body(number_of_scenes=1, idea=f"idea {i}")) for i in range(20))
    )
    elapsed = time.monotonic() - started
    assert [r.status for r in responses] == [200] * 20
    ids = {(await r.json())["scenes_id"] for r in responses}
    assert len(ids) == 20
    assert 0.5 <= elapsed < 3.0, elapsed  # the latency was really applied, and the requests overlapped
    assert len(generate_calls(sim)) == 20
