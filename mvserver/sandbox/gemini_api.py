"""Simulated Google endpoints: Gemini ``generateContent`` (Developer API) and Veo long-running operations (Vertex).

Veo on Vertex: ``POST .../publishers/google/models/{model}:predictLongRunning`` creates an operation and
``POST .../publishers/google/models/{model}:fetchPredictOperation`` with ``{"operationName"}`` reports it, both with
or without a ``projects/{p}/locations/{l}/`` prefix. Operations are JSON records; whether one is still running is
derived from its age, and its MP4 is rendered the first time it is fetched as done and then returned inline (base64).
A prompt containing ``[sandbox:fail]`` ends with an error, one containing ``[sandbox:filtered]`` ends content-filtered,
and a pending ``fail_prediction`` fault for ``vertex.predict`` fails the next operation with the fault's ``error``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from mvserver.core.artefacts import write_bytes_atomic
from mvserver.sandbox.render import MAX_REFERENCE_PIXELS, RenderError, oversized_image, render_video
from mvserver.sandbox.state import SIMULATOR, Simulator


def google_error(status: int, code: str, message: str) -> web.Response:
    """An error in Google's shape: ``{"error": {"code", "message", "status"}}``."""
    return web.json_response({"error": {"code": status, "message": message, "status": code}}, status=status)


def _prompt_text(body: dict[str, Any]) -> str:
    parts = [part.get("text", "") for content in body.get("contents", []) for part in content.get("parts", [])]
    return "\n".join(parts)


INLINE_TYPES = ("audio/", "image/", "video/")


def _inline_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The inline data parts of a request (``inlineData``: base64 bytes and a MIME type), each described by its MIME
    type, size and SHA-256; ValueError for one Gemini would refuse."""
    found = []
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            inline = part.get("inlineData") or part.get("inline_data")
            if inline is None:
                continue
            mime = inline.get("mimeType") or inline.get("mime_type") or ""
            if not mime.startswith(INLINE_TYPES):
                raise ValueError(f"Unsupported MIME type: {mime}")
            try:  # protobuf's JSON takes standard and URL-safe base64 (google-genai sends the latter)
                text = str(inline.get("data") or "").replace("-", "+").replace("_", "/")
                data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError(
                    "Invalid value at 'contents.parts.inline_data.data' (TYPE_BYTES), Base64 decoding failed."
                ) from None
            found.append({"mime_type": mime, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return found


def _after(label: str, text: str) -> str | None:
    match = re.search(rf"{label}\s*(.+)", text)
    return match.group(1).strip() if match else None


SHOTS = [
    "Wide establishing shot",
    "Medium shot",
    "Close-up",
    "Over-the-shoulder shot",
    "Low-angle shot",
    "Tracking shot",
]
BEATS = [
    ("arrives and takes in the scene", 'sighs dramatically: "Of course it had to be today."'),
    ("tries something bold and it goes sideways", 'laughs nervously: "That was totally on purpose."'),
    ("pauses as the mood turns tender", 'whispers: "Okay. Maybe this matters."'),
    ("finds the moment and owns it", 'shouts with joy: "Now we are talking!"'),
]


# A scene's window in a project's song timeline (``project_song.brief_text``): "- Scene 2: 7.80-15.61 s, bars 5-8,
# section B"
WINDOW = re.compile(
    r"^- Scene (?P<n>\d+): (?P<start>\d+(?:\.\d+)?)-(?P<end>\d+(?:\.\d+)?) s"
    r"(?:, bars (?P<bars>\d+-\d+))?(?:, section (?P<section>\w+))?",
    re.M,
)


def simulated_scenes(prompt: str, heard: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Plausible scenes built from the words of the prompt (count, idea, character, style, angle); with a song's
    timeline, each scene names the window of the song and the section it plays over, and says it heard the song
    when audio came with the request (``heard``)."""
    count = int(exactly.split()[0]) if (exactly := _after(r"exactly", prompt)) else 4
    windows = {int(m["n"]): m for m in WINDOW.finditer(prompt)}
    audio = next((part for part in heard or [] if part["mime_type"].startswith("audio/")), None)
    idea = _after(r"about:", prompt) or "a day in the life"
    character = _after(r"\(visual description\):", prompt) or "the main character"
    style = _after(r"Style:", prompt) or "cinematic"
    angle = _after(r"Primary camera angle:", prompt) or "front"
    scenes = []
    for index in range(count):
        action, line = BEATS[index % len(BEATS)]
        shot = SHOTS[index % len(SHOTS)]
        window = windows.get(index + 1)
        where = ""
        if window is not None:
            section = f"section {window['section']}, " if window["section"] else ""
            bars = f", bars {window['bars']}" if window["bars"] else ""
            where = f" ({section}{window['start']}-{window['end']} s of the song{bars})"
        if audio is not None:
            where += f", to the song heard ({audio['bytes']} bytes of {audio['mime_type']})"
        scenes.append(
            {
                "description": f"[sandbox] Scene {index + 1} of {count}{where}, {idea}. {shot} from the {angle}: "
                f"{character} {action}. Style: {style}. The character {line}",
                "negative_description": "blurry, distorted faces, extra limbs, extra people, text, subtitles, watermark",
            }
        )
    return {"scenes": scenes}


async def generate_content(request: web.Request) -> web.StreamResponse:
    """``POST /gemini/{version}/models/{model}:generateContent``: JSON scenes when JSON output is asked for."""
    sim = request.app[SIMULATOR]
    model, _, method = request.match_info["model_method"].partition(":")
    if method != "generateContent":
        return google_error(404, "NOT_FOUND", f"method {method!r} is not supported by the simulator")
    if not request.headers.get("x-goog-api-key"):
        return google_error(401, "UNAUTHENTICATED", "API key not valid. Please pass a valid API key.")
    body = await request.json()
    prompt = _prompt_text(body)
    try:
        inline = _inline_parts(body)
    except ValueError as exc:
        return google_error(400, "INVALID_ARGUMENT", str(exc))
    sim.prompts.append(prompt)
    sim.inline_parts.append(inline)
    await asyncio.sleep(sim.scenes_latency)
    wants_json = body.get("generationConfig", {}).get("responseMimeType") == "application/json"
    text = json.dumps(simulated_scenes(prompt, inline)) if wants_json else f"[sandbox] {prompt[:200]}"
    fault = sim.take_fault("gemini.generate", ("fail_prediction",))
    if fault is not None:  # a reply that parses as text but not as the asked-for JSON
        text = fault.error if isinstance(fault.error, str) else '{"scenes": "not a list"'
    tokens = len(prompt.split())
    return web.json_response(
        {
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": tokens,
                "candidatesTokenCount": len(text.split()),
                "totalTokenCount": tokens + len(text.split()),
            },
            "modelVersion": model,
            "responseId": hashlib.sha1(prompt.encode()).hexdigest()[:16],
        }
    )


# -- Veo on Vertex: long-running operations ------------------------------------------------------------------------

FAIL_MARKER = "[sandbox:fail]"
FILTER_MARKER = "[sandbox:filtered]"
RESPONSE_TYPE = "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse"
METADATA_TYPE = "type.googleapis.com/google.cloud.aiplatform.v1beta1.GenerateVideoMetadata"
DURATIONS = range(4, 9)
ASPECT_RATIOS = ("16:9", "9:16", "1:1")  # Vertex takes 16:9 and 9:16; the simulator also renders 1:1
RESOLUTIONS = ("720p", "1080p", "4k")
PERSON_GENERATION = ("allow_all", "allow_adult", "dont_allow")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
FILTERED_REASON = (
    "[sandbox] Veo could not generate videos because the input prompt may violate the usage "
    "guidelines. You will not be charged for blocked videos. Support codes: 00000000"
)
OPERATION_NAME = re.compile(
    r"projects/[^/]+/locations/[^/]+/publishers/google/models/(?P<model>[^/:]+)/operations/"
    r"(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)
_MODEL_PATH = "/vertex/{version}/{scope:(?:projects/[^/]+/locations/[^/]+/)?}publishers/google/models/"
_SCOPE = re.compile(r"projects/([^/]+)/locations/([^/]+)/")


class InvalidArgument(Exception):
    """A request Vertex would answer with 400 INVALID_ARGUMENT."""


def _unauthenticated(request: web.Request) -> web.Response | None:
    if request.headers.get("x-goog-api-key") or request.headers.get("Authorization"):
        return None
    return google_error(
        401,
        "UNAUTHENTICATED",
        "Request is missing required authentication credential. "
        "Expected an API key (x-goog-api-key) or an OAuth 2 access token.",
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument("Invalid JSON payload received.") from None
    if not isinstance(body, dict):
        raise InvalidArgument("Invalid JSON payload received. Expected an object.")
    return body


def _choice(parameters: dict[str, Any], key: str, allowed: Any, default: Any) -> Any:
    value = parameters.get(key, default)
    if value not in allowed:
        raise InvalidArgument(f"Unsupported {key}: {value!r}. Supported values are {list(allowed)}.")
    return value


def _integer(parameters: dict[str, Any], key: str, allowed: range, default: int | None) -> int | None:
    value = parameters.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise InvalidArgument(
            f"Unsupported {key}: {value!r}. It must be an integer from {allowed.start} to {allowed.stop - 1}."
        )
    return value


def _reference_image(instance: dict[str, Any]) -> bytes | None:
    image = instance.get("image")
    if image is None:
        return None
    if not isinstance(image, dict) or "gcsUri" in image:
        raise InvalidArgument("image: the simulator takes inline images only (bytesBase64Encoded + mimeType).")
    if image.get("mimeType") not in IMAGE_TYPES:
        raise InvalidArgument(
            f"image.mimeType {image.get('mimeType')!r} is not supported; use one of {list(IMAGE_TYPES)}."
        )
    try:
        data = base64.b64decode(image.get("bytesBase64Encoded") or "", validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidArgument("image.bytesBase64Encoded is not valid base64.") from None
    if not data:
        raise InvalidArgument("image.bytesBase64Encoded is empty.")
    if size := oversized_image(data):
        raise InvalidArgument(f"image: the image is {size} pixels; at most {MAX_REFERENCE_PIXELS} are supported.")
    return data


def parse_video_request(body: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """Validate a ``predictLongRunning`` body like Vertex does; return the operation's settings and its image."""
    instances = body.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        raise InvalidArgument("instances must hold exactly one instance.")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidArgument("parameters must be an object.")
    instance = instances[0]
    image = _reference_image(instance)
    prompt = instance.get("prompt") or ""
    if not isinstance(prompt, str) or (not prompt.strip() and image is None):
        raise InvalidArgument("A text prompt is required when no image is given.")
    negative = parameters.get("negativePrompt") or ""
    if not isinstance(negative, str):
        raise InvalidArgument("negativePrompt must be a string.")
    audio = parameters.get("generateAudio", True)
    if not isinstance(audio, bool):
        raise InvalidArgument("generateAudio must be a boolean.")
    storage_uri = parameters.get("storageUri")
    if storage_uri is not None and not (isinstance(storage_uri, str) and storage_uri.startswith("gs://")):
        raise InvalidArgument("storageUri must be a Cloud Storage URI (gs://bucket/path).")
    settings = {
        "prompt": prompt,
        "negative_prompt": negative,
        "duration": _integer(parameters, "durationSeconds", DURATIONS, 8),
        "aspect_ratio": _choice(parameters, "aspectRatio", ASPECT_RATIOS, "16:9"),
        "resolution": _choice(parameters, "resolution", RESOLUTIONS, "720p"),
        "person_generation": _choice(parameters, "personGeneration", PERSON_GENERATION, "allow_adult"),
        "sample_count": _integer(parameters, "sampleCount", range(1, 5), 1),
        "seed": _integer(parameters, "seed", range(0, 2**32), None),
        "generate_audio": audio,
        "storage_uri": storage_uri,
    }
    return settings, image


def _fault_error(error: Any) -> dict[str, Any]:
    """A ``fail_prediction`` fault's error as a google.rpc.Status: dicts are kept, anything else is INTERNAL (13)."""
    if isinstance(error, dict):
        return {"code": 13, "message": "Internal error encountered.", **error}
    return {"code": 13, "message": str(error) if error else "Internal error encountered."}


def _outcome(sim: Simulator, prompt: str) -> dict[str, Any]:
    """How the operation will end, decided when it is created (so a restart does not change it)."""
    fault = sim.take_fault("vertex.predict", ("fail_prediction",))
    if fault is not None:
        return {"error": _fault_error(fault.error)}
    if FAIL_MARKER in prompt:
        return {"error": {"code": 13, "message": f"[sandbox] Video generation failed ({FAIL_MARKER} in the prompt)."}}
    if FILTER_MARKER in prompt:
        return {"filtered_reasons": [FILTERED_REASON]}
    return {}


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _read_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


class VertexVideos:
    """Handlers for Veo operations; one instance per simulator app, holding the per-operation render locks and the
    app's render slots (shared with the Replicate routes)."""

    def __init__(self, render_slots: asyncio.Semaphore) -> None:
        self._render_locks: dict[str, asyncio.Lock] = {}
        self._render_slots = render_slots

    async def predict(self, request: web.Request) -> web.Response:
        """``:predictLongRunning``: validate, persist the operation, answer its name."""
        sim: Simulator = request.app[SIMULATOR]
        model = request.match_info["model_method"].partition(":")[0]
        if (denied := _unauthenticated(request)) is not None:
            return denied
        try:
            settings, image = parse_video_request(await _json_object(request))
        except InvalidArgument as exc:
            return google_error(400, "INVALID_ARGUMENT", str(exc))
        scope = _SCOPE.fullmatch(request.match_info["scope"])
        project, location = scope.groups() if scope else ("sandbox", "us-central1")
        operation_id = str(uuid.uuid4())
        name = f"projects/{project}/locations/{location}/publishers/google/models/{model}/operations/{operation_id}"
        if image is not None:
            await asyncio.to_thread(write_bytes_atomic, self._reference_path(sim, operation_id), image)
        record = {
            "id": operation_id,
            "name": name,
            "model": model,
            "created_at": time.time(),
            "has_reference": image is not None,
            **settings,
            **_outcome(sim, settings["prompt"]),
        }
        await asyncio.to_thread(sim.save, "operations", operation_id, record)
        return web.json_response({"name": name})

    async def fetch(self, request: web.Request) -> web.Response:
        """``:fetchPredictOperation``: the operation as Vertex reports it (running, failed, filtered or done)."""
        sim: Simulator = request.app[SIMULATOR]
        model = request.match_info["model_method"].partition(":")[0]
        if (denied := _unauthenticated(request)) is not None:
            return denied
        try:
            name = (await _json_object(request)).get("operationName")
        except InvalidArgument as exc:
            return google_error(400, "INVALID_ARGUMENT", str(exc))
        match = OPERATION_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            return google_error(400, "INVALID_ARGUMENT", f"operationName {name!r} is not a valid operation name.")
        record = await asyncio.to_thread(sim.load, "operations", match["id"])
        if record is None or record["name"] != name or record["model"] != model:
            return google_error(404, "NOT_FOUND", f"Operation {name} not found.")
        try:
            return web.json_response(await self._operation(sim, record))
        except (RenderError, ValueError) as exc:
            return google_error(500, "INTERNAL", f"[sandbox] rendering the video failed: {exc}")

    async def unsupported(self, request: web.Request) -> web.Response:
        method = request.match_info["model_method"].partition(":")[2]
        return google_error(404, "NOT_FOUND", f"method {method!r} is not supported by the simulator")

    async def _operation(self, sim: Simulator, record: dict[str, Any]) -> dict[str, Any]:
        name = record["name"]
        if sim.elapsed(record) < sim.video_latency:
            metadata = {
                "@type": METADATA_TYPE,
                "createTime": _timestamp(record["created_at"]),
                "updateTime": _timestamp(time.time()),
            }
            return {"name": name, "done": False, "metadata": metadata}
        if record.get("error"):
            return {"name": name, "done": True, "error": record["error"]}
        count = record["sample_count"]
        response: dict[str, Any] = {"@type": RESPONSE_TYPE, "raiMediaFilteredCount": 0}
        if record.get("filtered_reasons"):
            response.update(raiMediaFilteredCount=count, raiMediaFilteredReasons=record["filtered_reasons"])
        elif record.get("storage_uri"):
            base = record["storage_uri"].rstrip("/")
            response["videos"] = [
                {"gcsUri": f"{base}/{record['id']}/sample_{i}.mp4", "mimeType": "video/mp4"} for i in range(count)
            ]
        else:
            video = {"bytesBase64Encoded": await self._video(sim, record), "mimeType": "video/mp4"}
            response["videos"] = [video] * count
        return {"name": name, "done": True, "response": response}

    @staticmethod
    def _reference_path(sim: Simulator, operation_id: str) -> Path:
        return sim.state_dir / "files" / f"{operation_id}.reference"

    async def _video(self, sim: Simulator, record: dict[str, Any]) -> str:
        """The operation's MP4 as base64, rendered on first use (once, even when fetched concurrently)."""
        path = sim.state_dir / "files" / f"{record['id']}.mp4"
        if not path.exists():
            lock = self._render_locks.setdefault(record["id"], asyncio.Lock())
            try:
                async with lock:
                    if not path.exists():
                        async with self._render_slots:
                            await self._render(sim, record, path)
            finally:
                if self._render_locks.get(record["id"]) is lock:
                    del self._render_locks[record["id"]]
        return await asyncio.to_thread(_read_base64, path)

    async def _render(self, sim: Simulator, record: dict[str, Any], path: Path) -> None:
        reference = None
        if record.get("has_reference"):
            reference = await asyncio.to_thread(self._reference_path(sim, record["id"]).read_bytes)
        await render_video(
            path,
            prompt=record["prompt"],
            duration=record["duration"],
            aspect_ratio=record["aspect_ratio"],
            reference_image=reference,
            generate_audio=record["generate_audio"],
            seed=record["seed"],
        )


def add_routes(router: web.UrlDispatcher, render_slots: asyncio.Semaphore) -> None:
    """Gemini Developer API ``generateContent`` under ``/gemini``; Veo operations under ``/vertex`` (their renders
    wait for one of ``render_slots``)."""
    router.add_post("/gemini/{version}/models/{model_method}", generate_content, name="gemini.generate")
    videos = VertexVideos(render_slots)
    router.add_post(_MODEL_PATH + "{model_method:[^/:]+:predictLongRunning}", videos.predict, name="vertex.predict")
    router.add_post(_MODEL_PATH + "{model_method:[^/:]+:fetchPredictOperation}", videos.fetch, name="vertex.fetch")
    router.add_post(_MODEL_PATH + "{model_method}", videos.unsupported, name="vertex.unsupported")
