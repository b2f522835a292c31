"""The artefact layer: atomic and create-only writes, reads, stat, list old, delete, serving with Range.

Every test takes the ``store`` fixture, parametrized over the backends of :class:`mvserver.core.artefacts.Artefacts`
(the local ``outputs/`` directory, and object storage on moto's S3 server serving by redirect or through the
server), so each backend passes the same tests. A backend's harness says only what a test cannot ask through the interface itself: how to make an
artefact look old, and which temporaries it left.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

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
from mvserver.core.object_artefacts import ObjectArtefacts
from mvserver.core.objects import ObjectStorage
from mvserver.core.scratch import Scratch


@dataclass
class Backend:
    store: Artefacts
    age: Callable[[str, float], None]  # make an artefact look ``seconds`` old
    leftovers: Callable[[], list[str]]  # temporaries or parts the backend holds (none once every write has ended)
    redirects: bool = False  # serves by a redirect to the store, which then answers ranges itself


def local_backend(tmp_path: Path) -> Backend:
    outputs = OutputStore(tmp_path / "outputs")
    store = LocalArtefacts(outputs)

    def age(key: str, seconds: float) -> None:
        stamp = time.time() - seconds
        os.utime(store.file(key), (stamp, stamp))

    def leftovers() -> list[str]:
        return sorted(p.name for p in outputs.root.glob("*/.*"))

    return Backend(store, age, leftovers)


def object_backend(tmp_path: Path, request: pytest.FixtureRequest, delivery: str) -> Backend:
    """A bucket of its own on moto's S3 server and a scratch directory; ``delivery``: how it serves."""
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    env = server.bucket_env(bucket, prefix="mv")
    storage = ObjectStorage.from_url(env["MV_STORAGE_URL"], env, part_size=5 * 1024 * 1024)
    scratch = Scratch(tmp_path / "scratch", max_bytes=64 * 1024 * 1024)
    scratch.open()
    request.addfinalizer(scratch.close)
    store = ObjectArtefacts(storage, scratch, delivery=delivery)

    def age(key: str, seconds: float) -> None:
        server.age(bucket, f"mv/{key}", seconds)

    def leftovers() -> list[str]:
        local = [p.name for p in scratch.root.iterdir() if p.name.startswith("out-") or p.suffix == ".part"]
        return server.leftovers(bucket) + sorted(local)

    return Backend(store, age, leftovers, redirects=delivery == "redirect")


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Backend]] = {
    "local": lambda tmp_path, request: local_backend(tmp_path),
    "s3": lambda tmp_path, request: object_backend(tmp_path, request, "redirect"),
    "s3-proxy": lambda tmp_path, request: object_backend(tmp_path, request, "proxy"),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](tmp_path, request)


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


async def test_serve_a_range_past_the_end_is_the_json_416(
    served: tuple[TestClient, str, bytes], backend: Backend
) -> None:
    client, _, data = served
    refused = await client.get("/clip", headers={"Range": f"bytes={len(data)}-"})
    assert refused.status == 416
    if backend.redirects:
        return  # the store's own 416, after the redirect
    assert refused.headers["Content-Range"] == f"bytes */{len(data)}"
    assert refused.headers["Content-Type"] == "application/json"
    error = json.loads(await refused.read())["error"]
    assert error["code"] == "range_not_satisfiable" and error["field"] == "Range"
    assert f"{len(data)}-byte video" in error["message"]


async def test_an_object_store_redirects_to_a_presigned_link_never_cached(
    tmp_path: Path, request: pytest.FixtureRequest, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> None:
    store = object_backend(tmp_path, request, "redirect").store
    key, data = video_key(), bytes(range(256)) * 40
    await store.put_bytes(key, data, create_only=True)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await store.response(key, noun="video", headers={"Content-Type": "video/mp4"})

    app = web.Application()
    app.router.add_get("/clip", handler)
    client = await aiohttp_client(app)
    answer = await client.get("/clip", allow_redirects=False)
    assert answer.status == 302 and answer.headers["Cache-Control"] == "no-store"
    link = urlsplit(answer.headers["Location"])
    query = dict(parse_qsl(link.query))
    assert link.path.endswith(f"/mv/{key}") and query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == "21600" and query["X-Amz-SignedHeaders"] == "host"
    followed = await client.get("/clip", headers={"Range": "bytes=10-19"})  # as a <video> does: Range on the link
    assert followed.status == 206 and await followed.read() == data[10:20]
    assert followed.headers["Content-Type"] == "video/mp4"  # the object's own, set at put


# -- what a node stores, it keeps in scratch (object storage) --------------------------------------------------------

MiB = 1024 * 1024


@dataclass
class Watched:
    store: ObjectArtefacts
    reads: list[str]  # keys read from the bucket (GETs), in order


def watched_store(tmp_path: Path, request: pytest.FixtureRequest, max_bytes: int = 64 * MiB) -> Watched:
    """An object backend (parts of 5 MiB) whose reads from the bucket are noted, with a scratch cap of ``max_bytes``."""
    store = object_backend(tmp_path, request, "proxy").store
    assert isinstance(store, ObjectArtefacts)
    store.scratch_dir.max_bytes = max_bytes
    reads: list[str] = []
    read = store.storage.read

    async def noted(path: str, start: int | None = None, end: int | None = None) -> Any:
        reads.append(path)
        return await read(path, start, end)

    store.storage.read = noted  # type: ignore[method-assign]
    return Watched(store, reads)


def data_of(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of a pattern of its own for each ``seed`` (0-255)."""
    block = bytes((i + seed) % 256 for i in range(256))
    return (block * (size // 256 + 1))[:size]


def in_scratch(store: ObjectArtefacts) -> list[str]:
    return sorted(p.name for p in store.scratch_dir.root.iterdir() if p.name != ".lock")


async def test_a_stored_file_is_kept_in_scratch_not_fetched_back(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An ffmpeg output (``writing``) or an upload (``put_file``), in one PUT or in parts, create-only or not: the
    next ``local_file`` of its key is the written file itself (same inode), with no GET."""
    watched = watched_store(tmp_path, request)
    store = watched.store
    for size in (1000, 6 * MiB):  # one PUT; a staged copy (create-only) or a multipart upload (overwrite)
        for create_only in (True, False):
            key, data = video_key(), data_of(size, int(create_only))
            async with store.writing(key, create_only=create_only) as out:
                out.write_bytes(data)
                inode = out.stat().st_ino
            async with store.local_file(key) as path:
                assert path.stat().st_ino == inode and path.read_bytes() == data
    key = artefact_key("audio", new_id(), ".wav")
    async with store.scratch(key, "upload") as upload:
        upload.write_bytes(b"RIFF....WAVE")
        inode = upload.stat().st_ino
        await store.put_file(key, upload, create_only=True)
        assert not upload.exists()
    async with store.local_file(key) as path:
        assert path.stat().st_ino == inode and path.read_bytes() == b"RIFF....WAVE"
    assert watched.reads == []


async def test_a_losing_create_only_put_keeps_the_winners_copy(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    watched = watched_store(tmp_path, request)
    store = watched.store
    for size in (1000, 6 * MiB):
        key, won, lost = video_key(), data_of(size, 1), data_of(size, 2)
        async with store.writing(key, create_only=True) as out:
            out.write_bytes(won)
            inode = out.stat().st_ino
        with pytest.raises(ArtefactExists):
            async with store.writing(key, create_only=True) as out:
                out.write_bytes(lost)
        with pytest.raises(ArtefactExists):
            await store.put_stream(key, chunks(lost), create_only=True)
        async with store.local_file(key) as path:
            assert path.stat().st_ino == inode and path.read_bytes() == won
    assert watched.reads == []
    assert [name for name in in_scratch(store) if name.endswith(".part") or name.startswith("out-")] == []


async def test_an_object_overwritten_elsewhere_is_fetched_not_read_from_the_old_copy(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An overwriting put keeps its file as the copy of its own version only: once another node overwrites the
    object, ``local_file`` fetches the new one."""
    watched = watched_store(tmp_path, request)
    store = watched.store
    for size in (1000, 6 * MiB):
        key = video_key()
        async with store.writing(key) as out:
            out.write_bytes(data_of(size, 3))
        newer = data_of(size, 4)
        elsewhere = _written(tmp_path / "elsewhere", newer)  # another node's write
        await store.storage.put_file(key, elsewhere, content_type="video/mp4", create_only=False)
        async with store.local_file(key) as path:
            assert path.read_bytes() == newer
        assert watched.reads == [key]
        watched.reads.clear()


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def test_a_stored_stream_is_kept_in_scratch_within_its_cap(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A provider output streamed in create-only is copied into scratch on its way (never more than the cap on
    disk) and found there; a longer stream is stored without a copy; an overwriting stream keeps nothing."""
    cap = 8 * MiB
    watched = watched_store(tmp_path, request, max_bytes=cap)
    store = watched.store
    peak = 0

    async def clip(data: bytes, fail: bool = False) -> AsyncIterator[bytes]:
        nonlocal peak
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]
            peak = max(peak, store.scratch_dir.usage())
        if fail:
            raise ConnectionError("the provider hung up")

    short, shorter = video_key(), video_key()
    await store.put_stream(short, clip(data_of(6 * MiB, 5)), create_only=True)  # in parts, staged
    await store.put_stream(shorter, clip(data_of(1000, 6)), create_only=True)  # one PUT
    for key, data in ((short, data_of(6 * MiB, 5)), (shorter, data_of(1000, 6))):
        async with store.local_file(key) as path:
            assert path.read_bytes() == data
    assert watched.reads == []
    kept = in_scratch(store)
    assert len(kept) == 2 and not any(name.endswith(".part") for name in kept)

    long = video_key()
    peak = 0
    assert await store.put_stream(long, clip(data_of(cap + MiB, 7)), create_only=True) == cap + MiB
    assert peak <= cap  # older copies made room, then the copy stopped at the cap
    left = in_scratch(store)
    assert not any(name.endswith(".part") for name in left) and len(left) <= 2
    stat = await store.stat(long)
    assert stat is not None and stat.size == cap + MiB
    async with store.local_file(long) as path:
        assert path.read_bytes() == data_of(cap + MiB, 7)
    assert watched.reads == [long]
    kept = in_scratch(store)

    with pytest.raises(ConnectionError):
        await store.put_stream(video_key(), clip(data_of(MiB, 8), fail=True), create_only=True)
    overwritten = video_key()
    await store.put_stream(overwritten, clip(data_of(1000, 9)))
    assert in_scratch(store) == kept
    async with store.local_file(overwritten) as path:
        assert path.read_bytes() == data_of(1000, 9)
    assert watched.reads == [long, overwritten]
