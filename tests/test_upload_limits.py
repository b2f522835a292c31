"""Upload limits that keep one client (or key) from blocking everyone's uploads: a trickling body is cut off, a key
has upload slots of its own and an upload quota."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import UPLOAD, AppClient, make_audio, stored

from mvserver.appkeys import UPLOAD_SLOTS
from mvserver.web.access.auth import KeyLimits, create_key

SECRET = "upload-limits-signing-secret-0123456789ab"
GLOBAL_SLOTS = 4  # MV_MAX_CONCURRENT_UPLOADS by default


async def trickle(client: TestClient, first: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send an upload's headers (announcing 100 kB) and ``first``, then one byte every ``every`` seconds, until the
    server answers and closes; (the answer, seconds until it came)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        f"POST {UPLOAD} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: 100000\r\n\r\n".encode()
        + first
    )
    started = time.monotonic()

    async def drip() -> None:
        try:
            while True:
                await asyncio.sleep(every)
                writer.write(b"\0")
                await writer.drain()
        except ConnectionError:
            pass

    dripping = asyncio.ensure_future(drip())
    try:
        async with asyncio.timeout(limit):
            head = await reader.readuntil(b"\r\n\r\n")
            elapsed = time.monotonic() - started
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            )
            return head + await reader.readexactly(length), elapsed
    finally:
        dripping.cancel()
        writer.close()


def error_of(answer: bytes, status: int) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer
    return json.loads(body)["error"]


@pytest.mark.parametrize(
    ("min_rate", "first", "every", "setting"),
    [
        ("1000", b"RIFF", 0.25, "MV_UPLOAD_MIN_BYTES_PER_SECOND"),  # a byte every 0.25 s: alive, but far too slow
        ("0", b"RIFF" * 64, 30.0, "MV_UPLOAD_IDLE_SECONDS"),  # 256 bytes, then nothing
    ],
)
async def test_a_trickling_upload_is_cut_off_with_a_clear_error(
    make_client: AppClient, tmp_path: Path, min_rate: str, first: bytes, every: float, setting: str
) -> None:
    client = await make_client(MV_UPLOAD_IDLE_SECONDS="1", MV_UPLOAD_MIN_BYTES_PER_SECOND=min_rate)
    answer, elapsed = await trickle(client, first, every, limit=10)
    error = error_of(answer, 408)
    assert error["code"] == "request_timeout" and error["field"] == "body" and setting in error["message"], error
    assert 0.9 <= elapsed < 6, elapsed
    assert client.app[UPLOAD_SLOTS].running == 0 and stored(tmp_path) == []  # the slot is free, nothing is left
    song = make_audio(tmp_path / "song.wav", seconds=0.5).read_bytes()
    response = await client.post(UPLOAD, data=song, headers={"Content-Type": "audio/wav"})
    assert response.status == 201, await response.text()


@pytest.fixture
def two_keys(tmp_path: Path) -> tuple[Path, str, str]:
    keys_file = tmp_path / "keys.yaml"
    limits = KeyLimits(uploads_per_minute=600, uploads_burst=50)  # only the slots matter here
    return keys_file, create_key(keys_file, "hog", limits)[1], create_key(keys_file, "other", limits)[1]


async def test_one_keys_full_upload_slots_do_not_block_another_key(
    make_client: AppClient, tmp_path: Path, two_keys: tuple[Path, str, str]
) -> None:
    keys_file, hog, other = two_keys
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    release = asyncio.Event()

    async def held() -> AsyncIterator[bytes]:
        yield b"\0" * 1024
        await release.wait()

    def post(key: str, data: Any) -> Any:
        return client.post(UPLOAD, data=data, headers={"Content-Type": "audio/wav", "Authorization": f"Bearer {key}"})

    slots, per_key = client.app[UPLOAD_SLOTS], KeyLimits().max_concurrent_uploads
    hogging = [asyncio.ensure_future(post(hog, held())) for _ in range(GLOBAL_SLOTS)]  # as many as there are slots
    try:
        async with asyncio.timeout(10):  # until the hog's uploads hold what they can, and the others are answered
            while not (slots.locked() or sum(task.done() for task in hogging) == GLOBAL_SLOTS - per_key):
                await asyncio.sleep(0.02)
        song = make_audio(tmp_path / "song.wav", seconds=0.5).read_bytes()
        answered = await post(other, song)
        assert answered.status == 201, await answered.text()
        refused = [task.result() for task in hogging if task.done()]
        assert len(refused) == GLOBAL_SLOTS - per_key
        for response in refused:
            assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
            error = (await response.json())["error"]
            assert error["code"] == "quota_exceeded" and "max_concurrent_uploads" in error["message"]
    finally:
        release.set()
        for response in await asyncio.gather(*hogging):
            assert response.status in (400, 429)  # 1 kB of zeros is no audio
    assert slots.running == 0


@pytest.mark.both_stores
async def test_the_upload_quota_answers_429_with_retry_after(make_client: AppClient, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(keys_file, "uploader", KeyLimits(uploads_per_minute=2, uploads_burst=3))
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    song = make_audio(tmp_path / "song.wav", seconds=0.5).read_bytes()
    headers = {"Content-Type": "audio/wav", "Authorization": f"Bearer {key}"}
    for _ in range(3):
        response = await client.post(UPLOAD, data=song, headers=headers)
        assert response.status == 201, await response.text()
    refused = await client.post(UPLOAD, data=song, headers=headers)
    assert refused.status == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 30  # a token every 30 s
    error = (await refused.json())["error"]
    assert error["code"] == "rate_limited" and "uploads" in error["message"], error
    assert len([name for name in stored(tmp_path) if name.endswith(".json")]) == 3  # the refused body was not kept
