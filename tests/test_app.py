"""The service as a whole: start-up without keys, health, the OpenAPI document and the JSON error shape."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer
from helpers import get_json, running_server

from mvserver.app import create_app

PROJECT = Path(__file__).resolve().parent.parent
SETTINGS = {
    name: yaml.safe_load((PROJECT / "settings" / f"{name}.yaml").read_text()) for name in ("scenes", "images", "videos")
}
SERVICES = ("gemini_scenes", "replicate", "gemini_video")
DOCUMENTED_PATHS = {
    "/api/mv/health": {"get"},
    "/api/mv/create_scenes": {"post"},
    "/api/mv/generate_character_reference": {"post"},
    "/api/mv/get_image/{image_id}": {"get"},
    "/api/mv/generate_video": {"post"},
    "/api/mv/jobs/{job_id}": {"get", "delete"},
    "/api/mv/jobs/{job_id}/events": {"get"},
    "/api/mv/get_video/{video_id}": {"get"},
}


# -- python -m mvserver ----------------------------------------------------------------------------------------


def test_server_without_keys_starts_in_sandbox_mode(tmp_path: Path) -> None:
    with running_server(tmp_path, signal.SIGINT) as (port, log, exit_code):
        status, health = get_json(f"http://127.0.0.1:{port}/api/mv/health")
        assert status == 200
        assert health["mode"] == "sandbox" and health["sandbox"] is True
        assert health["providers"] == {name: "sandbox" for name in SERVICES}
        assert health["status"] == "ok" and health["version"]
        status, scenes = get_json(f"http://127.0.0.1:{port}/api/mv/get_scenes/not-an-id.json")
        assert status == 400 and scenes["error"]["code"] == "invalid_id"
    output = log.read_text()
    assert exit_code == [0], output
    sandbox_line = next(line for line in output.splitlines() if "sandbox mode:" in line)
    assert all(name in sandbox_line for name in SERVICES), sandbox_line
    providers_line = next(line for line in output.splitlines() if "providers:" in line)
    assert all(f"{name}=sandbox" in providers_line for name in SERVICES), providers_line
    assert "Traceback" not in output and "Unclosed" not in output
    assert (tmp_path / "outputs" / "scenes").is_dir()


def debug_record(output: str, title: str) -> Any:
    """The JSON payload printed after the ``[MV_DEBUG] <title>:`` line of the server's output."""
    marker = f"[MV_DEBUG] {title}:\n"
    assert marker in output, output
    return json.JSONDecoder().raw_decode(output, output.index(marker) + len(marker))[0]


def test_debug_mode_prints_prefixed_records_on_the_server_output(tmp_path: Path) -> None:
    """What an operator sees from ``MV_DEBUG_MODE=true python -m mvserver``: every record carries ``[MV_DEBUG]``,
    and the Imagen input object is printed as sent."""
    with running_server(tmp_path, signal.SIGTERM, MV_DEBUG_MODE="true") as (port, log, exit_code):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/mv/generate_character_reference",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {"character_description": "a knight in a paper crown", "aspect_ratio": "3:4", "seed": 7}
            ).encode(),
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
    output = log.read_text()
    assert exit_code == [0], output
    debug_lines = [line for line in output.splitlines() if " mvserver.debug: " in line]
    assert len(debug_lines) >= 5 and all(" mvserver.debug: [MV_DEBUG] " in line for line in debug_lines), debug_lines
    assert debug_record(output, "config params loaded at start-up")["env"]["replicate_api_token"] == "unset"
    sent = debug_record(output, "generate_character_reference input for google/imagen-4")
    assert sent == {
        "prompt": body["metadata"]["prompt"],
        "aspect_ratio": "3:4",
        "seed": 7,
        "safety_filter_level": SETTINGS["images"]["defaults"]["safety_filter_level"],
        "person_generation": SETTINGS["images"]["defaults"]["person_generation"],
        "output_format": SETTINGS["images"]["defaults"]["output_format"],
    }


def test_server_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with running_server(tmp_path, signal.SIGTERM) as (_, log, exit_code):
        pass
    assert exit_code == [0], log.read_text()
    assert "Traceback" not in log.read_text()


# -- health -----------------------------------------------------------------------------------------------------


async def test_health_with_every_key_is_live(client: TestClient) -> None:
    response = await client.get("/api/mv/health")
    assert response.status == 200
    health = await response.json()
    assert health["mode"] == "live" and health["sandbox"] is False
    assert health["providers"] == {name: "live" for name in SERVICES}
    assert health["auth"] == {"keys_required": False}


async def test_mv_sandbox_forces_every_provider_into_sandbox(make_client) -> None:
    client = await make_client(MV_SANDBOX="true")
    health = await (await client.get("/api/mv/health")).json()
    assert health["mode"] == "sandbox"
    assert health["providers"] == {name: "sandbox" for name in SERVICES}


# -- read-only endpoints, on one app shared by this module ----------------------------------------------------------

shared = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app_client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestClient]:
    """One app (every provider sandboxed) for the tests that only read: building an app per test is slow."""
    env = {
        "MV_SANDBOX": "true",
        "MV_OUTPUT_DIR": str(tmp_path_factory.mktemp("outputs")),
        "MV_SETTINGS_DIR": str(PROJECT / "settings"),
    }
    async with TestClient(TestServer(create_app(env))) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def openapi(app_client: TestClient) -> dict[str, Any]:
    response = await app_client.get("/api/mv/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    return await response.json()


def resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def request_schema(doc: dict[str, Any], path: str) -> dict[str, Any]:
    body = doc["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    return resolve(doc, body["content"]["application/json"]["schema"]["$ref"])


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for value in node.values() for r in all_refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in all_refs(value)]
    return []


@shared
async def test_openapi_is_a_3_1_document_listing_every_path(openapi: dict[str, Any]) -> None:
    assert openapi["openapi"].startswith("3.1.")
    assert openapi["info"]["title"] and openapi["info"]["version"]
    for path, methods in DOCUMENTED_PATHS.items():
        assert path in openapi["paths"], path
        assert set(openapi["paths"][path]) >= methods, path
        for method in methods:
            operation = openapi["paths"][path][method]
            assert operation["summary"]
            assert any(code.startswith("2") for code in operation["responses"]), (path, method)
            for name in (p[1:-1] for p in path.split("/") if p.startswith("{")):
                params = {p["name"]: p for p in operation["parameters"]}
                assert params[name]["in"] == "path" and params[name]["required"] is True
    refs = all_refs(openapi)
    assert refs
    for ref in refs:
        assert isinstance(resolve(openapi, ref), dict), ref
    error = openapi["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message"]


def served_routes(client: TestClient) -> set[tuple[str, str]]:
    """(path, method) of every API route the app serves (the OpenAPI document itself aside)."""
    return {
        (resource.canonical, route.method.lower())
        for resource in client.app.router.resources()
        for route in resource
        if resource.canonical.startswith("/api/mv/")
        and resource.canonical != "/api/mv/openapi.json"
        and route.method != "HEAD"
    }


@shared
async def test_every_documented_operation_is_served(app_client: TestClient, openapi: dict[str, Any]) -> None:
    documented = {(path, method) for path, operations in openapi["paths"].items() for method in operations}
    assert documented - served_routes(app_client) == set()


@shared
async def test_openapi_documents_every_served_route(app_client: TestClient, openapi: dict[str, Any]) -> None:
    served = served_routes(app_client)
    assert served
    undocumented = sorted((path, method) for path, method in served if method not in openapi["paths"].get(path, {}))
    assert undocumented == [], undocumented


@shared
async def test_openapi_request_schemas_carry_yaml_defaults_and_enums(openapi: dict[str, Any]) -> None:
    scenes = request_schema(openapi, "/api/mv/create_scenes")
    settings = SETTINGS["scenes"]
    assert sorted(scenes["required"]) == ["character_description", "idea"]
    assert scenes["additionalProperties"] is False
    props = scenes["properties"]
    for name, value in settings["defaults"].items():
        assert props[name]["default"] == value, name
    assert props["number_of_scenes"]["type"] == "integer"
    assert props["number_of_scenes"]["minimum"] == settings["limits"]["number_of_scenes"]["min"]
    assert props["number_of_scenes"]["maximum"] == settings["limits"]["number_of_scenes"]["max"]
    assert props["idea"]["maxLength"] == settings["limits"]["text_max_chars"]

    image = request_schema(openapi, "/api/mv/generate_character_reference")
    settings = SETTINGS["images"]
    assert image["required"] == ["character_description"]
    for name, allowed in settings["allowed"].items():
        assert image["properties"][name]["enum"] == allowed, name
        assert image["properties"][name]["default"] == settings["defaults"][name], name

    video = request_schema(openapi, "/api/mv/generate_video")
    settings = SETTINGS["videos"]
    assert video["required"] == ["prompt"]
    props = video["properties"]
    assert props["aspect_ratio"]["enum"] == settings["allowed"]["aspect_ratio"]
    assert props["duration"]["enum"] == settings["allowed"]["duration"]
    assert props["duration"]["default"] == settings["defaults"]["duration"]
    assert props["generate_audio"]["default"] is settings["defaults"]["generate_audio"]
    assert props["backend"]["enum"] == ["replicate", "gemini"]
    assert props["backend"]["default"] == settings["default_backend"]


async def test_openapi_follows_the_settings_it_was_started_with(make_client, settings_dir: Path) -> None:
    images = yaml.safe_load((settings_dir / "images.yaml").read_text())
    images["allowed"]["aspect_ratio"] = ["1:1", "21:9"]
    images["defaults"]["aspect_ratio"] = "21:9"
    (settings_dir / "images.yaml").write_text(yaml.safe_dump(images))
    scenes = yaml.safe_load((settings_dir / "scenes.yaml").read_text())
    scenes["defaults"]["camera_angle"] = "dutch tilt"
    scenes["limits"]["number_of_scenes"]["max"] = 6
    (settings_dir / "scenes.yaml").write_text(yaml.safe_dump(scenes))

    client = await make_client()  # its MV_SETTINGS_DIR is settings_dir
    doc = await (await client.get("/api/mv/openapi.json")).json()
    image = request_schema(doc, "/api/mv/generate_character_reference")["properties"]["aspect_ratio"]
    assert image["enum"] == ["1:1", "21:9"] and image["default"] == "21:9"
    props = request_schema(doc, "/api/mv/create_scenes")["properties"]
    assert props["camera_angle"]["default"] == "dutch tilt"
    assert props["number_of_scenes"]["maximum"] == 6


# -- JSON error shape -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/mv/nope",
        "/nope",
        "/api/mv/create_scenes/extra",
        "/api/mv/health/",
        "/api/mv/get_video",
        "/static/nope.js",
        "/static/..%2Fsettings%2Fscenes.yaml",
    ],
)
@shared
async def test_unknown_route_is_404_json(app_client: TestClient, path: str) -> None:
    response = await app_client.get(path)
    assert response.status == 404
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "not_found" and body["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/mv/create_scenes", "POST"),
        ("PUT", "/api/mv/create_scenes", "POST"),
        ("DELETE", "/api/mv/health", "GET"),
        ("POST", "/api/mv/openapi.json", "GET"),
    ],
)
@shared
async def test_wrong_method_is_405_json(app_client: TestClient, method: str, path: str, allowed: str) -> None:
    response = await app_client.request(method, path)
    assert response.status == 405
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "method_not_allowed" and body["error"]["message"]
    assert allowed in response.headers["Allow"]


async def test_oversized_body_is_413_json(make_client) -> None:
    client = await make_client(MV_MAX_BODY_MB="0.001")
    payload = {"idea": "x" * 5000, "character_description": "y"}
    response = await client.post("/api/mv/create_scenes", json=payload)
    assert response.status == 413
    body = await response.json()
    assert body["error"]["code"] == "request_too_large"
    assert "1048" in body["error"]["message"]
