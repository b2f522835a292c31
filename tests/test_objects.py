"""Object storage (``core/objects.py``) against moto's S3 server over the real wire protocol, and the node's
scratch directory (``core/scratch.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import pytest
from helpers import PROJECT
from object_store import REGION, SECRET_ACCESS_KEY, S3Server

from mvserver.core.objects import STAGING, ObjectStorage, PreconditionFailed, staging_path
from mvserver.core.scratch import Scratch, ScratchBusy, default_scratch_dir

MiB = 1024 * 1024


@pytest.fixture
def storage(s3_env: dict[str, str]) -> ObjectStorage:
    """The test's bucket (prefix ``mv``), with the smallest part S3 accepts so a few MiB already go up in parts."""
    return ObjectStorage.from_url(s3_env["MV_STORAGE_URL"], s3_env, link_ttl_seconds=5400, part_size=5 * MiB)


async def pattern(size: int, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    """``size`` bytes of a position-dependent pattern (a misplaced part shows), made chunk by chunk."""
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        yield pattern_bytes(sent, n)
        sent += n


def pattern_bytes(start: int, n: int) -> bytes:
    block = bytes(range(251)) * (n // 251 + 2)  # 251 is prime: no two parts of a 5 MiB-aligned stream look alike
    offset = start % 251
    return block[offset : offset + n]


# -- writes ----------------------------------------------------------------------------------------------------------


async def test_a_create_only_put_refuses_a_second_put(storage: ObjectStorage) -> None:
    etag = await storage.put("scenes/a.json", b'{"v": 1}', content_type="application/json")
    with pytest.raises(FileExistsError):
        await storage.put("scenes/a.json", b'{"v": 2}', content_type="application/json")
    data, info = await storage.read_bytes("scenes/a.json")
    assert data == b'{"v": 1}' and info.etag == etag and info.size == 8


async def test_a_conditional_put_replaces_only_the_version_it_read(storage: ObjectStorage) -> None:
    first = await storage.put("projects/p.json", b"1", content_type="application/json")
    second = await storage.put("projects/p.json", b"2", content_type="application/json", if_match=first)
    assert second != first
    with pytest.raises(PreconditionFailed):  # a writer that read version 1 lost the race
        await storage.put("projects/p.json", b"3", content_type="application/json", if_match=first)
    assert (await storage.read_bytes("projects/p.json"))[0] == b"2"


async def test_a_short_stream_is_one_create_only_put_with_its_headers(
    storage: ObjectStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    size = await storage.put_stream(
        "images/i.png", pattern(300_000), content_type="image/png", filename="character.png"
    )
    assert size == 300_000
    head = s3_server.client.head_object(Bucket=s3_bucket, Key="mv/images/i.png")
    assert head["ContentType"] == "image/png" and head["ContentLength"] == 300_000
    assert head["ContentDisposition"] == 'inline; filename="character.png"'
    assert "-" not in head["ETag"]  # a single PUT's ETag is the MD5 of the body
    with pytest.raises(FileExistsError):
        await storage.put_stream("images/i.png", pattern(10), content_type="image/png")
    assert (await storage.read_bytes("images/i.png"))[0] == pattern_bytes(0, 300_000)


async def test_a_long_stream_goes_up_in_parts_create_only(
    storage: ObjectStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    size = 12 * MiB + 12345  # three parts of 5 MiB
    written = await storage.put_stream("videos/v.mp4", pattern(size), content_type="video/mp4", filename="v.mp4")
    assert written == size
    head = s3_server.client.head_object(Bucket=s3_bucket, Key="mv/videos/v.mp4")
    assert head["ContentLength"] == size and head["ContentType"] == "video/mp4"  # the copy kept the attributes
    assert head["ContentDisposition"] == 'inline; filename="v.mp4"'
    data, _ = await storage.read_bytes("videos/v.mp4")
    assert hashlib.sha256(data).digest() == hashlib.sha256(pattern_bytes(0, size)).digest()

    with pytest.raises(FileExistsError):  # a retried job's second upload leaves the finished one alone
        await storage.put_stream("videos/v.mp4", pattern(6 * MiB, chunk=MiB), content_type="video/mp4")
    assert s3_server.client.head_object(Bucket=s3_bucket, Key="mv/videos/v.mp4")["ETag"] == head["ETag"]
    listed = s3_server.client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert [item["Key"] for item in listed] == ["mv/videos/v.mp4"]  # no staging object left behind
    assert not s3_server.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


async def test_a_long_local_file_goes_up_create_only(storage: ObjectStorage, tmp_path: Path) -> None:
    local = tmp_path / "assembly.mp4"
    local.write_bytes(pattern_bytes(7, 11 * MiB))
    assert await storage.put_file("videos/a.mp4", local, content_type="video/mp4") == 11 * MiB
    with pytest.raises(FileExistsError):
        await storage.put_file("videos/a.mp4", local, content_type="video/mp4")
    small = tmp_path / "window.mp4"
    small.write_bytes(b"\0\0\0\x18ftypmp42")
    await storage.put_file("videos/w.mp4", small, content_type="video/mp4")
    with pytest.raises(FileExistsError):
        await storage.put_file("videos/w.mp4", small, content_type="video/mp4")
    assert (await storage.stat("videos/a.mp4")).size == 11 * MiB


async def test_an_overwriting_put_replaces_whole_objects(storage: ObjectStorage) -> None:
    await storage.put("audio/s.json", b"old", content_type="application/json")
    await storage.put("audio/s.json", b"new", content_type="application/json", overwrite=True)
    assert (await storage.read_bytes("audio/s.json"))[0] == b"new"
    size = 11 * MiB
    await storage.put_stream("videos/o.mp4", pattern(10), content_type="video/mp4")
    assert await storage.put_stream("videos/o.mp4", pattern(size), content_type="video/mp4", create_only=False) == size
    assert (await storage.stat("videos/o.mp4")).size == size


async def failing(size: int) -> AsyncIterator[bytes]:
    async for chunk in pattern(size):
        yield chunk
    raise ConnectionError("the provider hung up")


@pytest.mark.parametrize("create_only", [True, False])
@pytest.mark.parametrize("size", [100_000, 12 * MiB], ids=["one-put", "parts"])
async def test_a_stream_that_fails_stores_nothing(
    storage: ObjectStorage, s3_server: S3Server, s3_bucket: str, size: int, create_only: bool
) -> None:
    with pytest.raises(ConnectionError, match="hung up"):
        await storage.put_stream("videos/f.mp4", failing(size), content_type="video/mp4", create_only=create_only)
    assert not s3_server.client.list_objects_v2(Bucket=s3_bucket).get("Contents")
    assert not s3_server.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # aborted, not left


STREAMING_PUT = """
import asyncio, json, os, re, sys
from pathlib import Path
from mvserver.core.objects import ObjectStorage

env = json.loads(sys.argv[1])
size = int(sys.argv[2])
storage = ObjectStorage.from_url(env["MV_STORAGE_URL"], env, part_size=5 * 1024 * 1024)
CHUNK = 256 * 1024
block = bytes(range(256)) * (CHUNK // 256)

async def chunks():  # a fresh buffer each time, as a network read gives
    for i in range(size // CHUNK):
        yield bytes([i % 256]) + block[1:]

def peak_kib():  # this process's own peak RSS (ru_maxrss would start at the forking parent's)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

async def main():
    await storage.put("warm-up", b"x", content_type="text/plain")  # the client and its TLS state, built once
    before = peak_kib()
    await storage.put_stream("videos/big.mp4", chunks(), content_type="video/mp4")
    after = peak_kib()
    print(json.dumps({"before": before, "after": after, "growth_kib": after - before, "size": (await storage.stat("videos/big.mp4")).size}))

asyncio.run(main())
# obstore's tokio worker threads are not stopped before the interpreter finalises, and one still busy then can abort
# the process (SIGABRT) after the work is done: leave without finalising once the result is out.
sys.stdout.flush()
os._exit(0)
"""


def test_a_long_stream_is_never_held_in_memory(s3_env: dict[str, str]) -> None:
    """Peak RSS of a process streaming 96 MiB into the store grows by a few parts, not by the stream (moto runs in
    the test process, so the writer is a process of its own)."""
    size = 96 * MiB
    done = subprocess.run(
        [sys.executable, "-c", STREAMING_PUT, json.dumps(s3_env), str(size)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["size"] == size
    # Measured: 10.8-11.2 MiB with parts of 5 MiB, two in flight (the bound leaves room for a loaded machine); obstore's default of 12 in flight took 61 MiB, and the
    # stream held whole (one PUT) 192 MiB.
    assert result["growth_kib"] < 32 * 1024, result


# -- reads -----------------------------------------------------------------------------------------------------------


async def test_a_ranged_read_gives_those_bytes_only(storage: ObjectStorage) -> None:
    size = 2 * MiB
    await storage.put_stream("videos/r.mp4", pattern(size), content_type="video/mp4")
    opened = await storage.read("videos/r.mp4", 1000, 1100)
    assert (opened.start, opened.end, opened.length, opened.info.size) == (1000, 1100, 100, size)
    assert opened.attributes["Content-Type"] == "video/mp4"
    assert b"".join([bytes(c) async for c in opened.chunks]) == pattern_bytes(1000, 100)
    head = await storage.read("videos/r.mp4", end=10)
    assert (head.start, head.end) == (0, 10)
    assert b"".join([bytes(c) async for c in head.chunks]) == pattern_bytes(0, 10)
    tail = await storage.read("videos/r.mp4", size - 10)
    assert (tail.start, tail.end) == (size - 10, size)
    assert b"".join([bytes(c) async for c in tail.chunks]) == pattern_bytes(size - 10, 10)
    with pytest.raises(FileNotFoundError):
        await storage.read("videos/missing.mp4", 0, 10)
    with pytest.raises(FileNotFoundError):
        await storage.stat("videos/missing.mp4")


async def test_list_names_the_objects_under_a_prefix_and_delete_removes_them(storage: ObjectStorage) -> None:
    for path in ("videos/1.mp4", "videos/2.mp4", "images/1.png", "videos-old/x.mp4"):
        await storage.put(path, b"x", content_type="application/octet-stream")
    await storage.put(staging_path(), b"half an upload", content_type="application/octet-stream")
    assert sorted([info.path async for info in storage.list("videos")]) == ["videos/1.mp4", "videos/2.mp4"]
    everything = sorted([info.path async for info in storage.list()])
    assert everything == ["images/1.png", "videos-old/x.mp4", "videos/1.mp4", "videos/2.mp4"]  # staging left out
    await storage.delete("videos/1.mp4")
    await storage.delete("videos/1.mp4")  # already gone: not an error
    assert not await storage.exists("videos/1.mp4")
    assert [info.path async for info in storage.list("videos")] == ["videos/2.mp4"]


async def test_abandoned_staging_objects_are_removed_by_age(storage: ObjectStorage) -> None:
    await storage.put(staging_path(), b"left by a crash", content_type="application/octet-stream")
    await storage.put("videos/kept.mp4", b"x", content_type="video/mp4")
    assert await storage.remove_abandoned_staging(older_than_seconds=3600) == 0  # too young: maybe a live writer
    assert await storage.remove_abandoned_staging(older_than_seconds=0) == 1
    assert [info.path async for info in storage.list()] == ["videos/kept.mp4"]
    assert not [m async for batch in __import__("obstore").list(storage.store, prefix=STAGING) for m in batch]


# -- presigned links -------------------------------------------------------------------------------------------------


def sigv4_query_signature(method: str, url: str, secret: str) -> str:
    """SigV4's signature of a presigned URL for ``method`` (AWS's algorithm for query-string authentication)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "X-Amz-Signature"]
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query))
    fields = dict(query)
    canonical = "\n".join(
        [
            method,
            parts.path,
            canonical_query,
            f"host:{parts.netloc}\n",
            fields["X-Amz-SignedHeaders"],
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = fields["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", fields["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    date, region, service, _ = scope.split("/")
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


async def test_a_presigned_link_is_a_sigv4_get_of_the_ttl_and_serves_ranges(
    storage: ObjectStorage, s3_server: S3Server, s3_bucket: str
) -> None:
    size = 300_000
    await storage.put_stream("videos/s.mp4", pattern(size), content_type="video/mp4", filename="clip.mp4")
    url = await storage.link("videos/s.mp4")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert f"{parts.scheme}://{parts.netloc}" == s3_server.endpoint
    assert parts.path == f"/{s3_bucket}/mv/videos/s.mp4"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == "5400"  # the store's link lifetime
    assert query["X-Amz-SignedHeaders"] == "host"  # nothing a browser would have to repeat
    assert query["X-Amz-Credential"].endswith(f"/{REGION}/s3/aws4_request")
    # moto checks no signature, so check it here: it is the signature of a GET (and of nothing else).
    assert query["X-Amz-Signature"] == sigv4_query_signature("GET", url, SECRET_ACCESS_KEY)
    assert query["X-Amz-Signature"] != sigv4_query_signature("PUT", url, SECRET_ACCESS_KEY)
    assert dict(parse_qsl(urlsplit(await storage.link("videos/s.mp4", ttl_seconds=60)).query))["X-Amz-Expires"] == "60"

    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Range": "bytes=1000-1999"}) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 1000-1999/{size}"
            assert response.headers["Content-Type"] == "video/mp4"  # set on the object at put
            assert response.headers["Content-Disposition"] == 'inline; filename="clip.mp4"'
            assert await response.read() == pattern_bytes(1000, 1000)


# -- scratch ---------------------------------------------------------------------------------------------------------


def writer(data: bytes, calls: list[str] | None = None, name: str = ""):
    async def fetch(path: Path) -> None:
        if calls is not None:
            calls.append(name)
        await asyncio.to_thread(path.write_bytes, data)

    return fetch


async def use(scratch: Scratch, key: str, size: int = 1024, calls: list[str] | None = None) -> Path:
    async with scratch.local(key, writer(b"k" * size, calls, key), ".mp4") as path:
        assert path.read_bytes() == b"k" * size
        return path


def cached(scratch: Scratch) -> set[str]:
    return {name for _, name, _ in scratch._files(include_temporaries=True)}


async def test_scratch_evicts_the_least_recently_used_down_to_its_cap(tmp_path: Path) -> None:
    scratch = Scratch(tmp_path / "scratch", max_bytes=3 * 1024)
    scratch.open()
    calls: list[str] = []
    for key in ("a", "b", "c"):
        await use(scratch, key, calls=calls)
    await use(scratch, "a", calls=calls)  # a hit: used again, fetched once
    assert calls == ["a", "b", "c"]
    await use(scratch, "d", calls=calls)  # over the cap: b is the least recently used
    assert cached(scratch) == {scratch.name(k, ".mp4") for k in ("a", "c", "d")}
    await use(scratch, "e", calls=calls)
    assert cached(scratch) == {scratch.name(k, ".mp4") for k in ("a", "d", "e")}
    assert scratch.usage() == 3 * 1024
    await use(scratch, "b", calls=calls)  # evicted, so fetched again
    assert calls == ["a", "b", "c", "d", "e", "b"]
    assert scratch.usage() <= 3 * 1024


async def test_scratch_never_evicts_a_file_in_use(tmp_path: Path) -> None:
    scratch = Scratch(tmp_path / "scratch", max_bytes=2 * 1024)
    scratch.open()
    async with scratch.local("held", writer(b"h" * 1024), ".mp4") as held:
        for key in ("x", "y", "z"):
            await use(scratch, key)  # "held" is the oldest, but in use
            assert held.read_bytes() == b"h" * 1024
        async with scratch.local("big", writer(b"b" * 4096)) as big:  # larger than the cap while in use
            assert big.exists() and held.exists()
            assert scratch.usage() > scratch.max_bytes
        assert not big.exists()  # released: evicted back under the cap
    assert scratch.usage() <= 2 * 1024


async def test_scratch_fetches_a_key_once_for_concurrent_users(tmp_path: Path) -> None:
    scratch = Scratch(tmp_path / "scratch", max_bytes=MiB)
    scratch.open()
    calls: list[str] = []
    release = asyncio.Event()

    async def slow(path: Path) -> None:
        calls.append("fetch")
        await release.wait()
        path.write_bytes(b"clip")

    async def reader() -> bytes:
        async with scratch.local("clip@etag1", slow, ".mp4") as path:
            return path.read_bytes()

    tasks = [asyncio.create_task(reader()) for _ in range(3)]
    while not calls:
        await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == [b"clip"] * 3
    assert calls == ["fetch"]


async def test_a_failed_fetch_leaves_nothing_and_a_restart_clears_unfinished_ones(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    scratch = Scratch(root, max_bytes=MiB)
    scratch.open()

    async def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        async with scratch.local("k", broken):
            pass
    assert cached(scratch) == set()
    (root / "0123.abcd.part").write_bytes(b"left by a killed process")
    (root / "out-0123abcd.mp4").write_bytes(b"half an ffmpeg output")
    with pytest.raises(ScratchBusy, match="MV_SCRATCH_DIR"):  # one process per scratch directory
        Scratch(root, max_bytes=MiB).open()
    scratch.close()
    again = Scratch(root, max_bytes=MiB)
    assert again.open() == 2
    assert cached(again) == set()
    async with again.output(".mp4") as out:
        out.write_bytes(b"ffmpeg output")
        assert cached(again) == {out.name}
    assert not out.exists()
    again.close()
    assert default_scratch_dir(8080).name == f"mvserver-scratch-{os.getuid()}-8080"


async def test_scratch_holds_a_local_copy_of_a_stored_object(storage: ObjectStorage, tmp_path: Path) -> None:
    size = 6 * MiB
    await storage.put_stream("videos/c.mp4", pattern(size), content_type="video/mp4")
    info = await storage.stat("videos/c.mp4")
    scratch = Scratch(tmp_path / "scratch", max_bytes=64 * MiB)
    scratch.open()
    key = f"videos/c.mp4@{info.etag}"
    async with scratch.local(key, lambda path: storage.download("videos/c.mp4", path), ".mp4") as local:
        assert local.stat().st_size == size
        assert local.read_bytes() == pattern_bytes(0, size)
    scratch.close()
