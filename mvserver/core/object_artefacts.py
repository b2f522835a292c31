"""The artefact layer on object storage: :class:`ObjectArtefacts` implements
:class:`mvserver.core.artefacts.Artefacts` with an :class:`ObjectStorage` (``MV_STORAGE_URL``) and this node's
:class:`Scratch` directory.

A key (``videos/<id>.mp4``) is the object's name under the storage URL's prefix. Objects get their
``Content-Type`` (from the key's suffix) and ``Content-Disposition`` when they are put, because a presigned link
answers with the object's own headers. Serving is a ``302`` to a presigned link with ``Cache-Control: no-store``
(``MV_STORAGE_DELIVERY=redirect``), or the object streamed through this server with a single Range and ETag/304
(``proxy``); the routes' access checks come before either. ffmpeg's inputs are scratch copies, its outputs scratch
files put when they are finished: no node reads another node's disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from mvserver.appkeys import ARTEFACTS, CONFIG
from mvserver.core.artefacts import ArtefactExists, ArtefactStat, split_key
from mvserver.core.config import ConfigError, EnvSettings
from mvserver.core.errors import ErrorInfo
from mvserver.core.objects import ObjectInfo, ObjectStorage
from mvserver.core.scratch import Scratch, ScratchBusy, default_scratch_dir

log = logging.getLogger("mvserver")

# The type an object is served with, by the last suffix of its key (the routes' own types, set at put).
CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".m4a": "audio/mp4",
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".aac": "audio/aac",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".json": "application/json; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}
DEFAULT_TYPE = "application/octet-stream"


def content_type(key: str) -> str:
    return CONTENT_TYPES.get(PurePosixPath(key).suffix.lower(), DEFAULT_TYPE)


def _etag_value(info: ObjectInfo) -> str:
    """The store's ETag without its quotes (aiohttp quotes it again), or one made of the size and time."""
    if info.etag:
        return _unquoted(info.etag)
    return f"{int(info.modified * 1000):x}-{info.size:x}"


def _unquoted(etag: str) -> str:
    return etag.strip('"').removeprefix("W/").strip('"')


def _scratch_key(key: str, version: str) -> str:
    """The name of an object's version in scratch: a changed object is another copy."""
    return f"{key}@{version}"


class ObjectArtefacts:
    """:class:`Artefacts` in an object store (see the module's docstring)."""

    def __init__(self, storage: ObjectStorage, scratch: Scratch, *, delivery: str = "redirect"):
        assert delivery in ("redirect", "proxy"), delivery
        self.storage = storage
        self.scratch_dir = scratch
        self.delivery = delivery
        self._link_origin: str | None = None

    # -- writes ----------------------------------------------------------------------------------------------

    def _headers(self, key: str) -> dict[str, Any]:
        split_key(key)  # ValueError for anything but an artefact key
        return {"content_type": content_type(key), "filename": PurePosixPath(key).name}

    async def put_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> int:
        try:
            await self.storage.put(key, data, overwrite=not create_only, **self._headers(key))
        except FileExistsError:
            raise ArtefactExists(f"{PurePosixPath(key).name} exists") from None
        return len(data)

    async def put_json(self, key: str, payload: Any, *, create_only: bool = False) -> int:
        data = json.dumps(payload, indent=2, ensure_ascii=False).encode()
        return await self.put_bytes(key, data, create_only=create_only)

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], *, create_only: bool = False) -> int:
        """A create-only stream (a provider's output) is copied into scratch as it goes up and kept there once
        stored, so its probe and poster read it without fetching it back."""
        if not create_only:
            return await self._put_stream(key, chunks, create_only=False)
        async with self.scratch_dir.tee(chunks) as copy:
            size = await self._put_stream(key, copy, create_only=True)
            if copy.complete:
                await self._keep(key, copy.path, size, None, create_only=True)
            return size

    async def _put_stream(self, key: str, chunks: AsyncIterable[bytes], *, create_only: bool) -> int:
        try:
            return await self.storage.put_stream(key, chunks, create_only=create_only, **self._headers(key))
        except FileExistsError:
            raise ArtefactExists(f"{PurePosixPath(key).name} exists") from None

    @contextlib.asynccontextmanager
    async def scratch(self, key: str, tag: str = "") -> AsyncIterator[Path]:
        kind, _, suffix = split_key(key)
        async with self.scratch_dir.output(PurePosixPath("x" + suffix).suffix) as path:
            yield path

    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> int:
        """The file is kept in scratch as the copy of the version it became (:meth:`_keep`), not fetched back."""
        try:
            size, etag = await self.storage.put_file_version(key, path, create_only=create_only, **self._headers(key))
        except FileExistsError:
            raise ArtefactExists(f"{PurePosixPath(key).name} exists") from None
        else:
            await self._keep(key, path, size, etag, create_only=create_only)
            return size
        finally:
            path.unlink(missing_ok=True)  # taken, stored or not

    async def _keep(self, key: str, path: Path, size: int, etag: str | None, *, create_only: bool) -> None:
        """Keep the file ``key`` was just stored from as this node's scratch copy of that version, so the next
        :meth:`local_file` of it (a clip's probe and poster, an assembled film's poster) fetches nothing. The copy
        is named by the version's ETag: the one the store answered for this write, else, after a create-only write,
        the object's now (a create-only object is never replaced, so that is the version written here; a losing
        writer got ArtefactExists and keeps nothing). An overwrite whose ETag the store did not answer keeps
        nothing: another writer's version may be there by now. Failing here only costs a later fetch."""
        if etag is not None:
            version = _unquoted(etag)
        elif create_only:
            try:
                info = await self.storage.stat(key)
            except Exception as exc:  # the object is stored; only the copy is lost
                log.debug("scratch: %s not kept: %s", key, exc)
                return
            if info.size != size:
                return
            version = _etag_value(info)
        else:
            return
        suffix = PurePosixPath(key).suffix
        await asyncio.to_thread(self.scratch_dir.keep, _scratch_key(key, version), path, suffix)

    @contextlib.asynccontextmanager
    async def writing(self, key: str, *, create_only: bool = False, tag: str = "") -> AsyncIterator[Path]:
        async with self.scratch(key, tag) as path:
            yield path
            await self.put_file(key, path, create_only=create_only)

    # -- reads -----------------------------------------------------------------------------------------------

    async def get_bytes(self, key: str) -> bytes:
        return (await self.storage.read_bytes(key))[0]

    async def get_json(self, key: str) -> Any:
        try:
            return json.loads(await self.get_bytes(key))
        except (OSError, ValueError):
            return None

    async def open(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        opened = await self.storage.read(key, start, end)
        async for chunk in opened.chunks:
            yield bytes(chunk)

    async def stat(self, key: str) -> ArtefactStat | None:
        try:
            info = await self.storage.stat(key)
        except FileNotFoundError:
            return None
        return ArtefactStat(key, info.size, info.modified, _etag_value(info))

    async def response(self, key: str, *, noun: str, headers: dict[str, str]) -> web.StreamResponse:
        if self.delivery == "redirect":
            url = await self.storage.link(key)
            return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
        return ObjectResponse(self.storage, key, noun=noun, headers=headers)

    async def link_origin(self) -> str | None:
        if self.delivery != "redirect":
            return None
        if self._link_origin is None:  # every key of the bucket signs to the same origin; signing needs no request
            link = urlsplit(await self.storage.link("videos/origin.mp4"))
            self._link_origin = f"{link.scheme}://{link.netloc}"
        return self._link_origin

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        info = await self.storage.stat(key)  # FileNotFoundError when missing

        async def fetch(path: Path) -> None:
            await self.storage.download(key, path)

        suffix = PurePosixPath(key).suffix
        async with self.scratch_dir.local(_scratch_key(key, _etag_value(info)), fetch, suffix) as path:
            yield path

    # -- deletion ----------------------------------------------------------------------------------------------

    async def delete(self, *keys: str) -> None:
        for key in keys:
            await self.storage.delete(key)

    async def list_old(self, kind: str, before: float) -> list[str]:
        keys = []
        async for info in self.storage.list(kind):
            with contextlib.suppress(ValueError):
                split_key(info.path)
                if info.modified < before:
                    keys.append(info.path)
        return keys


class ObjectResponse(web.StreamResponse):
    """An object streamed through the server (``MV_STORAGE_DELIVERY=proxy``): 200, or 206 for one byte range;
    ETag with 304 for ``If-None-Match`` and 412 for a failed ``If-Match``; ``If-Range``; a range it cannot serve
    (past the end, several ranges, malformed) is the JSON 416 every artefact route answers, naming ``noun``."""

    def __init__(self, storage: ObjectStorage, key: str, *, noun: str, headers: dict[str, str]):
        super().__init__(headers=headers)
        self._storage = storage
        self._key = key
        self._noun = noun

    async def prepare(self, request: web.BaseRequest) -> Any:
        info = await self._storage.stat(self._key)
        etag = _etag_value(info)
        self.etag = etag
        self.last_modified = info.modified
        self.headers["Accept-Ranges"] = "bytes"
        if (if_match := request.if_match) is not None and not _etag_match(etag, if_match, weak=False):
            self.set_status(412)
            self.content_length = 0
            return await super().prepare(request)
        if (if_none := request.if_none_match) is not None and _etag_match(etag, if_none, weak=True):
            self.set_status(304)
            return await super().prepare(request)
        start, end = 0, info.size
        if _range_applies(request, etag, info.modified):
            try:
                found = _one_range(request, info.size)
            except ValueError:
                return await self._unsatisfiable(request, info.size)
            if found is not None:
                start, end = found
                self.set_status(206)
                self.headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
        self.content_length = end - start
        writer = await super().prepare(request)
        if request.method != "HEAD" and end > start:
            opened = await self._storage.read(self._key, start, end)
            async for chunk in opened.chunks:
                await self.write(chunk)
        return writer

    async def _unsatisfiable(self, request: web.BaseRequest, size: int) -> Any:
        error = ErrorInfo(
            "range_not_satisfiable",
            f"the Range header must be one byte range inside the {size}-byte {self._noun}",
            field="Range",
        )
        body = json.dumps({"error": error.to_dict()}).encode()
        self.set_status(416)
        self.headers["Content-Range"] = f"bytes */{size}"
        self.content_type = "application/json"
        self.content_length = len(body)
        writer = await super().prepare(request)
        if request.method != "HEAD":
            await self.write(body)
        return writer


def _etag_match(etag: str, candidates: tuple[Any, ...], *, weak: bool) -> bool:
    if len(candidates) == 1 and candidates[0].value == "*":
        return True
    return any(c.value == etag for c in candidates if weak or not c.is_weak)


def _range_applies(request: web.BaseRequest, etag: str, modified: float) -> bool:
    """Whether a Range header is honoured: always without ``If-Range``; with it, only when it names this version
    (its strong ETag, or a date not before the object's)."""
    raw = request.headers.get("If-Range")
    if raw is None:
        return True
    if raw.startswith(('"', "W/")):
        return raw == f'"{etag}"'
    since = request.if_range
    return since is not None and int(modified) <= since.timestamp()


def _one_range(request: web.BaseRequest, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of the request's single byte range, None without one; ValueError when it
    cannot be served (malformed, several ranges, past the end, an empty object)."""
    if "Range" not in request.headers:
        return None
    window = request.http_range  # ValueError for a malformed header or several ranges
    start, stop = window.start, window.stop
    if start is None and stop is None:
        return None
    if start is None or start < 0:  # a suffix: the last -start bytes
        length = -(start or 0) if start is not None else 0
        if length <= 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - length), size
    if start >= size:
        raise ValueError("range starts past the end")
    return start, size if stop is None else min(stop, size)


def object_artefacts(env: EnvSettings, environ: Mapping[str, str]) -> ObjectArtefacts:
    """The artefact layer of ``MV_STORAGE_URL`` (credentials from ``environ``), with this node's scratch directory
    taken and cleaned (ConfigError when another process holds it)."""
    assert env.storage_url is not None
    scratch = Scratch(env.scratch_dir or default_scratch_dir(env.port), env.scratch_max_bytes)
    try:
        scratch.open()
    except ScratchBusy as exc:
        raise ConfigError(f"environment: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"environment: MV_SCRATCH_DIR={str(scratch.root)!r}: {exc.strerror or exc}") from None
    storage = ObjectStorage.from_url(env.storage_url, environ, link_ttl_seconds=env.storage_link_ttl_seconds)
    return ObjectArtefacts(storage, scratch, delivery=env.storage_delivery)


async def object_storage_context(app: web.Application) -> AsyncIterator[None]:
    """While the app runs: every ``MV_STALE_TEMP_SECONDS``, remove staging objects a crashed writer left (on any
    node); at exit, let go of the scratch directory."""
    store = app[ARTEFACTS]
    if not isinstance(store, ObjectArtefacts):
        yield
        return
    age = app[CONFIG].env.stale_temp_seconds
    task = asyncio.get_running_loop().create_task(_sweep_staging(store.storage, age), name="staging-sweep")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.scratch_dir.close()


async def _sweep_staging(storage: ObjectStorage, age: float) -> None:
    while True:
        try:
            removed = await storage.remove_abandoned_staging(age)
            if removed:
                log.info("removed %d abandoned staging object(s)", removed)
        except Exception as exc:  # an unreachable store must not end the sweep
            log.warning("staging sweep failed: %s", exc)
        await asyncio.sleep(age)
