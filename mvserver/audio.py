"""``POST /api/mv/upload_audio`` and ``GET /api/mv/get_audio/{audio_id}``: the song of a music video.

The body (raw ``audio/*`` or multipart with one file) is streamed to a temporary file under a size cap
(``MV_MAX_AUDIO_MB``), then identified by ffmpeg from its content, never its name: the header must name an accepted
container and codec, and the whole stream must decode within a time limit (which also gives the exact duration).
Only then is it renamed to ``audio/<id>.<ext>`` and its JSON sidecar written; the sidecar comes last, so a song
counts as saved once its sidecar exists. Anything else leaves nothing on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from aiohttp import BodyPartReader, ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from . import media
from .auth import key_id, visible_to
from .config import CONFIG
from .errors import ApiError
from .security import accepts
from .storage import STORE, OutputStore, check_id, new_id, temp_path

routes = web.RouteTableDef()

CHUNK = 1 << 16
MAX_CHANNELS = 8
SAMPLE_RATES = range(8000, 192001)
MIN_SECONDS = 0.1
UPLOAD_TIMEOUT_SECONDS = 300.0  # a body that trickles in slower than this is cut off
HEADER_TIMEOUT_SECONDS = 10.0
DECODE_TIMEOUT_SECONDS = 60.0  # decoding 50 MB of MP3 takes a few seconds; a file built to stall ffmpeg is stopped
MAX_CONCURRENT_UPLOADS = 4


@dataclass(frozen=True)
class AudioFormat:
    name: str
    mime_type: str
    suffix: str


FORMATS = {fmt.name: fmt for fmt in (
    AudioFormat("mp3", "audio/mpeg", ".mp3"),
    AudioFormat("wav", "audio/wav", ".wav"),
    AudioFormat("m4a", "audio/mp4", ".m4a"),
    AudioFormat("aac", "audio/aac", ".aac"),
    AudioFormat("ogg", "audio/ogg", ".ogg"),
    AudioFormat("flac", "audio/flac", ".flac"),
)}
_BY_MIME = {fmt.mime_type: fmt for fmt in FORMATS.values()}

UPLOAD_SLOTS = web.AppKey("audio_upload_slots", asyncio.Semaphore)


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_audio", message, field="body")


def classify(info: media.MediaInfo) -> tuple[AudioFormat, media.AudioStream]:
    """The accepted format of a probed file: container and codec must both fit (ApiError ``invalid_audio``)."""
    stream = info.first_audio
    if stream is None:
        raise invalid("the file has no audio stream")
    if info.first_video is not None:
        raise invalid("the file holds a video; upload the audio only (mp3, wav, m4a/aac, ogg, flac)")
    container, codec = info.container, stream.codec
    name = None
    if container == "mp3" and codec == "mp3":
        name = "mp3"
    elif container == "wav" and codec.startswith("pcm_"):
        name = "wav"
    elif container.startswith("mov,mp4,m4a") and codec == "aac":
        name = "m4a"
    elif container == "aac" and codec == "aac":
        name = "aac"
    elif container == "ogg" and codec in ("vorbis", "opus", "flac"):
        name = "ogg"
    elif container == "flac" and codec == "flac":
        name = "flac"
    if name is None:
        raise invalid(f"{codec} audio in a {container.split(',')[0]} file is not accepted; "
                      "send mp3, wav, m4a/aac, ogg or flac")
    if stream.channels > MAX_CHANNELS:
        raise invalid(f"the audio has {stream.channels} channels; at most {MAX_CHANNELS} are accepted")
    if stream.sample_rate not in SAMPLE_RATES:
        raise invalid(f"sample rate {stream.sample_rate} Hz is outside 8000..192000 Hz")
    return FORMATS[name], stream


async def _limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        yield chunk


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"audio files may be at most {limit} bytes (MV_MAX_AUDIO_MB)",
                    field="body")


async def _raw_chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


async def _receive(request: web.Request, dest: Path, limit: int) -> None:
    """Stream the body (or the one file of a multipart body) to ``dest``; 413 as soon as ``limit`` is passed."""
    store = request.app[STORE]
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    mime = request.content_type
    if mime.startswith("audio/"):
        await store.write_stream(dest, _limited(_raw_chunks(request), limit))
        return
    if mime != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       "send the file as the raw body with an audio/* Content-Type, or as multipart/form-data "
                       "with one file", field="Content-Type")
    try:
        reader = await request.multipart()
        part = await reader.next()
        if not isinstance(part, BodyPartReader):
            raise invalid("the multipart body must hold exactly one file")
        await store.write_stream(dest, _limited(_part_chunks(part), limit))
        if await reader.next() is not None:
            raise invalid("the multipart body must hold exactly one file")
    except (ValueError, AssertionError) as exc:  # how aiohttp's multipart parser reports a malformed body
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc}", field="body") from None


async def identify(path: Path) -> dict[str, Any]:
    """Probe an uploaded file: its format, stream parameters and decoded duration (ApiError ``invalid_audio``)."""
    try:
        info = await media.probe(path, timeout=HEADER_TIMEOUT_SECONDS)
    except media.MediaError:
        raise invalid("the file is not an audio file ffmpeg can read") from None
    fmt, stream = classify(info)
    try:
        duration = await media.stream_duration(path, "a:0", decode=True, timeout=DECODE_TIMEOUT_SECONDS)
    except media.MediaTimeout:
        raise invalid(f"the audio did not decode within {DECODE_TIMEOUT_SECONDS:g} s") from None
    except media.MediaError:
        raise invalid("the audio stream does not decode") from None
    if duration < MIN_SECONDS:
        raise invalid(f"the audio is shorter than {MIN_SECONDS} s")
    return {
        "format": fmt.name,
        "mime_type": fmt.mime_type,
        "codec": stream.codec,
        "duration": round(duration, 3),
        "sample_rate": stream.sample_rate,
        "channels": stream.channels,
    }


@routes.post("/api/mv/upload_audio")
@accepts("audio/*", "multipart/form-data")
async def upload_audio(request: web.Request) -> web.Response:
    slots = request.app[UPLOAD_SLOTS]
    if slots.locked():
        raise ApiError(503, "busy", f"{MAX_CONCURRENT_UPLOADS} uploads are already running; try again shortly",
                       retry_after=2)
    async with slots:
        return await _store_upload(request)


async def _store_upload(request: web.Request) -> web.Response:
    store: OutputStore = request.app[STORE]
    limit = request.app[CONFIG].env.max_audio_bytes
    audio_id = new_id()
    upload = temp_path(store.root / "audio" / audio_id, "upload")  # a crash leaves it to the clean-up
    try:
        try:
            async with asyncio.timeout(UPLOAD_TIMEOUT_SECONDS):
                await _receive(request, upload, limit)
        except TimeoutError:
            raise ApiError(408, "request_timeout", f"the upload took longer than {UPLOAD_TIMEOUT_SECONDS:g} s",
                           field="body") from None
        except (ClientPayloadError, ConnectionError, HttpProcessingError):
            raise ApiError(400, "incomplete_body", "the upload ended before the whole body arrived",
                           field="body") from None
        described = await identify(upload)
        size = (await asyncio.to_thread(upload.stat)).st_size
        path = store.path("audio", audio_id, FORMATS[described["format"]].suffix)
        await asyncio.to_thread(os.replace, upload, path)
    finally:
        upload.unlink(missing_ok=True)
    body = {"audio_id": audio_id, **described, "size_bytes": size, "audio_url": f"/api/mv/get_audio/{audio_id}"}
    owner = key_id(request)
    try:
        await store.write_json(store.path("audio", audio_id, ".json"),
                               body if owner is None else {**body, "owner_key_id": owner})
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return web.json_response({**body, "output_file": store.relative(path)}, status=201,
                             headers={"Location": body["audio_url"]})


async def saved_audio(app: web.Application, audio_id: str, field: str = "audio_id",
                      caller: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The path and sidecar of a saved song (ApiError 400 for a malformed id, 404 if there is none or it belongs to
    another key than ``caller``)."""
    store: OutputStore = app[STORE]
    check_id(audio_id, field)
    try:
        sidecar = json.loads(await asyncio.to_thread(store.path("audio", audio_id, ".json").read_bytes))
        fmt = _BY_MIME[sidecar["mime_type"]]
        if not visible_to(sidecar.get("owner_key_id"), caller):
            raise KeyError("owner")
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        raise ApiError(404, "not_found", f"no audio with id {audio_id}", field=field) from None
    path = store.path("audio", audio_id, fmt.suffix)
    if not await asyncio.to_thread(path.is_file):
        raise ApiError(404, "not_found", f"no audio with id {audio_id}", field=field)
    return path, sidecar


@routes.get("/api/mv/get_audio/{audio_id}")
async def get_audio(request: web.Request) -> web.FileResponse:
    path, sidecar = await saved_audio(request.app, request.match_info["audio_id"], caller=key_id(request))
    return web.FileResponse(path, headers={"Content-Type": sidecar["mime_type"],
                                           "Cache-Control": "private, max-age=3600"})
