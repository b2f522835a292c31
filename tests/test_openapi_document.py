"""The OpenAPI document as a whole: what a client generator needs from it, and that it never loses what clients
were already generated from.

``tests/data/openapi-before.json`` is the document as it was served before operation ids and response schemas were
added (``keys_off``: as shipped; ``keys_on``: API keys and ``/metrics`` on), fetched from real apps on the shipped
settings. It is a frozen snapshot, never regenerated: every operation, parameter, request and response media type,
status and component schema in it must still be served, unchanged (additions are fine).

``tests/data/openapi-served.json`` is the whole document as served when the code moved into feature packages (the
same two variants): the layout changed, the API did not. Every operation, parameter, request body, response and
component schema must be served exactly as in that copy; a deliberate change to the API updates the copy with it.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import jsonschema_rs
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from helpers import AppClient, read_sse

from mvserver.app import create_app
from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import KeyLimits, create_key

PROJECT = Path(__file__).resolve().parent.parent
BEFORE = json.loads((PROJECT / "tests" / "data" / "openapi-before.json").read_text())
SERVED = json.loads((PROJECT / "tests" / "data" / "openapi-served.json").read_text())
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

shared = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def documents(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, dict[str, Any]]]:
    """The served document with keys off, and with keys and metrics on, from apps on the shipped settings."""
    tmp = tmp_path_factory.mktemp("openapi")
    base = {"MV_SANDBOX": "true", "MV_OUTPUT_DIR": str(tmp / "outputs"), "MV_SETTINGS_DIR": str(PROJECT / "settings")}
    _, key = create_key(tmp / "keys.yaml", "openapi", KeyLimits())
    keyed = {
        **base,
        "MV_API_KEYS_FILE": str(tmp / "keys.yaml"),
        "MV_URL_SIGNING_SECRET": "s" * 40,
        "MV_METRICS": "true",
    }
    served: dict[str, dict[str, Any]] = {}
    for name, env, headers in (("keys_off", base, {}), ("keys_on", keyed, {"Authorization": f"Bearer {key}"})):
        async with TestClient(TestServer(create_app(env))) as client:
            response = await client.get("/api/mv/openapi.json", headers=headers)
            assert response.status == 200
            served[name] = await response.json()
    yield served


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, method): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def without_descriptions(node: Any) -> Any:
    """A schema with its prose left out: descriptions may be reworded, the shape may not change."""
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key not in ("description", "title")}
    if isinstance(node, list):
        return [without_descriptions(value) for value in node]
    return node


@shared
@pytest.mark.parametrize("variant", ["keys_off", "keys_on"])
async def test_everything_the_old_document_described_is_still_served(
    documents: dict[str, dict[str, Any]], variant: str
) -> None:
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
            elif current.get("required", False) != parameter.get("required", False) or without_descriptions(
                current["schema"]
            ) != without_descriptions(parameter["schema"]):
                missing.append(f"{label}: parameter {parameter['name']} changed")
        if "requestBody" in old:
            body = new.get("requestBody")
            if body is None:
                missing.append(f"{label}: request body")
            else:
                if body.get("required", False) and not old["requestBody"].get("required", False):
                    missing.append(f"{label}: request body became required")
                missing += [
                    f"{label}: request body {kind}"
                    for kind in old["requestBody"]["content"]
                    if kind not in body["content"]
                ]
        for status, answer in old["responses"].items():
            if status not in new["responses"]:
                missing.append(f"{label}: response {status}")
                continue
            content = new["responses"][status].get("content", {})
            missing += [
                f"{label}: response {status} {kind}" for kind in answer.get("content", {}) if kind not in content
            ]
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


@shared
@pytest.mark.parametrize("variant", ["keys_off", "keys_on"])
async def test_the_document_is_exactly_the_one_served_before_the_layout_changed(
    documents: dict[str, dict[str, Any]], variant: str
) -> None:
    saved, now = SERVED[variant], documents[variant]
    saved_operations, now_operations = operations(saved), operations(now)
    changed = [
        f"{method.upper()} {path}"
        for path, method in sorted(set(saved_operations) | set(now_operations))
        if saved_operations.get((path, method)) != now_operations.get((path, method))
    ]
    changed += [
        f"path item {path}: {key}"
        for path in sorted(set(saved["paths"]) | set(now["paths"]))
        for key in sorted(set(saved["paths"].get(path, {})) | set(now["paths"].get(path, {})))
        if key not in METHODS and saved["paths"].get(path, {}).get(key) != now["paths"].get(path, {}).get(key)
    ]
    for part in sorted(set(saved["components"]) | set(now["components"])):
        old, new = saved["components"].get(part, {}), now["components"].get(part, {})
        changed += [f"{part} {name}" for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    changed += [key for key in ("openapi", "security") if saved.get(key) != now.get(key)]
    assert not changed, "changed since tests/data/openapi-served.json:\n" + "\n".join(changed)


# -- what a client generator needs ------------------------------------------------------------------------------------

# Pinned: a generated client's method names. Renaming one breaks every client built on it.
OPERATION_IDS = {
    ("/api/mv/health", "get"): "getHealth",
    ("/api/mv/health/live", "get"): "getLiveness",
    ("/api/mv/health/ready", "get"): "getReadiness",
    ("/api/mv/me", "get"): "getMe",
    ("/api/mv/create_scenes", "post"): "createScenes",
    ("/api/mv/get_scenes/{scenes_id}.{ext}", "get"): "getScenes",
    ("/api/mv/generate_character_reference", "post"): "generateCharacterReference",
    ("/api/mv/get_image/{image_id}", "get"): "getImage",
    ("/api/mv/generate_video", "post"): "generateVideo",
    ("/api/mv/lipsync", "post"): "startLipsync",
    ("/api/mv/assemble", "post"): "startAssembly",
    ("/api/mv/jobs", "get"): "listJobs",
    ("/api/mv/jobs/{job_id}", "get"): "getJob",
    ("/api/mv/jobs/{job_id}", "delete"): "cancelJob",
    ("/api/mv/jobs/{job_id}/cancel", "post"): "cancelJobByPost",
    ("/api/mv/jobs/{job_id}/events", "get"): "streamJobEvents",
    ("/api/mv/jobs/{job_id}/deliveries", "get"): "listJobWebhookDeliveries",
    ("/api/mv/jobs/{job_id}/redeliver", "post"): "startWebhookRedelivery",
    ("/api/mv/events", "get"): "streamEvents",
    ("/api/mv/usage", "get"): "getUsage",
    ("/api/mv/events/link", "get"): "getEventsLink",
    ("/api/mv/get_poster/{video_id}", "get"): "getPoster",
    ("/api/mv/projects/{project_id}/events", "get"): "streamProjectEvents",
    ("/api/mv/projects/{project_id}/events/link", "get"): "getProjectEventsLink",
    ("/api/mv/get_video/{video_id}", "get"): "getVideo",
    ("/api/mv/webhooks/replicate", "post"): "receiveReplicateWebhook",
    ("/api/mv/upload_audio", "post"): "uploadAudio",
    ("/api/mv/get_audio/{audio_id}", "get"): "getAudio",
    ("/api/mv/songs/{audio_id}", "get"): "getSong",
    ("/api/mv/projects", "post"): "createProject",
    ("/api/mv/projects/{project_id}", "get"): "getProject",
    ("/api/mv/projects/{project_id}", "patch"): "updateProject",
    ("/api/mv/projects/{project_id}/write_scenes", "post"): "writeProjectScenes",
    ("/api/mv/projects/{project_id}/character", "post"): "generateProjectCharacter",
    ("/api/mv/projects/{project_id}/clips", "post"): "startProjectClips",
    ("/api/mv/projects/{project_id}/scenes/{scene_id}/clips", "post"): "startSceneClip",
    ("/api/mv/projects/{project_id}/assemble", "post"): "startProjectAssembly",
    ("/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync", "post"): "startSceneLipsync",
    ("/api/mv/projects/{project_id}/timeline", "get"): "getProjectTimeline",
    ("/metrics", "get"): "getMetrics",
}
VERBS = ("get", "list", "create", "update", "generate", "start", "cancel", "stream", "upload", "receive", "write")
ERROR_REF = {"$ref": "#/components/schemas/Error"}
PUBLIC = {
    ("/api/mv/health", "get"),
    ("/api/mv/health/live", "get"),
    ("/api/mv/health/ready", "get"),
    ("/api/mv/webhooks/replicate", "post"),
}
# POSTs that draw on a key's quotas: with keys on, each may answer 429
CHARGED = {
    (path, "post")
    for path in (
        "/api/mv/create_scenes",
        "/api/mv/generate_character_reference",
        "/api/mv/generate_video",
        "/api/mv/lipsync",
        "/api/mv/assemble",
        "/api/mv/projects/{project_id}/write_scenes",
        "/api/mv/projects/{project_id}/character",
        "/api/mv/projects/{project_id}/clips",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/clips",
        "/api/mv/projects/{project_id}/assemble",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync",
    )
}


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


@shared
@pytest.mark.parametrize("variant", ["keys_off", "keys_on"])
async def test_every_operation_has_an_id_response_schemas_errors_and_security(
    documents: dict[str, dict[str, Any]], variant: str
) -> None:
    document, keys = documents[variant], variant == "keys_on"
    problems: list[str] = []
    found = operations(document)
    ids = [operation.get("operationId") for operation in found.values()]
    assert len(set(ids)) == len(ids), "operationIds are not unique"
    expected = {key: name for key, name in OPERATION_IDS.items() if key in found}
    assert {key: operation.get("operationId") for key, operation in found.items()} == expected
    assert len(found) == len(OPERATION_IDS) - (not keys)  # every route (/metrics only with keys on) is pinned above
    for (path, method), operation in found.items():
        label = f"{method.upper()} {path}"
        name = operation["operationId"]
        if not (re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)+", name) and name.startswith(VERBS)):
            problems.append(f"{label}: operationId {name} is not a camelCase verb phrase")
        for status, answer in operation["responses"].items():
            for media_type, entry in answer.get("content", {}).items():
                schema = entry.get("schema")
                if schema is None:
                    problems.append(f"{label} {status} {media_type}: no schema")
                elif int(status) >= 400 and schema != ERROR_REF:
                    problems.append(f"{label} {status}: an error that is not the Error schema")
                elif int(status) < 300 and status != "206" and "json" in media_type:  # 206: a byte range
                    target = schema.get("$ref", "")
                    if not target.startswith("#/components/schemas/") or target == ERROR_REF["$ref"]:
                        problems.append(f"{label} {status}: the success body is not a named schema")
        successes = [status for status in operation["responses"] if status.startswith("2")]
        if not successes or "500" not in operation["responses"]:
            problems.append(f"{label}: no success or no 500 answer")
        body = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None and (path, method) != ("/api/mv/webhooks/replicate", "post"):
            target = body["schema"].get("$ref")
            if target is None or resolve(document, target).get("type") != "object":
                problems.append(f"{label}: the JSON request body is not a named object schema")
        if keys:
            security = [] if (path, method) in PUBLIC else [{"bearerAuth": []}]
            if operation.get("security") != security:
                problems.append(f"{label}: security {operation.get('security')}, not {security}")
            if not path.startswith("/api/mv/health") and "401" not in operation["responses"]:
                problems.append(f"{label}: no 401")
            if (path, method) in CHARGED and "429" not in operation["responses"]:
                problems.append(f"{label}: no 429 for the key's quotas")
        elif "security" in operation or ("401" in operation["responses"] and (path, method) not in PUBLIC):
            problems.append(f"{label}: security or 401 with keys off")
    for ref in refs(document):
        try:
            resolve(document, ref)
        except KeyError:
            problems.append(f"unresolvable {ref}")
    assert not problems, "\n".join(problems)
    assert ("security" in document) == keys


# -- real answers against the document --------------------------------------------------------------------------------


class Documented:
    """A test client whose every answer must be one the document describes for that operation: a listed status, a
    listed media type, a JSON body valid against its schema, the headers it marks required."""

    def __init__(self, client: TestClient, document: dict[str, Any], headers: dict[str, str]):
        self.client, self.document, self.headers = client, document, headers
        self.checked: set[tuple[str, str, str]] = set()

    def validate(self, schema: dict[str, Any], instance: Any, where: str) -> None:
        root = {**schema, "components": self.document["components"]}  # refs resolve against the document
        errors = [str(error) for error in jsonschema_rs.Draft202012Validator(root).iter_errors(instance)]
        assert not errors, f"{where}: {errors[:3]}"

    async def call(
        self,
        method: str,
        template: str,
        *,
        path: dict[str, str] | None = None,
        query: str = "",
        headers: dict[str, str] | None = None,
        expect: int | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """The answer (and its body) to a request of the operation at ``template``; ``expect``: its status (by
        default any success)."""
        url = template.format(**(path or {})) + (f"?{query}" if query else "")
        response = await self.client.request(method, url, headers={**self.headers, **(headers or {})}, **kwargs)
        raw = await response.read()
        where = f"{method} {template} -> {response.status}"
        assert response.status == expect if expect else 200 <= response.status < 300, f"{where}: {raw[:300]!r}"
        answer = self.document["paths"][template][method.lower()]["responses"].get(str(response.status))
        assert answer is not None, f"{where}: status not documented ({raw[:200]!r})"
        for name, header in answer.get("headers", {}).items():
            assert not header["required"] or name in response.headers, f"{where}: no {name} header"
        content = answer.get("content", {})
        if not raw and not content:
            return response, None
        media_type = response.content_type
        documented = [
            kind for kind in content if kind == media_type or (kind.endswith("/*") and media_type.startswith(kind[:-1]))
        ]
        assert documented, f"{where}: {media_type} is not one of {list(content)}"
        self.checked.add((method, template, str(response.status)))
        if media_type != "application/json":
            return response, raw
        body = json.loads(raw)
        assert "schema" in content[documented[0]], f"{where}: the document gives no schema for this body"
        self.validate(content[documented[0]]["schema"], body, where)
        return response, body

    async def events(
        self, template: str, path: dict[str, str] | None = None, query: str = "", first: int | None = None
    ) -> list[dict[str, Any]]:
        """Follow an event stream to its end (or its ``first`` events, for a stream that stays open); each event
        must fit the documented event schema."""
        url = template.format(**(path or {})) + (f"?{query}" if query else "")
        response = await self.client.get(url, headers=self.headers)
        assert response.status == 200, await response.text()
        schema = self.document["paths"][template]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        event_schema = resolve(self.document, schema["$ref"])
        events: list[dict[str, Any]] = []
        async for event in read_sse(response):
            events.append(event)
            if len(events) == first:
                response.close()
                break
        for event in events:
            raw = {**event, "data": json.dumps(event["data"])}
            if "retry" in raw:
                raw["retry"] = int(raw["retry"])
            self.validate(schema, raw, f"{template} event {event['event']}")
            if "contentSchema" in event_schema["properties"]["data"]:
                self.validate(
                    event_schema["properties"]["data"]["contentSchema"],
                    event["data"],
                    f"{template} event {event['event']} data",
                )
        self.checked.add(("GET", template, "200"))
        return events


async def until_final(api: Documented, job_id: str) -> dict[str, Any]:
    """The job's final state, after following its events (validated) to the end."""
    events = await api.events("/api/mv/jobs/{job_id}/events", {"job_id": job_id})
    assert events[-1]["event"] in ("succeeded", "failed", "canceled")
    _, job = await api.call("GET", "/api/mv/jobs/{job_id}", path={"job_id": job_id})
    return job


def tone(tmp_path: Path, seconds: float) -> bytes:
    path = tmp_path / "song.wav"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=330:duration={seconds}",
            str(path),
        ],
        check=True,
        timeout=60,
    )
    return path.read_bytes()


async def test_real_answers_of_the_whole_flow_match_the_document(
    make_client: AppClient, sim: Simulator, tmp_path: Path
) -> None:
    """Every operation's success (and the usual errors) with keys on, so the signed links are in the answers too."""
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(keys_file, "flow", KeyLimits(jobs_per_minute=600, jobs_burst=50, max_running_jobs=50))
    _, scarce = create_key(keys_file, "scarce", KeyLimits(jobs_per_minute=1, jobs_burst=1))
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET="s" * 40)
    document = await (await client.get("/api/mv/openapi.json", headers={"Authorization": f"Bearer {key}"})).json()
    api = Documented(client, document, {"Authorization": f"Bearer {key}"})
    sim.video_latency = 0.1

    await api.call("GET", "/api/mv/health")
    await api.call("GET", "/api/mv/health/live")
    await api.call("GET", "/api/mv/health/ready")
    _, scenes = await api.call(
        "POST",
        "/api/mv/create_scenes",
        json={"idea": "a night train", "character_description": "a singer", "style": "noir"},
    )
    await api.call(
        "GET", "/api/mv/get_scenes/{scenes_id}.{ext}", path={"scenes_id": scenes["scenes_id"], "ext": "json"}
    )
    await api.call("GET", "/api/mv/get_scenes/{scenes_id}.{ext}", path={"scenes_id": scenes["scenes_id"], "ext": "md"})
    _, image = await api.call(
        "POST",
        "/api/mv/generate_character_reference",
        json={"character_description": "a singer", "number_of_images": 2},
    )
    image_path = {"image_id": image["image_id"]}
    await api.call("GET", "/api/mv/get_image/{image_id}", path=image_path)
    await api.call("GET", "/api/mv/get_image/{image_id}", path=image_path, headers={"Range": "bytes=0-9"}, expect=206)
    await api.call(
        "GET", "/api/mv/get_image/{image_id}", path=image_path, headers={"Range": "bytes=0-1,4-5"}, expect=416
    )
    _, song = await api.call(
        "POST", "/api/mv/upload_audio", data=tone(tmp_path, 20.0), headers={"Content-Type": "audio/wav"}
    )
    song_path = {"audio_id": song["audio_id"]}
    _, described = await api.call("GET", "/api/mv/songs/{audio_id}", path=song_path)
    assert described["audio_id"] == song["audio_id"] and described["analysis_status"] == "off"  # the tests' default
    await api.call("GET", "/api/mv/get_audio/{audio_id}", path=song_path, headers={"Range": "bytes=0-99"}, expect=206)
    await api.call(
        "GET", "/api/mv/get_audio/{audio_id}", path=song_path, headers={"Range": "bytes=99999999-"}, expect=416
    )

    _, accepted = await api.call(
        "POST",
        "/api/mv/generate_video",
        headers={"Idempotency-Key": "flow-1"},
        json={"prompt": "she runs for the train", "reference_image_id": image["image_id"]},
    )
    await api.call(
        "POST",
        "/api/mv/generate_video",
        headers={"Idempotency-Key": "flow-1"},
        json={"prompt": "she runs for the train", "reference_image_id": image["image_id"]},
    )  # replayed
    video_id = accepted["job_id"]
    await api.call("GET", "/api/mv/jobs/{job_id}", path={"job_id": video_id})
    assert (await until_final(api, video_id))["status"] == "succeeded"
    _, link = await api.call("GET", "/api/mv/events/link", query=f"jobs={video_id}")
    await api.call("GET", "/api/mv/jobs", query="limit=5")
    await api.events("/api/mv/events", query=link["events_url"].split("?", 1)[1])
    response, _ = await api.call("GET", "/api/mv/get_video/{video_id}", path={"video_id": video_id})
    await api.call("GET", "/api/mv/get_poster/{video_id}", path={"video_id": video_id})
    await api.call(
        "GET",
        "/api/mv/get_video/{video_id}",
        path={"video_id": video_id},
        headers={"If-None-Match": response.headers["ETag"]},
        expect=304,
    )

    _, lipsync = await api.call(
        "POST", "/api/mv/lipsync", json={"video_job_id": video_id, "audio_id": song["audio_id"]}
    )
    _, assembly = await api.call(
        "POST", "/api/mv/assemble", json={"clips": [{"job_id": video_id}], "audio_id": song["audio_id"]}
    )
    for job_id in (lipsync["job_id"], assembly["job_id"]):
        assert (await until_final(api, job_id))["status"] == "succeeded"

    _, project = await api.call(
        "POST",
        "/api/mv/projects",
        json={
            "idea": "a night train",
            "character_description": "a singer",
            "style": "synthwave",
            "audio_id": song["audio_id"],
        },
    )
    pid = {"project_id": project["project_id"]}
    await api.call("GET", "/api/mv/projects/{project_id}", path=pid)
    _, project = await api.call("POST", "/api/mv/projects/{project_id}/write_scenes", path=pid)
    await api.call("POST", "/api/mv/projects/{project_id}/character", path=pid, json={"seed": 7})
    _, started = await api.call("POST", "/api/mv/projects/{project_id}/clips", path=pid, json={"generate_audio": False})
    for job in started["jobs"]:
        assert (await until_final(api, job["job_id"]))["status"] == "succeeded"
    _, project = await api.call("GET", "/api/mv/projects/{project_id}", path=pid)
    await api.call(
        "PATCH",
        "/api/mv/projects/{project_id}",
        path=pid,
        headers={"If-Match": project["etag"]},
        json={"scenes": [{"id": project["scenes"][0]["id"], "trim_in": 0.5}]},
    )
    await api.call(
        "PATCH",
        "/api/mv/projects/{project_id}",
        path=pid,
        headers={"If-Match": project["etag"]},
        json={"scenes": []},
        expect=412,
    )  # the project moved
    await api.call("GET", "/api/mv/projects/{project_id}/timeline", path=pid)
    _, link = await api.call("GET", "/api/mv/projects/{project_id}/events/link", path=pid)
    opened = await api.events("/api/mv/projects/{project_id}/events", pid, link["events_url"].split("?", 1)[1], first=1)
    assert opened[0]["event"] == "project" and opened[0]["data"]["project_id"] == pid["project_id"]
    scene = {**pid, "scene_id": project["scenes"][1]["id"]}  # the first one's trim starts before the song
    _, lipsynced = await api.call(
        "POST", "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync", path=scene, json={"temperature": 0.3}
    )
    _, regenerated = await api.call(
        "POST",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/clips",
        path={**pid, "scene_id": project["scenes"][2]["id"]},
        json={"seed": 3},
    )
    for job_id in (lipsynced["job"]["job_id"], regenerated["job"]["job_id"]):
        await until_final(api, job_id)
    _, assembled = await api.call(
        "POST", "/api/mv/projects/{project_id}/assemble", path=pid, json={"transition": "crossfade"}
    )
    await api.call("DELETE", "/api/mv/jobs/{job_id}", path={"job_id": assembled["job_id"]})
    await api.call("POST", "/api/mv/jobs/{job_id}/cancel", path={"job_id": assembled["job_id"]})
    # a job without a webhook (tests/test_webhooks_out.py covers the deliveries of one with a webhook)
    await api.call("GET", "/api/mv/jobs/{job_id}/deliveries", path={"job_id": assembled["job_id"]})
    await api.call("POST", "/api/mv/jobs/{job_id}/redeliver", path={"job_id": assembled["job_id"]}, expect=404)

    # errors: each in the one Error shape, with the status the document lists
    unknown = {"job_id": "4adfcc62-0cb0-44fc-9ab2-745c4c944eb4"}
    await api.call("GET", "/api/mv/jobs/{job_id}", path=unknown, expect=404)
    await api.call("GET", "/api/mv/jobs/{job_id}", path={"job_id": "abc"}, expect=400)
    await api.call("POST", "/api/mv/generate_video", json={"prompt": "x", "duration": 5}, expect=400)
    await api.call(
        "POST",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/clips",
        path=scene,
        json={"backend": "nope"},
        expect=400,
    )
    await api.call(
        "POST", "/api/mv/generate_video", json={"prompt": "x", "reference_image_id": unknown["job_id"]}, expect=404
    )
    await api.call("GET", "/api/mv/get_video/{video_id}", path={"video_id": assembled["job_id"]}, expect=409)
    _, usage = await api.call("GET", "/api/mv/usage", query="group_by=kind")
    assert usage["totals"]["jobs"] == len(usage["jobs"]) >= 1  # the canceled assembly, at least
    await api.call("GET", "/api/mv/usage", query="group_by=week", expect=400)
    await api.call("POST", "/api/mv/generate_video", data="{}", headers={"Content-Type": "text/plain"}, expect=415)
    api.headers = {}
    await api.call("GET", "/api/mv/projects/{project_id}", path=pid, expect=401)
    api.headers = {"Authorization": f"Bearer {scarce}"}
    await api.call("POST", "/api/mv/generate_video", json={"prompt": "a train"})
    response, _ = await api.call("POST", "/api/mv/generate_video", json={"prompt": "a train"}, expect=429)
    assert response.headers["Retry-After"]  # over the key's job bucket
    _, me = await api.call("GET", "/api/mv/me")
    assert me["tokens"]["jobs"] < 1 and me["limits"]["jobs_burst"] >= 1

    covered = {(method.lower(), template) for method, template, _ in api.checked}
    missing = {key for key in operations(document) if (key[1], key[0]) not in covered}
    assert missing == {("/api/mv/webhooks/replicate", "post")}, missing  # Replicate's, tested with its signatures
