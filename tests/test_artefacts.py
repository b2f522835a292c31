"""The artefact layer: atomic and create-only writes, reads, stat, list old, delete, serving with Range.

Every test takes the ``store`` fixture, parametrized over the backends of :class:`mvserver.core.artefacts.Artefacts`
(the local ``outputs/`` directory for now; an object store joins as one more parameter), so each backend passes the
same tests. A backend's harness says only what a test cannot ask through the interface itself: how to make an
artefact look old, and which temporaries it left.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mvserver.core.artefacts import (
    ArtefactExists,
    Artefacts,
    LocalArtefacts,
    OutputStore,
    artefact_key,
    new_id,
    split_key,
)


@dataclass
class Backend:
    store: Artefacts
    age: Callable[[str, float], None]  # make an artefact look ``seconds`` old
    leftovers: Callable[[], list[str]]  # temporaries or parts the backend holds (none once every write has ended)


def local_backend(tmp_path: Path) -> Backend:
    outputs = OutputStore(tmp_path / "outputs")
    store = LocalArtefacts(outputs)

    def age(key: str, seconds: float) -> None:
        stamp = time.time() - seconds
        os.utime(store.file(key), (stamp, stamp))

    def leftovers() -> list[str]:
        return sorted(p.name for p in outputs.root.glob("*/.*"))

    return Backend(store, age, leftovers)


BACKENDS = {"local": local_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
def store(backend: Backend) -> Artefacts:
    return backend.store


def video_key() -> str:
    return artefact_key("videos", new_id(), ".mp4")


async def chunks(*parts: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if fail:
        raise ConnectionError("the provider hung up")


def test_keys_name_a_kind_an_id_and_a_suffix() -> None:
    file_id = new_id()
    assert artefact_key("audio", file_id, ".preview.mp3") == f"audio/{file_id}.preview.mp3"
    assert split_key(f"audio/{file_id}.preview.mp3") == ("audio", file_id, ".preview.mp3")
    for bad in (
        f"../{file_id}.mp4",
        f"videos/{file_id}/../x",
        f"nope/{file_id}.mp4",
        "videos/123.mp4",
        f"videos/{file_id}.MP4",
    ):
        with pytest.raises(ValueError):
            split_key(bad)


async def test_bytes_json_and_streams_round_trip(store: Artefacts) -> None:
    key, sidecar = video_key(), artefact_key("images", new_id(), ".json")
    assert await store.put_stream(key, chunks(b"abc", b"", b"defgh")) == 8
    assert await store.get_bytes(key) == b"abcdefgh"
    assert b"".join([c async for c in store.open(key)]) == b"abcdefgh"
    assert b"".join([c async for c in store.open(key, 2, 5)]) == b"cde"
    await store.put_json(sidecar, {"owner_key_id": "k1", "name": "café"})
    assert await store.get_json(sidecar) == {"owner_key_id": "k1", "name": "café"}
    stat = await store.stat(key)
    assert stat is not None and stat.key == key and stat.size == 8 and stat.mtime <= time.time() and stat.etag
    async with store.local_file(key) as path:
        assert path.read_bytes() == b"abcdefgh"


async def test_missing_artefacts(store: Artefacts) -> None:
    key = video_key()
    assert await store.stat(key) is None
    assert await store.get_json(key) is None
    with pytest.raises(FileNotFoundError):
        await store.get_bytes(key)
    with pytest.raises(FileNotFoundError):
        async with store.local_file(key):
            pass


async def test_a_stream_that_fails_midway_leaves_nothing_visible(backend: Backend) -> None:
    store, key = backend.store, video_key()
    with pytest.raises(ConnectionError):
        await store.put_stream(key, chunks(b"x" * 100_000, b"y" * 100_000, fail=True))
    assert await store.stat(key) is None
    assert backend.leftovers() == []
    # over an existing artefact, the old one stays whole
    await store.put_bytes(key, b"the finished clip")
    with pytest.raises(ConnectionError):
        await store.put_stream(key, chunks(b"half", fail=True))
    assert await store.get_bytes(key) == b"the finished clip"
    assert backend.leftovers() == []


async def test_a_local_file_is_stored_only_when_its_writer_ends_well(backend: Backend) -> None:
    store, key = backend.store, video_key()
    with pytest.raises(RuntimeError):
        async with store.writing(key) as out:
            out.write_bytes(b"part of an ffmpeg output")
            assert await store.stat(key) is None  # not visible while written
            raise RuntimeError("ffmpeg failed")
    assert await store.stat(key) is None and backend.leftovers() == []
    async with store.writing(key) as out:
        out.write_bytes(b"the whole output")
    assert await store.get_bytes(key) == b"the whole output" and backend.leftovers() == []


async def test_a_scratch_file_is_put_under_a_key_chosen_later(backend: Backend) -> None:
    """An upload: streamed to scratch under its id, identified, then stored under the key of its format."""
    store, audio_id = backend.store, new_id()
    async with store.scratch(artefact_key("audio", audio_id), "upload") as upload:
        upload.write_bytes(b"RIFF....WAVE")
        assert await store.put_file(artefact_key("audio", audio_id, ".wav"), upload, create_only=True) == 12
    assert await store.get_bytes(artefact_key("audio", audio_id, ".wav")) == b"RIFF....WAVE"
    assert backend.leftovers() == []


async def test_create_only_refuses_a_second_write(backend: Backend) -> None:
    store, key = backend.store, video_key()
    await store.put_bytes(key, b"first", create_only=True)
    with pytest.raises(ArtefactExists):
        await store.put_bytes(key, b"second", create_only=True)
    with pytest.raises(ArtefactExists):
        await store.put_stream(key, chunks(b"third"), create_only=True)
    with pytest.raises(ArtefactExists):
        async with store.writing(key, create_only=True) as out:
            out.write_bytes(b"fourth")
    assert await store.get_bytes(key) == b"first"
    assert backend.leftovers() == []
    await store.put_bytes(key, b"replaced")  # an ordinary write replaces it
    assert await store.get_bytes(key) == b"replaced"


async def test_list_old_and_delete(backend: Backend) -> None:
    store = backend.store
    image_id = new_id()
    old_image, old_sidecar = artefact_key("images", image_id, ".png"), artefact_key("images", image_id, ".json")
    new_image = artefact_key("images", new_id(), ".png")
    old_scenes = artefact_key("scenes", new_id(), ".md")
    for key in (old_image, old_sidecar, new_image, old_scenes):
        await store.put_bytes(key, b"{}")
    for key in (old_image, old_sidecar, old_scenes):
        backend.age(key, 3600)
    async with store.scratch(artefact_key("images", new_id(), ".png")) as tmp:
        tmp.write_bytes(b"being written")  # a temporary is no artefact, however old
        before = time.time() - 60
        assert sorted(await store.list_old("images", before)) == sorted([old_image, old_sidecar])
        assert await store.list_old("scenes", before) == [old_scenes]
        assert await store.list_old("videos", before) == []
    await store.delete(old_image, old_sidecar, artefact_key("images", new_id(), ".png"))  # a missing one is fine
    assert await store.stat(old_image) is None and await store.stat(old_sidecar) is None
    assert await store.get_bytes(new_image) == b"{}"
    assert await store.list_old("images", time.time() + 60) == [new_image]


@pytest.fixture
async def served(
    store: Artefacts, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> tuple[TestClient, str, bytes]:
    key, data = video_key(), bytes(range(256)) * 40
    await store.put_bytes(key, data)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await store.response(key, noun="video", headers={"Content-Type": "video/mp4"})

    app = web.Application()
    app.router.add_get("/clip", handler)
    return await aiohttp_client(app), key, data


async def test_serve_whole_and_ranges(served: tuple[TestClient, str, bytes], store: Artefacts) -> None:
    client, key, data = served
    whole = await client.get("/clip")
    assert whole.status == 200 and await whole.read() == data
    assert whole.headers["Content-Type"] == "video/mp4" and whole.headers["Accept-Ranges"] == "bytes"
    stat = await store.stat(key)
    assert stat is not None and whole.headers["ETag"] == f'"{stat.etag}"'
    part = await client.get("/clip", headers={"Range": "bytes=100-199"})
    assert part.status == 206 and await part.read() == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = await client.get("/clip", headers={"Range": "bytes=-10"})
    assert tail.status == 206 and await tail.read() == data[-10:]
    same = await client.get("/clip", headers={"If-None-Match": whole.headers["ETag"]})
    assert same.status == 304


async def test_serve_a_range_past_the_end_is_the_json_416(served: tuple[TestClient, str, bytes]) -> None:
    client, _, data = served
    refused = await client.get("/clip", headers={"Range": f"bytes={len(data)}-"})
    assert refused.status == 416 and refused.headers["Content-Range"] == f"bytes */{len(data)}"
    assert refused.headers["Content-Type"] == "application/json"
    error = json.loads(await refused.read())["error"]
    assert error["code"] == "range_not_satisfiable" and error["field"] == "Range"
    assert f"{len(data)}-byte video" in error["message"]
