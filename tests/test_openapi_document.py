"""The OpenAPI document as a whole: what a client generator needs from it, and that it never loses what clients
were already generated from.

``tests/data/openapi-before.json`` is the document as it was served before operation ids and response schemas were
added (``keys_off``: as shipped; ``keys_on``: API keys and ``/metrics`` on), fetched from real apps on the shipped
settings. It is a frozen snapshot, never regenerated: every operation, parameter, request and response media type,
status and component schema in it must still be served, unchanged (additions are fine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from mvserver.app import create_app
from mvserver.auth import KeyLimits, create_key

PROJECT = Path(__file__).resolve().parent.parent
BEFORE = json.loads((PROJECT / "tests" / "data" / "openapi-before.json").read_text())
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

shared = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def documents(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, dict[str, Any]]]:
    """The served document with keys off, and with keys and metrics on, from apps on the shipped settings."""
    tmp = tmp_path_factory.mktemp("openapi")
    base = {"MV_SANDBOX": "true", "MV_OUTPUT_DIR": str(tmp / "outputs"), "MV_SETTINGS_DIR": str(PROJECT / "settings")}
    _, key = create_key(tmp / "keys.yaml", "openapi", KeyLimits())
    keyed = {**base, "MV_API_KEYS_FILE": str(tmp / "keys.yaml"), "MV_URL_SIGNING_SECRET": "s" * 40,
             "MV_METRICS": "true"}
    served: dict[str, dict[str, Any]] = {}
    for name, env, headers in (("keys_off", base, {}), ("keys_on", keyed, {"Authorization": f"Bearer {key}"})):
        async with TestClient(TestServer(create_app(env))) as client:
            response = await client.get("/api/mv/openapi.json", headers=headers)
            assert response.status == 200
            served[name] = await response.json()
    yield served


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(path, method): operation for path, item in document["paths"].items()
            for method, operation in item.items() if method in METHODS}


def without_descriptions(node: Any) -> Any:
    """A schema with its prose left out: descriptions may be reworded, the shape may not change."""
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key not in ("description", "title")}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


@shared
@pytest.mark.parametrize("variant", ["keys_off", "keys_on"])
async def test_everything_the_old_document_described_is_still_served(documents: dict[str, dict[str, Any]],
                                                                    variant: str) -> None:
    before, now = BEFORE[variant], documents[variant]
    missing: list[str] = []
    now_operations = operations(now)
    for (path, method), old in operations(before).items():
        label = f"{method.upper()} {path}"
        new = now_operations.get((path, method))
        if new is None:
            missing.append(f"{label}: operation")
            continue
        new_parameters = {(p["name"], p["in"]): p for p in new.get("parameters", [])}
        for parameter in old.get("parameters", []):
            current = new_parameters.get((parameter["name"], parameter["in"]))
            if current is None:
                missing.append(f"{label}: parameter {parameter['name']}")
            elif (current.get("required", False) != parameter.get("required", False)
                  or without_descriptions(current["schema"]) != without_descriptions(parameter["schema"])):
                missing.append(f"{label}: parameter {parameter['name']} changed")
        if "requestBody" in old:
            body = new.get("requestBody")
            if body is None:
                missing.append(f"{label}: request body")
            else:
                if body.get("required", False) and not old["requestBody"].get("required", False):
                    missing.append(f"{label}: request body became required")
                missing += [f"{label}: request body {kind}" for kind in old["requestBody"]["content"]
                            if kind not in body["content"]]
        for status, answer in old["responses"].items():
            if status not in new["responses"]:
                missing.append(f"{label}: response {status}")
                continue
            content = new["responses"][status].get("content", {})
            missing += [f"{label}: response {status} {kind}" for kind in answer.get("content", {})
                        if kind not in content]
        if "security" in old and old["security"] != new.get("security"):
            missing.append(f"{label}: security")
    if "security" in before and before["security"] != now.get("security"):
        missing.append("document security")
    now_schemas = now["components"]["schemas"]
    for name, old in before["components"]["schemas"].items():
        new = now_schemas.get(name)
        if new is None:
            missing.append(f"schema {name}")
            continue
        for prop, old_schema in old.get("properties", {}).items():
            if prop not in new.get("properties", {}):
                missing.append(f"schema {name}: property {prop}")
            elif without_descriptions(new["properties"][prop]) != without_descriptions(old_schema):
                missing.append(f"schema {name}: property {prop} changed")
        if not set(new.get("required", [])) <= set(old.get("required", [])):
            missing.append(f"schema {name}: new required properties")
        if new.get("additionalProperties", True) != old.get("additionalProperties", True):
            missing.append(f"schema {name}: additionalProperties changed")
    for name in before["components"].get("securitySchemes", {}):
        if name not in now["components"].get("securitySchemes", {}):
            missing.append(f"security scheme {name}")
    assert not missing, "\n".join(missing)
