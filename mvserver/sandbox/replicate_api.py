"""Simulated Replicate HTTP API: the subset the official ``replicate`` client uses, mounted under ``/replicate``.

Predictions of ``google/imagen-4`` (an image), ``google/veo-3.1`` (an MP4) and ``sync/lipsync-2-pro`` (the input
clip with the input audio muxed in and a "SANDBOX lip sync" label; its inputs are read back from the simulated files
API, as Replicate downloads URLs) are stored as JSON records; their
status is derived from the time since creation (``starting``, ``processing`` with tqdm-style progress logs, then the
end). The output is rendered once, when a prediction is first seen at its end, and served from ``/replicate/files``.
A prediction created with a ``webhook`` URL also gets signed webhook deliveries (:mod:`.webhooks`).
Errors use Replicate's problem JSON: ``{"title", "detail", "status"}`` (plus ``invalid_fields`` for a 422).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import mimetypes
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web
from yarl import URL

from mvserver.core.artefacts import temp_path, write_bytes_atomic
from mvserver.sandbox.predictions import STARTING_SHARE, TERMINAL, deadline_end, phase
from mvserver.sandbox.render import (
    MAX_REFERENCE_PIXELS,
    oversized_image,
    render_character_image,
    render_lipsync,
    render_video,
)
from mvserver.sandbox.state import SENDER, SIMULATOR, Fault, Simulator
from mvserver.sandbox.webhooks import fault_marker, invalid_webhook_fields

log = logging.getLogger("mvserver.sandbox")

PREFIX = "/replicate"
FAIL_MARKER = "[sandbox:fail]"
FLAGGED_ERROR = "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
PROGRESS_STEPS = 100
MAX_WAIT_SECONDS = 60
FILE_LIFETIME = timedelta(hours=24)
STALL_CHUNK = 256 * 1024  # what a stalled download sends per write once its pause is over
# ``Cancel-After``: a Go-style duration (``90s``, ``1m30s``, ``1.5h``); Replicate ends the prediction at it.
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|ms|m|s))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_SAFE_ID = re.compile(r"^[a-z2-7]{26}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_OUTPUT_FORMATS = {"png": "png", "jpg": "jpg", "webp": "webp"}


# -- Replicate's problem JSON --------------------------------------------------------------------------------------


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 7807 error body as Replicate sends it."""
    return web.json_response({"title": title, "detail": detail, "status": status, **extra}, status=status)


def _unauthenticated() -> web.Response:
    return problem(401, "Unauthenticated", "You did not pass a valid authentication token")


def _not_found(what: str) -> web.Response:
    return problem(404, "Not found", f"The requested {what} could not be found.")


def _authorized(request: web.Request) -> bool:
    """A bearer token: the simulator's own when it has one (as Replicate checks the account's), else any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expected = request.app[SIMULATOR].api_token
    if expected is not None:
        return scheme == "Bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
    return scheme == "Bearer" and bool(token.strip())


# -- model input schemas -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputField:
    """One input property: JSON type, and optionally allowed values, bounds or a maximum item count."""

    type: Literal["string", "integer", "number", "boolean", "array"]
    required: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    max_items: int | None = None
    uri: bool = False  # a file input: a URL (or data URI), as Cog's ``format: uri``


@dataclass(frozen=True)
class ModelSpec:
    """A simulated official model: what it produces and the inputs it reads (others are ignored, as on Replicate)."""

    kind: Literal["image", "video", "lipsync"]
    fields: dict[str, InputField]


MODELS: dict[str, ModelSpec] = {
    "google/imagen-4": ModelSpec(
        "image",
        {
            "prompt": InputField("string", required=True),
            "aspect_ratio": InputField("string", choices=("1:1", "9:16", "16:9", "3:4", "4:3")),
            "safety_filter_level": InputField(
                "string", choices=("block_low_and_above", "block_medium_and_above", "block_only_high")
            ),
            "output_format": InputField("string", choices=tuple(_OUTPUT_FORMATS)),
            "negative_prompt": InputField("string"),
            "seed": InputField("integer"),
        },
    ),
    "google/veo-3.1": ModelSpec(
        "video",
        {
            "prompt": InputField("string", required=True),
            "aspect_ratio": InputField("string", choices=("16:9", "9:16", "1:1")),
            # The real model takes 4, 6 or 8 seconds; the simulator also takes shorter clips so tests stay fast.
            "duration": InputField("integer", minimum=1, maximum=8),
            "resolution": InputField("string", choices=("720p", "1080p")),
            "generate_audio": InputField("boolean"),
            "negative_prompt": InputField("string"),
            "seed": InputField("integer"),
            "image": InputField("string"),
            "last_frame": InputField("string"),
            "reference_images": InputField("array", max_items=3),
        },
    ),
    # Replicate's API schema of sync/lipsync-2-pro: video (.mp4) and audio (.wav) files, sync_mode (default loop),
    # temperature 0..1 (default 0.5), active_speaker (default false).
    "sync/lipsync-2-pro": ModelSpec(
        "lipsync",
        {
            "video": InputField("string", required=True, uri=True),
            "audio": InputField("string", required=True, uri=True),
            "sync_mode": InputField("string", choices=("loop", "bounce", "cut_off", "silence", "remap")),
            "temperature": InputField("number", minimum=0, maximum=1),
            "active_speaker": InputField("boolean"),
        },
    ),
}

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "array", dict: "object"}.get(type(value), "unknown")


def invalid_fields(spec: ModelSpec, inputs: dict[str, Any]) -> list[dict[str, str]]:
    """Check ``inputs`` against the model's schema; one entry per problem, worded like Replicate's validator."""
    problems = []
    for name, field in spec.fields.items():
        key = f"input.{name}"
        if name not in inputs:
            if field.required:
                problems.append({"type": "required", "field": "input", "description": f"{name} is required"})
            continue
        value = inputs[name]
        if not _JSON_TYPES[field.type](value):
            problems.append(
                {
                    "type": "invalid_type",
                    "field": key,
                    "description": f"Invalid type. Expected: {field.type}, given: {_type_name(value)}",
                }
            )
        elif field.uri and not re.match(r"^(?:[a-z][a-z0-9+.-]*://\S+|data:)", value):
            problems.append({"type": "format", "field": key, "description": "Does not match format 'uri'"})
        elif field.choices is not None and value not in field.choices:
            allowed = ", ".join(json.dumps(choice) for choice in field.choices)
            problems.append(
                {"type": "enum", "field": key, "description": f"{key} must be one of the following: {allowed}"}
            )
        elif field.minimum is not None and value < field.minimum:
            problems.append(
                {"type": "number_gte", "field": key, "description": f"Must be greater than or equal to {field.minimum}"}
            )
        elif field.maximum is not None and value > field.maximum:
            problems.append(
                {"type": "number_lte", "field": key, "description": f"Must be less than or equal to {field.maximum}"}
            )
        elif field.max_items is not None and len(value) > field.max_items:
            problems.append(
                {
                    "type": "array_max_items",
                    "field": key,
                    "description": f"Array must have at most {field.max_items} items",
                }
            )
        elif field.type == "array":
            problems += [
                {
                    "type": "invalid_type",
                    "field": f"{key}.{index}",
                    "description": f"Invalid type. Expected: string, given: {_type_name(item)}",
                }
                for index, item in enumerate(value)
                if not isinstance(item, str)
            ]
    return problems


def _validation_failed(problems: list[dict[str, str]]) -> web.Response:
    detail = "".join(f"- {p['field']}: {p['description']}\n" for p in problems)
    return problem(422, "Input validation failed", detail, invalid_fields=problems)


# -- prediction records and their JSON -----------------------------------------------------------------------------


def new_replicate_id() -> str:
    """A random id in Replicate's style (26 lower-case base32 characters)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(26))


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_duration(text: str) -> float | None:
    """Seconds of a ``Cancel-After`` duration, or None when it is not one."""
    if not _DURATION.fullmatch(text.strip()):
        return None
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(max(seconds, 0)), 60)
    return f"{minutes:02d}:{secs:02d}"


def tqdm_line(done: int, total: int, elapsed: float, rate: float) -> str:
    """One progress line as tqdm prints it, e.g. ``  45%|████▌     | 45/100 [00:04<00:05, 10.0it/s]``."""
    width, eighths = 10, " ▏▎▍▌▋▊▉"
    filled = done / total * width
    full = int(filled)
    bar = "█" * full
    if full < width:
        bar += eighths[int((filled - full) * 8)]
    remaining = (total - done) / rate if rate > 0 else 0.0
    return f"{round(done * 100 / total):3d}%|{bar.ljust(width)}| {done}/{total} [{_clock(elapsed)}<{_clock(remaining)}, {rate:.1f}it/s]"


def progress_logs(record: dict[str, Any], until: float) -> str:
    """tqdm lines every 10 % up to the fraction of the processing phase reached at ``until``."""
    latency = record["latency"]
    started = record["created_at"] + latency * STARTING_SHARE
    span = max(latency * (1 - STARTING_SHARE), 1e-6)
    if until < started:
        return ""
    fraction = min((until - started) / span, 1.0)
    rate = PROGRESS_STEPS / span
    reached = max(1, int(fraction * PROGRESS_STEPS))
    marks = sorted({*range(PROGRESS_STEPS // 10, reached + 1, PROGRESS_STEPS // 10), reached})
    lines = [tqdm_line(step, PROGRESS_STEPS, step / rate, rate) for step in marks]
    return "\n".join(lines) + "\n"


def prediction_json(record: dict[str, Any], base: str) -> dict[str, Any]:
    """The prediction as the API returns it, at this moment."""
    status = phase(record)
    if status == "ended":  # only when the render could not be recorded (e.g. the poll was cancelled)
        status = "processing"
    latency, created = record["latency"], record["created_at"]
    started = created + latency * STARTING_SHARE
    completed = record.get("completed_at")
    if status in TERMINAL and completed is None:  # ended by its Cancel-After deadline
        completed = deadline_end(record)
    until = completed if status in TERMINAL and completed is not None else time.time()
    logs = progress_logs(record, until)
    prediction_id = record["id"]
    data: dict[str, Any] = {
        "id": prediction_id,
        "model": record["model"],
        "version": record["version"],
        "input": record["input"],
        "logs": logs,
        "output": None,
        "error": None,
        "status": status,
        "source": "api",
        "data_removed": False,
        "created_at": iso(created),
        "started_at": iso(started) if until >= started else None,
        "completed_at": iso(completed) if status in TERMINAL else None,
        "urls": {
            "get": f"{base}/v1/predictions/{prediction_id}",
            "cancel": f"{base}/v1/predictions/{prediction_id}/cancel",
        },
    }
    if status == "succeeded":
        data["output"] = f"{base}/files/{prediction_id}/{record['output']}"
        data["logs"] += f"Generated output in {latency * (1 - STARTING_SHARE):.1f}s\n"
    elif status == "failed":
        data["error"] = record["failure"]
    if status in TERMINAL:
        data["metrics"] = run_metrics(created, started, completed if completed is not None else until)
    return data


def run_metrics(created: float, started: float, completed: float) -> dict[str, float]:
    """Replicate's ``metrics`` of an ended prediction: ``predict_time`` (seconds on the model's hardware, what
    per-second models bill) and ``total_time`` (from creation, queueing included). A prediction canceled while
    still starting ran for no time at all."""
    return {
        "predict_time": round(max(0.0, completed - started), 3),
        "total_time": round(max(0.0, completed - created), 3),
    }


def _base_url(request: web.Request) -> str:
    return f"{request.url.origin()}{PREFIX}"


def _wait_seconds(request: web.Request) -> float | None:
    """``Prefer: wait`` (60 s) or ``Prefer: wait=N`` asks to hold the create response until the prediction ends."""
    match = re.search(r"(?:^|[,\s])wait(?:=(\d+))?(?:$|[,;\s])", request.headers.get("Prefer", ""))
    if not match:
        return None
    return min(float(match.group(1) or MAX_WAIT_SECONDS), MAX_WAIT_SECONDS)


# -- files -----------------------------------------------------------------------------------------------------------


def pad_mp4(path: Path, pad_bytes: int) -> None:
    """Append an MP4 ``free`` box of ``pad_bytes`` bytes (at least its 8-byte header) as a sparse hole of zeros;
    players skip ``free`` boxes, so the file stays a valid MP4."""
    if pad_bytes <= 0:
        return
    size = max(8, pad_bytes)
    header = struct.pack(">I4s", size, b"free") if size < 2**32 else struct.pack(">I4sQ", 1, b"free", size)
    with open(path, "r+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        handle.write(header)
        handle.truncate(end + size)


def render_key(options: dict[str, Any], pad_bytes: int) -> str:
    """Content address of a video render: every render option (the reference image by digest) and the padding."""
    reference = options.get("reference_image")
    described = {
        **options,
        "reference_image": hashlib.sha256(reference).hexdigest() if reference else None,
        "pad_bytes": pad_bytes,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _link_or_copy(source: Path, dest: Path) -> None:
    """Put ``source`` at ``dest`` atomically: a hard link when the filesystem allows it, else a copy."""
    tmp = temp_path(dest)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def _safe_name(filename: str | None) -> str:
    name = Path(filename or "").name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._-")[:128]
    return name or "file"


def _checksums(data: bytes) -> dict[str, str]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}


class InputFileError(Exception):
    """A reference image input the simulated model cannot read."""


def _data_uri_bytes(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise InputFileError("only base64 data URIs are supported")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise InputFileError(f"invalid base64 data URI: {exc}") from None


# -- the API ---------------------------------------------------------------------------------------------------------


class ReplicateApi:
    """Route handlers; one instance per simulator app, holding a render lock per prediction and the app's render
    slots (shared with the Vertex routes)."""

    def __init__(self, render_slots: asyncio.Semaphore) -> None:
        self.locks: dict[str, asyncio.Lock] = {}
        self.cache_locks: dict[str, asyncio.Lock] = {}
        self.render_slots = render_slots

    # records

    @staticmethod
    async def _load(sim: Simulator, prediction_id: str) -> dict[str, Any] | None:
        if not _SAFE_ID.fullmatch(prediction_id):
            return None
        return await asyncio.to_thread(sim.load, "predictions", prediction_id)

    @staticmethod
    async def _save(sim: Simulator, record: dict[str, Any]) -> None:
        await asyncio.to_thread(sim.save, "predictions", record["id"], record)

    def _lock(self, prediction_id: str) -> asyncio.Lock:
        return self.locks.setdefault(prediction_id, asyncio.Lock())

    async def _current(self, sim: Simulator, record: dict[str, Any]) -> dict[str, Any]:
        """The record, brought to its final state (rendered, or failed) when its end has come."""
        if phase(record) != "ended":
            return record
        async with self._lock(record["id"]):
            record = await self._load(sim, record["id"]) or record
            if phase(record) == "ended":
                await self._finish(sim, record)
        self.locks.pop(record["id"], None)
        return record

    async def _finish(self, sim: Simulator, record: dict[str, Any]) -> None:
        if record.get("failure") is None:
            try:
                async with self.render_slots:  # a render may decode a 40 MP reference: only a few at once
                    record["output"] = await self._render(sim, record)
            except InputFileError as exc:
                record["failure"] = str(exc)
            except Exception as exc:  # the model "crashed": the prediction fails with the reason
                log.exception("simulated prediction %s failed to render", record["id"])
                record["failure"] = f"Prediction failed: {exc}"
        record["status"] = "failed" if record.get("failure") is not None else "succeeded"
        record["completed_at"] = record["created_at"] + record["latency"]
        await self._save(sim, record)

    async def _render(self, sim: Simulator, record: dict[str, Any]) -> str:
        """Render the output file once; return its name."""
        inputs = record["input"]
        folder = sim.state_dir / "files" / record["id"]
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        kind = MODELS[record["model"]].kind
        if kind == "lipsync":
            video = await self._input_path(sim, inputs["video"], folder, "input-video")
            audio = await self._input_path(sim, inputs["audio"], folder, "input-audio")
            await render_lipsync(
                folder / "output.mp4", video=video, audio=audio, sync_mode=inputs.get("sync_mode", "loop")
            )
            return "output.mp4"
        if kind == "image":
            fmt = _OUTPUT_FORMATS[inputs.get("output_format", "jpg")]
            data = await asyncio.to_thread(
                render_character_image,
                inputs["prompt"],
                aspect_ratio=inputs.get("aspect_ratio", "1:1"),
                output_format=fmt,
                seed=inputs.get("seed"),
                negative_prompt=inputs.get("negative_prompt"),
            )
            name = f"output.{fmt}"
            await asyncio.to_thread(write_bytes_atomic, folder / name, data)
            return name
        references = inputs.get("reference_images") or ([inputs["image"]] if inputs.get("image") else [])
        reference = await self._reference(sim, references[0]) if references else None
        if reference and (size := await asyncio.to_thread(oversized_image, reference)):
            raise InputFileError(f"reference image is {size} pixels; at most {MAX_REFERENCE_PIXELS} are supported")
        name = "output.mp4"
        options = {
            "prompt": inputs["prompt"],
            "duration": inputs.get("duration", 8),
            "aspect_ratio": inputs.get("aspect_ratio", "16:9"),
            "reference_image": reference,
            "generate_audio": inputs.get("generate_audio", True),
            "seed": inputs.get("seed"),
        }
        await self._render_video(sim, folder / name, options)
        return name

    async def _render_video(self, sim: Simulator, dest: Path, options: dict[str, Any]) -> None:
        """Render the MP4, padded by ``sim.output_pad_bytes``; with ``sim.render_cache`` identical requests share
        one file (content-addressed under ``sim.render_cache_dir`` or ``state_dir/cache``, hard-linked into place;
        renders race to one atomic rename, so several processes may share the directory)."""
        if not sim.render_cache:
            await render_video(dest, **options)
            await asyncio.to_thread(pad_mp4, dest, sim.output_pad_bytes)
            return
        key = render_key(options, sim.output_pad_bytes)
        cached = (sim.render_cache_dir or sim.state_dir / "cache") / f"{key}.mp4"
        async with self.cache_locks.setdefault(key, asyncio.Lock()):
            if not await asyncio.to_thread(cached.is_file):
                await asyncio.to_thread(cached.parent.mkdir, parents=True, exist_ok=True)
                rendering = temp_path(cached, "render")
                await render_video(rendering, **options)
                await asyncio.to_thread(pad_mp4, rendering, sim.output_pad_bytes)
                await asyncio.to_thread(os.replace, rendering, cached)
        await asyncio.to_thread(_link_or_copy, cached, dest)

    @staticmethod
    def _uploaded(sim: Simulator, value: str) -> Path | None:
        """The stored file behind one of our file URLs (any host, so it survives a port change), or None."""
        parts = URL(value).path.split("/")
        if (
            len(parts) == 5
            and parts[1:3] == ["replicate", "files"]
            and _SAFE_ID.fullmatch(parts[3])
            and _SAFE_NAME.fullmatch(parts[4])
        ):
            return sim.state_dir / "files" / parts[3] / parts[4]
        return None

    async def _input_path(self, sim: Simulator, value: Any, folder: Path, stem: str) -> Path:
        """A file input as a local path for ffmpeg: a file uploaded to our files API, or a data URI written out.
        Anything else (a ``file://`` URL, another host) cannot be downloaded, so the prediction fails."""
        if isinstance(value, str) and value.startswith("data:"):
            path = folder / stem
            await asyncio.to_thread(write_bytes_atomic, path, _data_uri_bytes(value))
            return path
        uploaded = (
            self._uploaded(sim, value) if isinstance(value, str) and value.startswith(("http://", "https://")) else None
        )
        if uploaded is None or not await asyncio.to_thread(uploaded.is_file):
            raise InputFileError(f"could not download file from {value}")
        return uploaded

    @staticmethod
    async def _reference(sim: Simulator, value: Any) -> bytes:
        """A reference image input: one of our file URLs (any host, so it survives a port change) or a data URI."""
        if not isinstance(value, str):
            raise InputFileError("reference_images must contain URLs")
        if value.startswith("data:"):
            return _data_uri_bytes(value)
        path = ReplicateApi._uploaded(sim, value)
        if path is not None:
            try:
                return await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError:
                pass
        raise InputFileError(f"could not download file from {value}")

    # handlers

    async def create_prediction(self, request: web.Request) -> web.Response:
        """``POST /replicate/v1/models/{owner}/{name}/predictions``."""
        sim = request.app[SIMULATOR]
        if not _authorized(request):
            return _unauthenticated()
        try:
            body = json.loads(await request.read())
        except ValueError:
            return problem(400, "Invalid request body", "The request body is not valid JSON.")
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        spec = MODELS.get(model)
        if spec is None:
            return _not_found(f"model {model}")
        inputs = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inputs, dict):
            return _validation_failed([{"type": "required", "field": "(root)", "description": "input is required"}])
        problems = invalid_fields(spec, inputs) + invalid_webhook_fields(body)
        if problems:
            return _validation_failed(problems)
        cancel_after = None
        if "Cancel-After" in request.headers:
            cancel_after = parse_duration(request.headers["Cancel-After"])
            if cancel_after is None or cancel_after <= 0:
                return problem(
                    400, "Invalid Cancel-After header", "Cancel-After must be a duration such as 30s, 5m or 1h30m."
                )
        record = self._new_record(sim, model, spec, inputs)
        record["cancel_after"] = cancel_after
        record.update(
            webhook=body.get("webhook"),
            webhook_events_filter=body.get("webhook_events_filter"),
            webhook_fault=fault_marker(str(inputs.get("prompt", ""))),
        )
        await self._save(sim, record)
        base = _base_url(request)  # the first delivery may arrive before this response, as on Replicate
        request.app[SENDER].schedule(record, lambda r: prediction_json(r, base), lambda r: self._current(sim, r))
        wait = _wait_seconds(request)
        if wait:
            await asyncio.sleep(max(0.0, min(wait, record["created_at"] + record["latency"] - time.time())))
            record = await self._current(sim, record)
        return web.json_response(prediction_json(record, _base_url(request)), status=201)

    @staticmethod
    def _new_record(sim: Simulator, model: str, spec: ModelSpec, inputs: dict[str, Any]) -> dict[str, Any]:
        fault = sim.take_fault("replicate.create", ("fail_prediction",))
        failure = None
        if fault is not None:
            failure = fault.error if fault.error is not None else FLAGGED_ERROR
        elif FAIL_MARKER in str(inputs.get("prompt", "")):
            failure = FLAGGED_ERROR
        return {
            "id": new_replicate_id(),
            "model": model,
            "version": hashlib.sha256(model.encode()).hexdigest(),
            "input": inputs,
            "status": "starting",
            "created_at": time.time(),
            "latency": sim.image_latency if spec.kind == "image" else sim.video_latency,  # lip sync takes a video's
            "failure": failure,
            "output": None,
            "completed_at": None,
        }

    async def _requested_prediction(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The prediction named in the path, or the error Replicate answers (401 without a token, 404 unknown)."""
        if not _authorized(request):
            return _unauthenticated()
        record = await self._load(request.app[SIMULATOR], request.match_info["prediction_id"])
        return _not_found("prediction") if record is None else record

    async def get_prediction(self, request: web.Request) -> web.Response:
        """``GET /replicate/v1/predictions/{prediction_id}``."""
        record = await self._requested_prediction(request)
        if isinstance(record, web.Response):
            return record
        record = await self._current(request.app[SIMULATOR], record)
        return web.json_response(prediction_json(record, _base_url(request)))

    async def cancel_prediction(self, request: web.Request) -> web.Response:
        """``POST /replicate/v1/predictions/{prediction_id}/cancel``: stop it unless it has already ended."""
        sim = request.app[SIMULATOR]
        record = await self._requested_prediction(request)
        if isinstance(record, web.Response):
            return record
        async with self._lock(record["id"]):
            record = await self._load(sim, record["id"]) or record
            if phase(record) in ("starting", "processing"):
                record["status"] = "canceled"
                record["completed_at"] = time.time()
                await self._save(sim, record)
                request.app[SENDER].wake(record["id"])
        if phase(record) in TERMINAL:
            self.locks.pop(record["id"], None)
        record = await self._current(sim, record)
        return web.json_response(prediction_json(record, _base_url(request)))

    @staticmethod
    async def webhook_secret(request: web.Request) -> web.Response:
        """``GET /replicate/v1/webhooks/default/secret``: the key that signs every webhook delivery, for the holder of
        the simulator's own token only. Whoever has the secret can sign a delivery that finishes any job, so a
        simulator without a token of its own (``api_token``; ``MV_SIM_API_TOKEN`` for ``python -m mvserver.sandbox``)
        gives it to no one."""
        if not _authorized(request):
            return _unauthenticated()
        if request.app[SIMULATOR].api_token is None:
            return problem(
                403,
                "Forbidden",
                "This simulator has no API token of its own, so it gives its webhook "
                "secret to no one (set MV_SIM_API_TOKEN).",
            )
        return web.json_response({"key": request.app[SIMULATOR].webhook_secret})

    async def create_file(self, request: web.Request) -> web.Response:
        """``POST /replicate/v1/files``: multipart with the file in ``content`` and optional JSON ``metadata``."""
        sim = request.app[SIMULATOR]
        if not _authorized(request):
            return _unauthenticated()
        if not request.content_type.startswith("multipart/"):
            return problem(400, "Bad request", "Upload the file as multipart/form-data in the 'content' field.")
        content: tuple[str, str | None, bytes] | None = None
        metadata: Any = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, aiohttp.MultipartReader):  # a nested multipart is no form field
                continue
            if part.name == "content":
                content = (_safe_name(part.filename), part.headers.get("Content-Type"), await part.read())
            elif part.name == "metadata":
                try:
                    metadata = json.loads(await part.text())
                except ValueError:
                    return problem(400, "Bad request", "metadata must be a JSON object.")
        if content is None:
            return problem(400, "Bad request", "Upload the file as multipart/form-data in the 'content' field.")
        name, content_type, data = content
        file_id = new_replicate_id()
        await asyncio.to_thread(write_bytes_atomic, sim.state_dir / "files" / file_id / name, data)
        now = time.time()
        checksums = _checksums(data)
        record = {
            "id": file_id,
            "name": name,
            "content_type": content_type or mimetypes.guess_type(name)[0] or "application/octet-stream",
            "size": len(data),
            "etag": checksums["md5"],
            "checksums": checksums,
            "metadata": metadata if isinstance(metadata, dict) else {},
            "created_at": iso(now),
            "expires_at": iso(now + FILE_LIFETIME.total_seconds()),
            "urls": {"get": f"{_base_url(request)}/files/{file_id}/{name}"},
        }
        await asyncio.to_thread(sim.save, "files", file_id, record)
        return web.json_response(record, status=201)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        """``GET /replicate/files/{file_id}/{name}``: an uploaded file or a prediction output (Range supported)."""
        sim = request.app[SIMULATOR]
        file_id, name = request.match_info["file_id"], request.match_info["name"]
        if not (_SAFE_ID.fullmatch(file_id) and _SAFE_NAME.fullmatch(name)):
            return _not_found("file")
        path = sim.state_dir / "files" / file_id / name
        if not await asyncio.to_thread(path.is_file):
            return _not_found("file")
        upload = await asyncio.to_thread(sim.load, "files", file_id)
        headers = {"Content-Type": upload["content_type"]} if upload else None
        stall = sim.take_fault(request.match_info.route.name or "", ("stall",))
        if stall is not None:
            return await _stalled_file(request, path, stall, headers or {})
        return web.FileResponse(path, headers=headers)


async def _stalled_file(request: web.Request, path: Path, fault: Fault, headers: dict[str, str]) -> web.StreamResponse:
    """The whole file as a 200 (no Range) whose body pauses: ``fault.after_bytes`` bytes, ``fault.seconds`` of
    silence, the rest. The pause is listed in the simulator's ``applied`` faults once those first bytes are sent."""
    sim = request.app[SIMULATOR]
    size = (await asyncio.to_thread(path.stat)).st_size
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", **headers})
    response.content_length = size
    await response.prepare(request)
    with path.open("rb") as handle:
        head = await asyncio.to_thread(handle.read, min(fault.after_bytes, size))
        await response.write(head)
        sim.applied.append(
            {"route": fault.route, "kind": fault.kind, "path": request.path, "bytes_sent": len(head), "size": size}
        )
        await asyncio.sleep(fault.seconds)
        while chunk := await asyncio.to_thread(handle.read, STALL_CHUNK):
            await response.write(chunk)
    await response.write_eof()
    return response


def add_routes(router: web.UrlDispatcher, render_slots: asyncio.Semaphore) -> None:
    """Register the Replicate routes; their names are the ones fault injection uses. Renders wait for one of
    ``render_slots``."""
    api = ReplicateApi(render_slots)
    router.add_post(
        f"{PREFIX}/v1/models/{{owner}}/{{name}}/predictions", api.create_prediction, name="replicate.create"
    )
    router.add_get(f"{PREFIX}/v1/predictions/{{prediction_id}}", api.get_prediction, name="replicate.get")
    router.add_post(f"{PREFIX}/v1/predictions/{{prediction_id}}/cancel", api.cancel_prediction, name="replicate.cancel")
    router.add_post(f"{PREFIX}/v1/files", api.create_file, name="replicate.files.create")
    router.add_get(f"{PREFIX}/v1/webhooks/default/secret", api.webhook_secret, name="replicate.webhooks.secret")
    router.add_get(f"{PREFIX}/files/{{file_id}}/{{name}}", api.get_file, name="replicate.files.get")
