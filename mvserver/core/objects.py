"""Artefacts in object storage (S3, R2 and other S3-compatible stores, GCS, Azure) through obstore.

The object side of the artefact layer: ``MV_STORAGE_URL`` names the store, each cloud's usual environment variables
its credentials. Every write is create-only or conditional, so a retried or taken-over job never replaces a finished
artefact, and no reader ever sees part of one:

- up to :data:`PART_SIZE` bytes (records, images, most clips) go up in one ``PUT`` with ``If-None-Match: *``
  (or ``If-Match: <etag>`` for a conditional update): atomic and create-only on the server.
- a longer stream goes up as a multipart upload to a staging key (``.staging/<node>-<random>``; at most
  ``(PUT_CONCURRENCY + 1) × PART_SIZE`` bytes in memory) and is then copied into place on the server. obstore's
  multipart put has no create-only mode, and S3's copy-if-not-exists (a multipart copy) drops the object's
  ``Content-Type`` and ``Content-Disposition``, which presigned links rely on. So the copy is create-only where the
  store does it natively and keeps attributes (GCS, Azure), and on S3 it follows a check that the target is absent:
  two writers finishing the same artefact within that one round trip both copy a whole object, the later wins;
  neither is ever partial. The staging object is deleted after the copy; one a crash left behind is removed by
  :meth:`ObjectStorage.remove_abandoned_staging` (incomplete multipart uploads need the bucket's lifecycle rule).

Presigned links cannot override response headers (obstore signs a bare GET), so ``Content-Type`` and
``Content-Disposition`` are set on the object when it is put.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiofiles
import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, NotSupportedError, PreconditionError
from obstore.store import AzureStore, GCSStore, S3Store

if TYPE_CHECKING:
    from obstore import GetOptions

SignableStore = S3Store | GCSStore | AzureStore  # the stores obstore can presign for

PART_SIZE = 8 * 1024 * 1024  # a stream up to this is one create-only PUT; longer ones go up in parts of this size
PUT_CONCURRENCY = 2  # parts of one multipart upload in flight at once
READ_CHUNK = 1024 * 1024  # the smallest chunk a read yields (obstore joins the network's smaller pieces)
STAGING = ".staging"  # where long streams wait for their copy into place; never an artefact's own path
NODE_ID = uuid.uuid4().hex[:12]  # the name of this process in its staging keys

# Each cloud's usual variables, read from the server's environment mapping (first one set wins), as obstore config
# keys. obstore also reads the process environment itself (roles, web identity, instance metadata and the rest).
_ENV_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "s3": (
        ("AWS_ACCESS_KEY_ID", "access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
        ("AWS_SESSION_TOKEN", "session_token"),
        ("AWS_REGION", "region"),
        ("AWS_DEFAULT_REGION", "region"),
        ("AWS_ENDPOINT_URL_S3", "endpoint"),
        ("AWS_ENDPOINT_URL", "endpoint"),
    ),
    "gs": (
        ("GOOGLE_SERVICE_ACCOUNT", "service_account"),
        ("GOOGLE_SERVICE_ACCOUNT_KEY", "service_account_key"),
        ("GOOGLE_APPLICATION_CREDENTIALS", "application_credentials"),
    ),
    "az": (
        ("AZURE_STORAGE_ACCOUNT_NAME", "account_name"),
        ("AZURE_STORAGE_ACCOUNT_KEY", "account_key"),
        ("AZURE_STORAGE_SAS_KEY", "sas_key"),
        ("AZURE_STORAGE_ENDPOINT", "endpoint"),
    ),
}
_FAMILY = {"s3": "s3", "s3a": "s3", "gs": "gs", "az": "az", "azure": "az", "abfs": "az", "abfss": "az"}


class PreconditionFailed(Exception):
    """A conditional write found another version than the one it was based on."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object (``path`` relative to the store's prefix)."""

    path: str
    size: int
    etag: str | None
    modified: float  # seconds since the epoch

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> ObjectInfo:
        return cls(str(meta["path"]), int(meta["size"]), meta.get("e_tag"), meta["last_modified"].timestamp())


@dataclass
class ObjectRead:
    """An open read of an object, or of the byte range ``start``..``end`` (end exclusive) of it."""

    info: ObjectInfo
    start: int
    end: int
    attributes: dict[str, str]
    chunks: AsyncIterator[memoryview] = field(repr=False)

    @property
    def length(self) -> int:
        return self.end - self.start


def build_store(url: str, env: Mapping[str, str]) -> SignableStore:
    """The obstore store of ``url`` (``s3://bucket/prefix``, ``gs://…``, ``az://…``), its credentials and endpoint
    from ``env``; an ``http://`` endpoint (a local S3 such as moto or MinIO) is allowed plain HTTP."""
    family = _FAMILY[urlsplit(url).scheme.lower()]
    config: Any = {}  # the cloud's own TypedDict of settings
    for name, key in _ENV_KEYS[family]:
        value = env.get(name, "").strip()
        if value and key not in config:
            config[key] = value
    client_options: Any = {"allow_http": True} if config.get("endpoint", "").startswith("http://") else None
    if family == "s3":
        return S3Store.from_url(url, config=config, client_options=client_options)
    if family == "gs":
        return GCSStore.from_url(url, config=config, client_options=client_options)
    return AzureStore.from_url(url, config=config, client_options=client_options)


def staging_path(tag: str = "") -> str:
    """A fresh staging key: this node's id (so a clean-up can tell whose it is), the time and a random part."""
    return f"{STAGING}/{NODE_ID}-{int(time.time())}-{secrets.token_hex(6)}{'.' + tag if tag else ''}"


def attributes(content_type: str, filename: str | None, disposition: str = "inline") -> dict[str, str]:
    """The response headers a presigned GET of the object answers with, set on the object at put."""
    found = {"Content-Type": content_type}
    if filename is not None:
        assert filename.isascii() and '"' not in filename and "\\" not in filename, filename
        found["Content-Disposition"] = f'{disposition}; filename="{filename}"'
    return found


async def _first_part(chunks: AsyncIterator[bytes], size: int) -> tuple[list[bytes], int, bool]:
    """Read up to ``size`` bytes (or the first chunk beyond): the chunks, their length and whether the stream ended."""
    head: list[bytes] = []
    total = 0
    while total <= size:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return head, total, True
        if chunk:
            head.append(bytes(chunk))
            total += len(chunk)
    return head, total, False


async def _chained(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    head.clear()  # the parts already sent are not kept for the rest of the upload
    async for chunk in rest:
        yield chunk


async def _file_chunks(path: Path, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
    async with aiofiles.open(path, "rb") as handle:
        while chunk := await handle.read(size):
            yield chunk


class ObjectStorage:
    """One bucket (and prefix) of an object store: create-only and conditional puts, ranged reads, listing, deletion
    and presigned links."""

    def __init__(
        self,
        store: SignableStore,
        *,
        link_ttl_seconds: int = 21600,
        part_size: int = PART_SIZE,
        put_concurrency: int = PUT_CONCURRENCY,
    ):
        self.store = store
        self.link_ttl = timedelta(seconds=link_ttl_seconds)
        self.part_size = part_size
        self.put_concurrency = put_concurrency

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str], **options: Any) -> ObjectStorage:
        return cls(build_store(url, env), **options)

    # -- writes ------------------------------------------------------------------------------------------------

    async def put(
        self,
        path: str,
        data: bytes,
        *,
        content_type: str,
        filename: str | None = None,
        if_match: str | None = None,
        overwrite: bool = False,
    ) -> str | None:
        """Write ``data`` in one request: create-only (FileExistsError when ``path`` exists), or, with ``if_match``,
        only over the version with that ETag (PreconditionFailed otherwise), or with ``overwrite`` over whatever is
        there (still atomic: a reader sees the old object or the new one). Returns the new ETag."""
        mode: Any = "overwrite" if overwrite else "create" if if_match is None else {"e_tag": if_match}
        try:
            result = await obstore.put_async(
                self.store, path, data, mode=mode, attributes=attributes(content_type, filename)
            )
        except AlreadyExistsError:
            raise FileExistsError(path) from None
        except PreconditionError:
            raise PreconditionFailed(path) from None
        return result.get("e_tag")

    async def put_stream(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
        filename: str | None = None,
        create_only: bool = True,
    ) -> int:
        """Write a stream without holding it in memory; returns its length. Create-only: FileExistsError when
        ``path`` exists (found once the stream is read to its end). A stream that fails stores nothing."""
        iterator = aiter(chunks)
        head, size, ended = await _first_part(iterator, self.part_size)
        if ended:
            await self.put(
                path, b"".join(head), content_type=content_type, filename=filename, overwrite=not create_only
            )
            return size
        counted = _Counted(_chained(head, iterator))
        if create_only:
            await self._put_staged(path, counted, content_type=content_type, filename=filename)
        else:
            await self._put_parts(path, counted, content_type=content_type, filename=filename)
        return counted.bytes  # the first part too: it passes through again

    async def put_file(
        self, path: str, local: Path, *, content_type: str, filename: str | None = None, create_only: bool = True
    ) -> int:
        """Write a local file (an ffmpeg output in scratch), create-only unless told; returns its length."""
        found = await self.put_file_version(
            path, local, content_type=content_type, filename=filename, create_only=create_only
        )
        return found[0]

    async def put_file_version(
        self, path: str, local: Path, *, content_type: str, filename: str | None = None, create_only: bool = True
    ) -> tuple[int, str | None]:
        """:meth:`put_file`, with the ETag of the version it wrote as the store answered the write (None after a
        staged copy: the copy does not answer it)."""
        size = (await asyncio.to_thread(local.stat)).st_size
        etag = None
        if size <= self.part_size:
            data = await asyncio.to_thread(local.read_bytes)
            etag = await self.put(path, data, content_type=content_type, filename=filename, overwrite=not create_only)
        elif create_only:
            await self._put_staged(path, local, content_type=content_type, filename=filename)
        else:
            etag = await self._put_parts(path, local, content_type=content_type, filename=filename)
        return size, etag

    async def _put_parts(
        self, path: str, source: AsyncIterable[bytes] | Path, *, content_type: str, filename: str | None
    ) -> str | None:
        """A multipart upload to ``path`` (atomic: the object appears when the upload completes); its ETag."""
        result = await obstore.put_async(
            self.store,
            path,
            source,
            attributes=attributes(content_type, filename),
            use_multipart=True,
            chunk_size=self.part_size,
            max_concurrency=self.put_concurrency,
        )
        return result.get("e_tag")

    async def _put_staged(
        self, path: str, source: AsyncIterable[bytes] | Path, *, content_type: str, filename: str | None
    ) -> None:
        """Multipart upload to a staging key, then a server-side copy into place (see the module's docstring)."""
        staged = staging_path()
        try:
            await self._put_parts(staged, source, content_type=content_type, filename=filename)
            await self._copy_create(staged, path)
        finally:
            await asyncio.shield(self._delete_quietly(staged))

    async def _copy_create(self, source: str, path: str) -> None:
        try:
            await obstore.copy_async(self.store, source, path, overwrite=False)
            return
        except AlreadyExistsError:
            raise FileExistsError(path) from None
        except NotSupportedError:  # S3 without copy-if-not-exists: check, then copy with the object's attributes
            pass
        if await self.exists(path):
            raise FileExistsError(path)
        await obstore.copy_async(self.store, source, path, overwrite=True)

    # -- reads ---------------------------------------------------------------------------------------------------

    async def stat(self, path: str) -> ObjectInfo:
        """The object's size, ETag and time; FileNotFoundError when it does not exist."""
        try:
            return ObjectInfo.of(await obstore.head_async(self.store, path))
        except NotFoundError:
            raise FileNotFoundError(path) from None

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFoundError:
            return False
        return True

    async def read(self, path: str, start: int | None = None, end: int | None = None) -> ObjectRead:
        """Open the object, or bytes ``start``..``end`` (end exclusive; None: to the end) of it, as a stream.
        FileNotFoundError when it does not exist; a range past its end is clipped to it by the store."""
        options: GetOptions = {}
        if end is not None:
            options["range"] = (start or 0, end)
        elif start:
            options["range"] = {"offset": start}
        try:
            result = await obstore.get_async(self.store, path, options=options or None)
        except NotFoundError:
            raise FileNotFoundError(path) from None
        first, last = result.range
        stream = result.stream(min_chunk_size=READ_CHUNK)

        async def chunks() -> AsyncIterator[memoryview]:
            async for chunk in stream:
                yield memoryview(chunk)

        return ObjectRead(ObjectInfo.of(result.meta), first, last, dict(result.attributes), chunks())

    async def read_bytes(self, path: str) -> tuple[bytes, ObjectInfo]:
        """A small object whole (a record), with its ETag for a conditional update."""
        opened = await self.read(path)
        data = b"".join([bytes(chunk) async for chunk in opened.chunks])
        return data, opened.info

    async def download(self, path: str, local: Path) -> ObjectInfo:
        """Copy the object into the local file ``local`` (created or truncated), chunk by chunk."""
        opened = await self.read(path)
        async with aiofiles.open(local, "wb") as handle:
            async for chunk in opened.chunks:
                await handle.write(chunk)
        return opened.info

    async def list(self, prefix: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix`` (a path of whole segments, such as ``videos``), staging keys left out."""
        async for batch in obstore.list(self.store, prefix=prefix, chunk_size=500):
            for meta in batch:
                info = ObjectInfo.of(meta)
                if not info.path.startswith(STAGING + "/"):
                    yield info

    async def link(self, path: str, ttl_seconds: int | None = None) -> str:
        """A presigned GET URL of the object (SigV4 on S3), valid for ``ttl_seconds`` or ``MV_STORAGE_LINK_TTL``."""
        ttl = self.link_ttl if ttl_seconds is None else timedelta(seconds=ttl_seconds)
        return await obstore.sign_async(self.store, "GET", path, ttl)

    # -- deletion ------------------------------------------------------------------------------------------------

    async def delete(self, path: str) -> None:
        """Remove the object; removing one that is already gone is not an error."""
        with contextlib.suppress(NotFoundError):
            await obstore.delete_async(self.store, path)

    async def _delete_quietly(self, path: str) -> None:
        with contextlib.suppress(Exception):
            await self.delete(path)

    async def remove_abandoned_staging(self, older_than_seconds: float) -> int:
        """Delete staging objects older than ``older_than_seconds`` (a writer that died between its upload and its
        copy); a live writer's staging object lives for one copy, far less than any sensible age."""
        cutoff = time.time() - older_than_seconds
        stale = [
            str(meta["path"])
            async for batch in obstore.list(self.store, prefix=STAGING, chunk_size=500)
            for meta in batch
            if meta["last_modified"].timestamp() < cutoff
        ]
        if stale:
            await obstore.delete_async(self.store, stale)
        return len(stale)


class _Counted:
    """An async iterator that counts the bytes passing through it."""

    def __init__(self, chunks: AsyncIterator[bytes]):
        self.chunks = chunks
        self.bytes = 0

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self.chunks)
        self.bytes += len(chunk)
        return chunk
