"""Property-based fuzzing of the POST endpoints through the app, with the simulator behind it in normal mode.

Bodies are arbitrary JSON values, arbitrary bytes, valid bodies with one field broken, and bodies drawn from the
app's own OpenAPI document. Whatever arrives: no 5xx; a 4xx is the JSON error shape with ``code`` and ``message`` and
no traceback; a 400 about a field names that field; nothing is written outside ``MV_OUTPUT_DIR``. Video jobs created
along the way are canceled at the end and leave no task behind.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import PROJECT, AppClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mvserver.appkeys import JOBS
from mvserver.sandbox.app import Simulator

ENDPOINTS = {
    "scenes": "/api/mv/create_scenes",
    "image": "/api/mv/generate_character_reference",
    "video": "/api/mv/generate_video",
}
SUCCESS = {"scenes": 200, "image": 200, "video": 202}
SCHEMAS = {"scenes": "CreateScenesRequest", "image": "CharacterReferenceRequest", "video": "GenerateVideoRequest"}
# A valid body with every field spelled out, so that any one of them can be broken.
FULL = {
    "scenes": {
        "idea": "a heist at a roller disco",
        "character_description": "a teenage getaway driver in a gold jacket",
        "character_characteristics": "nervous but brave",
        "number_of_scenes": 2,
        "video_type": "music video",
        "video_characteristics": "neon, 35mm",
        "camera_angle": "low",
    },
    "image": {
        "character_description": "a teenage getaway driver in a gold jacket",
        "aspect_ratio": "1:1",
        "safety_filter_level": "block_only_high",
        "person_generation": "allow_adult",
        "output_format": "png",
        "negative_prompt": "",
        "seed": 7,
    },
    "video": {
        "prompt": "A getaway driver roller-skates through a neon disco.",
        "negative_prompt": "",
        "aspect_ratio": "16:9",
        "duration": 4,
        "generate_audio": True,
        "seed": 1,
        "reference_image_base64": None,
        "reference_image_id": None,
        "video_rules_template": None,
        "backend": "replicate",
    },
}
REQUIRED = {"scenes": {"idea", "character_description"}, "image": {"character_description"}, "video": {"prompt"}}
FIELD_CODES = {"missing_field", "unknown_field", "invalid_field", "invalid_id"}
ERROR_KEYS = {"code", "message", "field", "provider", "provider_status", "provider_error"}
LEAKS = ("Traceback", 'File "')
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
SKIP_DIRS = {".git", ".hypothesis", ".pytest_cache", "__pycache__", ".benchmarks", "node_modules"}

FUZZ = settings(
    max_examples=75,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


def encoded(image_format: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), "purple").save(buffer, image_format)
    return base64.b64encode(buffer.getvalue()).decode()


PNG, JPEG, WEBP = encoded("PNG"), encoded("JPEG"), encoded("WEBP")

# -- strategies ----------------------------------------------------------------------------------------------------


def blank(value: str) -> bool:
    """Empty once pydantic strips it (Unicode White_Space; unlike str.isspace, not the separators U+001C-U+001F)."""
    return not value.translate(SEPARATORS).strip()


SEPARATORS = {c: "x" for c in range(0x1C, 0x20)}


def text(**bounds: int) -> st.SearchStrategy[str]:
    """Any text, minus the simulator's deliberate failure markers (``[sandbox:fail]`` makes a prediction fail)."""
    return st.text(**bounds).map(lambda t: t.replace("[sandbox:", "[sandbox "))


TRICKY_TEXT = [
    "",
    " ",
    "\t\n",
    "\x00",
    "NaN",
    "Infinity",
    "-0",
    "1e309",
    "null",
    "true",
    "4",
    "16:9 ",
    "REPLICATE",
    "\ud800",
    "\udfff",
    "😀" * 3,
    "\u202egnp.exe",
    "../../etc/passwd",
    "{{ prompt }}",
    "{% raw %}",
    "a" * 4001,
    "data:image/png;base64,",
    "data:text/plain;base64,aGk=",
    PNG[:40],
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**31 - 2, max_value=2**31 + 1),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(),
    st.sampled_from([4.0, -0.0, 1e308, 0.5]),
    text(max_size=30),
    st.sampled_from(TRICKY_TEXT),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def any_body(endpoint: str) -> st.SearchStrategy[Any]:
    """Any JSON value, often an object keyed by the endpoint's own field names."""
    keys = st.sampled_from(sorted(FULL[endpoint])) | text(max_size=10)
    return json_values | st.dictionaries(keys, json_values, max_size=8)


def raw_bodies(endpoint: str) -> st.SearchStrategy[bytes]:
    valid = json.dumps(FULL[endpoint]).encode()
    return st.one_of(
        st.binary(max_size=400),
        text(max_size=200).map(str.encode),
        st.integers(min_value=1, max_value=len(valid) - 1).map(lambda cut: valid[:cut]),
        st.binary(min_size=1, max_size=20).map(lambda tail: valid + tail),
        st.sampled_from(
            [
                b"",
                b"\xef\xbb\xbf" + valid,
                valid.decode().encode("utf-16"),
                b"{" * 50,
                b"[" * 200 + b"]" * 200,
                b'{"a": 1' + b"0" * 5000 + b"}",
                b"NaN",
                b"{}",
                b"[]",
                b"null",
                b'"text"',
                valid * 2,
            ]
        ),
    )


def text_for(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    """Strings within the schema's length bounds (whitespace-only ones included, as the schema allows them)."""
    low, high = schema.get("minLength", 0), schema.get("maxLength", 10_000)
    short = text(min_size=low, max_size=min(high, 60))
    at_limit = st.characters().map(lambda c: c * high) if high <= 4000 else st.nothing()
    return st.one_of(short, short, short, at_limit)


def from_schema(
    schema: dict[str, Any], defs: dict[str, Any], overrides: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Any]:
    """Values valid against the subset of JSON Schema the app's OpenAPI document uses."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, overrides)
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return st.one_of([from_schema(option, defs, overrides) for option in schema[combinator]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))

        def prop(name: str) -> st.SearchStrategy[Any]:
            return overrides[name] if name in overrides else from_schema(properties[name], defs, overrides)

        return st.fixed_dictionaries(
            {name: prop(name) for name in properties if name in required},
            optional={name: prop(name) for name in properties if name not in required},
        )
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return text_for(schema)
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    raise AssertionError(f"schema construct not covered: {schema}")


# -- the app under test --------------------------------------------------------------------------------------------


@dataclass
class Fuzz:
    client: TestClient
    outputs: Path
    root: Path
    outside_before: set[str] = field(default_factory=set)
    issued: set[str] = field(default_factory=set)  # ids the app answered with

    def outside(self) -> set[str]:
        """Files under the test's temporary root, except the outputs and the simulator's own state."""
        found = set()
        for child in self.root.iterdir():
            if child in (self.outputs, self.root / "simulator"):
                continue
            paths = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
            found.update(str(p.relative_to(self.root)) for p in paths)
        return found


def project_files() -> list[Path]:
    return [
        path
        for path in PROJECT.rglob("*")
        if not SKIP_DIRS.intersection(path.relative_to(PROJECT).parts) and path.is_file()
    ]


@pytest.fixture
async def fuzz(
    make_client: AppClient, sim: Simulator, settings_dir: Path, live_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[Fuzz]:
    """One app for all examples of a test; at the end its jobs are canceled and the project is checked untouched."""
    sim.video_latency = 120  # jobs stay running until they are canceled
    sim.image_latency = 0.0
    videos = yaml.safe_load((settings_dir / "videos.yaml").read_text())
    videos["jobs"]["poll_interval_seconds"] = 5.0
    (settings_dir / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
    images = yaml.safe_load((settings_dir / "images.yaml").read_text())
    images["poll_interval_seconds"] = 0.01
    (settings_dir / "images.yaml").write_text(yaml.safe_dump(images, sort_keys=False))
    client = await make_client()
    outputs = Path(live_env["MV_OUTPUT_DIR"])
    state = Fuzz(client, outputs, tmp_path)
    state.outside_before = state.outside()
    yield state

    store = client.app[JOBS].store
    unfinished = list(store._active)
    answers = await asyncio.gather(*(client.delete(f"/api/mv/jobs/{job_id}") for job_id in unfinished))
    assert all(answer.status == 200 for answer in answers)
    assert store._active == {}
    assert client.app[JOBS].tasks == {}
    assert sorted(outputs.rglob("*.part")) == []
    written = {UUID4.search(p.name)[0] for p in outputs.rglob("*") if UUID4.search(p.name)}
    assert state.issued <= written  # everything the app made is under MV_OUTPUT_DIR ...
    assert [p for p in project_files() if any(i in p.name for i in state.issued)] == []  # ... and none in the project


async def post(fz: Fuzz, endpoint: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST ``body``; check the answer is never a 5xx, never leaks, and has the error shape when it is a 4xx."""
    response = await fz.client.post(ENDPOINTS[endpoint], data=body, headers={"Content-Type": "application/json"})
    text = await response.text()
    status = response.status
    assert status < 500, (status, text[:500])
    assert status == SUCCESS[endpoint] or 400 <= status < 500, (status, text[:500])
    assert not any(leak in text for leak in LEAKS), text[:500]
    assert response.content_type == "application/json"
    payload = json.loads(text)
    if status >= 400:
        assert set(payload) == {"error"}, payload
        error = payload["error"]
        assert set(error) <= ERROR_KEYS, error
        assert isinstance(error["code"], str) and error["code"], error
        assert isinstance(error["message"], str) and error["message"], error
        if error["code"] in FIELD_CODES:
            assert isinstance(error.get("field"), str) and error["field"], error
    else:
        issued = payload[{"scenes": "scenes_id", "image": "image_id", "video": "job_id"}[endpoint]]
        assert UUID4.fullmatch(issued)
        fz.issued.add(issued)
    assert fz.outside() == fz.outside_before
    return status, payload


def names(error: dict[str, Any], *candidates: str) -> bool:
    field = error.get("field") or ""
    return any(field == name or field.startswith(f"{name}.") for name in candidates)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def parsed(body: bytes) -> tuple[bool, Any]:
    """How the server's JSON parser sees ``body``: (parsed?, value)."""
    try:
        return True, json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False, None


async def check_value(fz: Fuzz, endpoint: str, value: Any) -> None:
    status, payload = await post(fz, endpoint, dumps(value))
    if not isinstance(value, dict):
        assert status == 400 and payload["error"]["code"] == "invalid_json", payload
    elif status == 400:
        error = payload["error"]
        assert error["code"] != "invalid_json" and names(error, *value, *FULL[endpoint]), (value, error)


# -- properties ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@FUZZ
@given(data=st.data())
async def test_any_json_value_gets_a_clean_answer(fuzz: Fuzz, endpoint: str, data: st.DataObject) -> None:
    await check_value(fuzz, endpoint, data.draw(any_body(endpoint), label="body"))


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@FUZZ
@given(data=st.data())
async def test_any_bytes_get_a_clean_answer(fuzz: Fuzz, endpoint: str, data: st.DataObject) -> None:
    body = data.draw(raw_bodies(endpoint), label="body")
    ok, value = parsed(body)
    if ok:
        await check_value(fuzz, endpoint, value)
        return
    status, payload = await post(fuzz, endpoint, body)
    assert status == 400 and payload["error"]["code"] == "invalid_json", payload


EDGE_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    3,
    8,
    2**31 - 1,
    2**31,
    2**63,
    10**100,
    0.5,
    4.0,
    math.nan,
    math.inf,
    *TRICKY_TEXT,
    "16:9",
    "9:16",
    "gemini",
    "png",
    [],
    {},
    ["x"],
    {"a": 1},
    PNG,
    "00000000-0000-4000-8000-000000000000",
]


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@settings(FUZZ, max_examples=100)
@given(data=st.data())
async def test_a_broken_field_is_named(fuzz: Fuzz, endpoint: str, data: st.DataObject) -> None:
    """A valid body with one field removed, replaced, or added: a 400 names exactly that field."""
    body = dict(FULL[endpoint])
    key = data.draw(st.sampled_from(sorted(body)) | text(min_size=1, max_size=12), label="key")
    expected = None
    if key not in body:
        expected = "unknown_field"
    if key in body and data.draw(st.booleans(), label="delete"):
        del body[key]
        expected = "missing_field" if key in REQUIRED[endpoint] else None
    else:
        body[key] = data.draw(st.sampled_from(EDGE_VALUES) | json_values, label="value")
    status, payload = await post(fuzz, endpoint, dumps(body))
    if expected:
        assert status == 400 and payload["error"]["code"] == expected, (key, payload)
    if status >= 400:
        error = payload["error"]
        assert names(error, key), (key, body.get(key, "<deleted>"), error)
        assert status == 400 or (status == 404 and key == "reference_image_id"), (status, error)


@pytest.fixture
async def schema_bodies(fuzz: Fuzz) -> Callable[[str], st.SearchStrategy[dict[str, Any]]]:
    """Bodies drawn from ``GET /api/mv/openapi.json``; the contents of references are real ones."""
    document = await (await fuzz.client.get("/api/mv/openapi.json")).json()
    defs = document["components"]["schemas"]
    image = await fuzz.client.post(ENDPOINTS["image"], json={"character_description": "a fuzzy violinist"})
    assert image.status == 200
    image_id = (await image.json())["image_id"]
    overrides = {
        "reference_image_base64": st.sampled_from([None, PNG, JPEG, WEBP, f"data:image/png;base64,{PNG}"]),
        "reference_image_id": st.sampled_from([None, image_id]),
        "video_rules_template": st.none() | text(max_size=80).map(lambda t: t.replace("{", "(")),
        # a schema-valid URL may still be refused (no host, a private address): webhooks out have their own tests
        "webhook_url": st.none(),
    }

    def bodies(endpoint: str) -> st.SearchStrategy[dict[str, Any]]:
        return from_schema({"$ref": f"#/components/schemas/{SCHEMAS[endpoint]}"}, defs, overrides)

    return bodies


def refused_reference_shape(body: dict[str, Any]) -> list[str]:
    """Fields the replicate backend refuses with a reference image (settings/videos.yaml: 16:9, 8 s only)."""
    has_image = body.get("reference_image_base64") or body.get("reference_image_id")
    if not has_image or body.get("backend", "replicate") != "replicate":
        return []
    wrong = {"aspect_ratio": body.get("aspect_ratio", "16:9") != "16:9", "duration": body.get("duration", 8) != 8}
    return [name for name, bad in wrong.items() if bad]


async def check_schema_body(fuzz: Fuzz, endpoint: str, body: dict[str, Any]) -> None:
    """What the published schema allows succeeds, except what it cannot say: text that is only whitespace (the
    server strips it) and sending both kinds of reference image."""
    required = {name for name, value in FULL[endpoint].items() if isinstance(value, str) and value}
    empty = [k for k, v in body.items() if k in required and isinstance(v, str) and blank(v)]
    both = body.get("reference_image_base64") and body.get("reference_image_id")
    status, payload = await post(fuzz, endpoint, dumps(body))
    if empty:
        assert status == 400 and payload["error"]["field"] in empty, (body, payload)
    elif both:
        assert status == 400 and payload["error"]["field"] == "reference_image_base64", payload
    elif endpoint == "video" and (refused := refused_reference_shape(body)):
        assert status == 400 and payload["error"]["field"] in refused, (body, payload)
    else:
        assert status == SUCCESS[endpoint], (body, payload)
        if endpoint == "scenes":
            assert len(payload["scenes"]) == body.get("number_of_scenes", 4)


@pytest.mark.parametrize("endpoint", ["scenes", "video"])
@settings(FUZZ, max_examples=25)
@given(data=st.data())
async def test_bodies_from_the_openapi_schema_are_accepted(
    fuzz: Fuzz, endpoint: str, data: st.DataObject, schema_bodies: Callable[[str], Any]
) -> None:
    await check_schema_body(fuzz, endpoint, data.draw(schema_bodies(endpoint), label="body"))


@settings(FUZZ, max_examples=12)  # each one renders an image in the simulator
@given(data=st.data())
async def test_image_bodies_from_the_openapi_schema_are_accepted(
    fuzz: Fuzz, data: st.DataObject, schema_bodies: Callable[[str], Any]
) -> None:
    await check_schema_body(fuzz, "image", data.draw(schema_bodies("image"), label="body"))


# -- bugs the fuzzing found ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
async def test_deeply_nested_json_is_a_400(fuzz: Fuzz, endpoint: str) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        status, payload = await post(fuzz, endpoint, body)
        assert status == 400 and payload["error"]["code"] == "invalid_json"


TEMPLATE_OPERANDS = ["prompt", "duration", "aspect_ratio", "0", "1", "'x'", "none", "[]", "{}", "-1"]
TEMPLATE_OPERATORS = ["/", "//", "%", "+", "-", "*", "~", "in", "<", "|int(", "|round(", "|batch(", "|slice("]


@settings(FUZZ, max_examples=40)
@example(template="{{ 1/0 }}")
@example(template="{{ '%d' % prompt }}")
@example(template="{{ range(10**9)|list }}")
@given(
    template=st.builds(
        lambda a, op, b: f"{{{{ {a} {op} {b}{')' if op.endswith('(') else ''} }}}}",
        st.sampled_from(TEMPLATE_OPERANDS),
        st.sampled_from(TEMPLATE_OPERATORS),
        st.sampled_from(TEMPLATE_OPERANDS),
    )
)
async def test_a_client_rules_template_that_fails_is_a_400(fuzz: Fuzz, template: str) -> None:
    status, payload = await post(fuzz, "video", dumps({**FULL["video"], "video_rules_template": template}))
    assert status == 202 or (status == 400 and payload["error"]["field"] == "video_rules_template"), payload
