"""``POST /api/mv/upload_audio`` and ``GET /api/mv/get_audio/{audio_id}``: the song of a music video.

The body (raw ``audio/*`` or multipart with one file) is streamed to a temporary file under a size cap
(``MV_MAX_AUDIO_MB``), then identified by ffmpeg from its content, never its name: the header must name an accepted
container and codec (read with an allow-listed demuxer from the local file only, so nothing named inside the upload
is ever opened), last at most ``MV_MAX_AUDIO_SECONDS``, and the whole stream must decode within a time limit (which
also gives the exact duration).
Only then is it renamed to ``audio/<id>.<ext>`` and its JSON sidecar written; the sidecar comes last, so a song
counts as saved once its sidecar exists. Anything else leaves nothing on disk.

An upload holds one of the process's upload slots (``MV_MAX_CONCURRENT_UPLOADS``) and, with keys on, one of its
key's (``max_concurrent_uploads``), and costs a token of the key's upload bucket (``uploads_per_minute``,
``uploads_burst``). So that a slow client cannot hold a slot, the body must keep coming: no pause longer than
``MV_UPLOAD_IDLE_SECONDS``, and on average at least ``MV_UPLOAD_MIN_BYTES_PER_SECOND`` once that much time has
passed (:class:`UploadPace`); a trickle of a byte every few seconds is cut off with 408.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
from aiohttp import BodyPartReader, ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from mvserver.appkeys import ARTEFACTS, CONFIG, SONG_SAVED, UPLOAD_SLOTS
from mvserver.audio.service import FORMATS, AudioFormat, saved_audio
from mvserver.core.artefacts import artefact_key, new_id
from mvserver.core.errors import ApiError
from mvserver.media.args import AUDIO_DEMUXERS
from mvserver.media.errors import MediaError, MediaTimeout
from mvserver.media.probe import AudioStream, MediaInfo, probe, stream_duration
from mvserver.web.access.auth import API_KEY, KeyRecord, key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge_upload
from mvserver.web.security import accepts

CHUNK = 1 << 16
MAX_CHANNELS = 8
SAMPLE_RATES = range(8000, 192001)
MIN_SECONDS = 0.1
UPLOAD_TIMEOUT_SECONDS = 300.0  # the whole body must arrive within this, however steadily it comes
HEADER_TIMEOUT_SECONDS = 10.0
DECODE_TIMEOUT_SECONDS = 60.0  # decoding 50 MB of MP3 takes a few seconds; a file built to stall ffmpeg is stopped
KEY_SLOTS_RETRY_AFTER = 5.0  # seconds a key whose upload slots are all taken is told to wait


class UploadSlots:
    """The uploads running on this process: at most ``total``, and at most a key's ``max_concurrent_uploads`` of
    them, so one key cannot take every slot. Checked and taken without an ``await`` in between, so no two requests
    can take the last slot."""

    def __init__(self, total: int):
        self.total = total
        self.running = 0
        self._per_key: Counter[str] = Counter()

    def locked(self) -> bool:
        """Every slot is taken (as ``asyncio.Semaphore.locked``)."""
        return self.running >= self.total

    def take(self, key: KeyRecord | None) -> None:
        """Take a slot for ``key`` (None: keys off), or raise 429 ``quota_exceeded`` (the key's slots) or 503
        ``busy`` (all slots)."""
        cap = key.limits.max_concurrent_uploads if key is not None else None
        if key is not None and cap is not None and self._per_key[key.id] >= cap:
            raise ApiError(
                429,
                "quota_exceeded",
                f"this key already has {self._per_key[key.id]} uploads running (limit max_concurrent_uploads {cap})",
                retry_after=KEY_SLOTS_RETRY_AFTER,
            )
        if self.locked():
            raise ApiError(503, "busy", f"{self.total} uploads are already running; try again shortly", retry_after=2)
        self.running += 1
        if key is not None:
            self._per_key[key.id] += 1

    def give_back(self, key: KeyRecord | None) -> None:
        self.running -= 1
        if key is not None:
            self._per_key[key.id] -= 1
            if self._per_key[key.id] <= 0:
                del self._per_key[key.id]


# Called once a song is saved (its sidecar written): starts its analysis and copies and answers fields for the upload
# answer (``mvserver.audio.songs`` sets it; without it an upload answers the description alone).
SongSaved = Callable[[web.Application, str, str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (app, id, key, sidecar)


@dataclass(frozen=True)
class UploadPace:
    """How steadily a body must arrive: never ``idle_seconds`` without a byte, and after ``idle_seconds`` (the
    grace for a slow start) on average ``min_bytes_per_second`` (0: no minimum), all within ``total_seconds``.

    Each read waits until the earliest of: the last byte + ``idle_seconds``; start + ``idle_seconds`` + received /
    ``min_bytes_per_second`` (the time by which the bytes so far would have been due); start + ``total_seconds``."""

    idle_seconds: float
    min_bytes_per_second: float
    total_seconds: float = UPLOAD_TIMEOUT_SECONDS

    def deadline(self, start: float, last: float, received: int) -> tuple[float, str]:
        """When the next bytes are due, and what is broken if they are not."""
        due = [
            (
                last + self.idle_seconds,
                f"the upload stalled: no data for {self.idle_seconds:g} s (MV_UPLOAD_IDLE_SECONDS)",
            ),
            (start + self.total_seconds, f"the upload took longer than {self.total_seconds:g} s"),
        ]
        if self.min_bytes_per_second > 0:
            due.append(
                (
                    start + self.idle_seconds + received / self.min_bytes_per_second,
                    f"the upload is too slow: it must average at least {self.min_bytes_per_second:g} bytes/s "
                    "(MV_UPLOAD_MIN_BYTES_PER_SECOND)",
                )
            )
        return min(due)


async def _paced(
    chunks: AsyncIterator[bytes], pace: UploadPace, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[bytes]:
    """``chunks`` as they come, or ApiError 408 ``request_timeout`` as soon as they come too slowly (``pace``)."""
    start = last = clock()
    received = 0
    source = chunks.__aiter__()
    while True:
        due, why = pace.deadline(start, last, received)
        try:
            async with asyncio.timeout(max(0.0, due - clock())):
                chunk = await anext(source)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ApiError(408, "request_timeout", why, field="body") from None
        received += len(chunk)
        last = clock()
        yield chunk


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_audio", message, field="body")


def _too_long(length: str, limit: float) -> ApiError:
    return ApiError(
        400,
        "audio_too_long",
        f"the song lasts {length}; songs may last at most {limit:g} s (MV_MAX_AUDIO_SECONDS)",
        field="body",
    )


def classify(info: MediaInfo) -> tuple[AudioFormat, AudioStream]:
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
        raise invalid(
            f"{codec} audio in a {container.split(',')[0]} file is not accepted; send mp3, wav, m4a/aac, ogg or flac"
        )
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
    return ApiError(
        413, "request_too_large", f"audio files may be at most {limit} bytes (MV_MAX_AUDIO_MB)", field="body"
    )


async def _raw_chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


async def _hashed(chunks: AsyncIterator[bytes], digest: Any) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        digest.update(chunk)
        yield chunk


async def _receive(request: web.Request, dest: Path, limit: int, pace: UploadPace) -> str:
    """Stream the body (or the one file of a multipart body) to the local file ``dest``; 413 as soon as ``limit`` is
    passed, 408 as soon as it comes too slowly (``pace``). Returns the SHA-256 of the file (hex), whatever its
    envelope."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    mime = request.content_type
    digest = hashlib.sha256()
    if mime.startswith("audio/"):
        await _write(dest, _hashed(_limited(_paced(_raw_chunks(request), pace), limit), digest))
        return digest.hexdigest()
    if mime != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the file as the raw body with an audio/* Content-Type, or as multipart/form-data with one file",
            field="Content-Type",
        )
    try:
        reader = await request.multipart()
        async with asyncio.timeout(pace.idle_seconds):  # the part's headers
            part = await reader.next()
        if not isinstance(part, BodyPartReader):
            raise invalid("the multipart body must hold exactly one file")
        await _write(dest, _hashed(_limited(_paced(_part_chunks(part), pace), limit), digest))
        async with asyncio.timeout(pace.idle_seconds):  # the closing boundary
            more = await reader.next()
        if more is not None:
            raise invalid("the multipart body must hold exactly one file")
    except (ValueError, AssertionError) as exc:  # how aiohttp's multipart parser reports a malformed body
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc}", field="body") from None
    return digest.hexdigest()


async def _write(dest: Path, chunks: AsyncIterator[bytes]) -> None:
    async with aiofiles.open(dest, "wb") as handle:
        async for chunk in chunks:
            await handle.write(chunk)


async def identify(path: Path, max_seconds: float) -> dict[str, Any]:
    """Probe an uploaded file: its format, stream parameters and decoded duration (ApiError ``invalid_audio``, or
    ``audio_too_long`` past ``max_seconds``: from the header before anything is decoded, and from the decode, which
    stops just past the limit, for a header that understates the length)."""
    try:
        info = await probe(path, timeout=HEADER_TIMEOUT_SECONDS, demuxers=AUDIO_DEMUXERS)
    except MediaError:  # one message for every refusal: it must not tell what the file names or whether it exists
        raise invalid("the file is not an audio file ffmpeg can read") from None
    fmt, stream = classify(info)
    if info.duration is not None and info.duration > max_seconds:
        raise _too_long(f"{info.duration:g} s", max_seconds)
    try:
        duration = await stream_duration(
            path, "a:0", decode=True, timeout=DECODE_TIMEOUT_SECONDS, demuxers=[fmt.demuxer], limit=max_seconds + 1
        )
    except MediaTimeout:
        raise invalid(f"the audio did not decode within {DECODE_TIMEOUT_SECONDS:g} s") from None
    except MediaError:
        raise invalid("the audio stream does not decode") from None
    if duration < MIN_SECONDS:
        raise invalid(f"the audio is shorter than {MIN_SECONDS} s")
    if duration > max_seconds:  # the decode stopped at max_seconds + 1: the song may be longer still
        raise _too_long(f"more than {max_seconds:g} s", max_seconds)
    return {
        "format": fmt.name,
        "mime_type": fmt.mime_type,
        "codec": stream.codec,
        "duration": round(duration, 3),
        "sample_rate": stream.sample_rate,
        "channels": stream.channels,
    }


@accepts("audio/*", "multipart/form-data")
@idempotent
async def upload_audio(request: web.Request) -> web.Response:
    slots, key = request.app[UPLOAD_SLOTS], request.get(API_KEY)
    limit = request.app[CONFIG].env.max_audio_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)  # costs nothing
    slots.take(key)
    try:
        await charge_upload(request)  # 429 rate_limited when the key's upload bucket is empty
        return await _store_upload(request)
    finally:
        slots.give_back(key)


async def _store_upload(request: web.Request) -> web.Response:
    store = request.app[ARTEFACTS]
    env = request.app[CONFIG].env
    pace = UploadPace(env.upload_idle_seconds, env.upload_min_bytes_per_second)
    audio_id = new_id()
    async with store.scratch(artefact_key("audio", audio_id), "upload") as upload:  # a crash leaves it to the clean-up
        try:
            digest = await _receive(request, upload, env.max_audio_bytes, pace)
        except TimeoutError:  # the multipart part headers or closing boundary stalled
            raise ApiError(
                408,
                "request_timeout",
                f"the upload stalled: no data for {pace.idle_seconds:g} s (MV_UPLOAD_IDLE_SECONDS)",
                field="body",
            ) from None
        except (ClientPayloadError, ConnectionError, HttpProcessingError):
            raise ApiError(
                400, "incomplete_body", "the upload ended before the whole body arrived", field="body"
            ) from None
        # The file, not its envelope (a multipart boundary differs between retries), is the request.
        await reserve(request, {"sha256": digest})
        described = await identify(upload, request.app[CONFIG].env.max_audio_seconds)
        key = artefact_key("audio", audio_id, FORMATS[described["format"]].suffix)
        size = await store.put_file(key, upload, create_only=True)
    body = {"audio_id": audio_id, **described, "size_bytes": size, "audio_url": f"/api/mv/get_audio/{audio_id}"}
    owner = key_id(request)
    try:
        await store.put_json(
            artefact_key("audio", audio_id, ".json"),
            body if owner is None else {**body, "owner_key_id": owner},
            create_only=True,
        )
    except BaseException:
        await store.delete(key)
        raise
    saved = request.app.get(SONG_SAVED)
    if saved is not None:
        body.update(await saved(request.app, audio_id, key, body))
    return web.json_response(body, status=201, headers={"Location": body["audio_url"]})  # no server path


async def get_audio(request: web.Request) -> web.StreamResponse:
    key, sidecar = await saved_audio(request.app, request.match_info["audio_id"], caller=key_id(request))
    return await request.app[ARTEFACTS].response(
        key, noun="song", headers={"Content-Type": sidecar["mime_type"], "Cache-Control": "private, max-age=3600"}
    )
