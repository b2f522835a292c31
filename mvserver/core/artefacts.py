"""The artefact layer: every file the service writes or serves, named by a key such as ``videos/<id>.mp4``.

:class:`Artefacts` is the one interface (write atomically, create-only writes, open as a stream, read JSON, stat,
serve, delete, list old, a local file for ffmpeg); :class:`LocalArtefacts` is its implementation on today's
``outputs/`` directory (:class:`OutputStore`, which also holds the records of jobs and projects). An object store
implements the same interface: its keys are object names, its ``response`` a redirect or a proxied stream, its
``local_file`` a scratch copy.

Several nodes may share one output directory (on Redis). Every temporary is named by :func:`temp_path` with the id
of the node writing it, and every node keeps a heartbeat file ``nodes/<node id>.json`` (its host and process id,
touched while it runs), so a node removes only temporaries that are provably abandoned: their node's process is gone
(same host), or their node has not beaten and the file has not changed for ``MV_STALE_TEMP_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiofiles
from aiohttp import web

from mvserver.appkeys import STORE
from mvserver.core.errors import ApiError, ErrorInfo

log = logging.getLogger("mvserver")

_UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TEMP_SUFFIX = ".part"
FILE_MODE = 0o644  # every file written under outputs/: owner read-write, everyone else read
STALE_TEMP_SECONDS = 900.0  # MV_STALE_TEMP_SECONDS: how long an unowned temporary must be left alone
MAX_BEAT_SECONDS = 60.0

KINDS = ("scenes", "images", "videos", "jobs", "sandbox", "audio", "projects", "nodes")

NODE_ID = uuid.uuid4().hex[:12]
"""This process's node id (12 hex digits, like the Redis store's node names): in the name of every temporary it
writes and of its heartbeat file. A new process is a new node, so a restarted server never mistakes a dead
predecessor's files for its own."""

_TEMP_TAG = re.compile(r"^[a-z0-9]{1,16}$")
_TEMP_OWNER = re.compile(r"\.(?P<node>[0-9a-f]{12})-[0-9a-f]{8}(?:\.[a-z0-9]{1,16})?" + re.escape(TEMP_SUFFIX) + "$")


def new_id() -> str:
    """A fresh random id (UUID version 4, canonical lower-case form)."""
    return str(uuid.uuid4())


def is_valid_id(value: str) -> bool:
    return bool(_UUID4.fullmatch(value))


def check_id(value: str, field: str = "id") -> str:
    """Reject anything but a canonical UUID4 before it comes near the filesystem."""
    if not is_valid_id(value):
        raise ApiError(400, "invalid_id", f"{field} must be a lower-case UUID4 such as {new_id()}", field=field)
    return value


def temp_path(path: Path, tag: str = "") -> Path:
    """The one naming rule of temporaries: a hidden file next to ``path`` named
    ``.<name>.<node id>-<8 random hex>[.<tag>].part``, so a clean-up can tell which node writes it (see
    :meth:`OutputStore.remove_abandoned_temporaries`). ``tag`` (a few lower-case letters or digits) tells several
    temporaries of one output apart."""
    assert not tag or _TEMP_TAG.fullmatch(tag), tag
    return path.with_name(f".{path.name}.{NODE_ID}-{secrets.token_hex(4)}{'.' + tag if tag else ''}{TEMP_SUFFIX}")


def temp_owner(name: str) -> str | None:
    """The node id in a temporary's name (None for a name without one, e.g. written by an older version)."""
    found = _TEMP_OWNER.search(name)
    return found.group("node") if found else None


class ArtefactExists(FileExistsError):
    """A create-only write found the artefact already there (a finished artefact is never overwritten)."""


def write_bytes_atomic(path: Path, data: bytes, mode: int = FILE_MODE, *, create_only: bool = False) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one, never a part (``create_only``:
    :class:`ArtefactExists` if ``path`` exists, which is left as it is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        commit(tmp, path, create_only=create_only)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit(tmp: Path, path: Path, *, create_only: bool = False) -> None:
    """Put the finished (synced) temporary ``tmp`` in place as ``path`` in one step. ``create_only`` links instead
    of renaming, which fails if ``path`` exists: :class:`ArtefactExists`, and ``tmp`` is removed either way."""
    if not create_only:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ArtefactExists(f"{path.name} exists") from None
    finally:
        tmp.unlink(missing_ok=True)


def sync_file(path: Path, mode: int = FILE_MODE) -> int:
    """Give a file another process wrote (ffmpeg) the mode of every output and flush it to disk; its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Heartbeat:
    """What a node's ``nodes/<id>.json`` says: where it runs, and (the file's mtime) when it last beat."""

    node: str
    host: str
    pid: int
    beat: float

    def gone(self) -> bool:
        """Provably dead: it ran on this host and its process no longer exists (or its pid is now this process's,
        which is not that node)."""
        if self.host != socket.gethostname() or self.node == NODE_ID:
            return False
        if self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # e.g. another user's process: alive
            return False
        return False


class OutputStore:
    """The output directory, one sub-directory per kind: paths and atomic writes of the records kept there (jobs,
    projects, the outbox), node heartbeats and the clean-up of temporaries. Artefacts go through
    :class:`LocalArtefacts`, built on it."""

    def __init__(self, root: Path, stale_temp_seconds: float = STALE_TEMP_SECONDS):
        self.root = root.resolve()
        self.node = NODE_ID
        self.stale_temp_seconds = stale_temp_seconds
        for kind in KINDS:
            (self.root / kind).mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, file_id: str, suffix: str) -> Path:
        """The file for an already validated id; the name is built here, never taken from a client."""
        assert kind in KINDS and is_valid_id(file_id), (kind, file_id)
        return self.root / kind / f"{file_id}{suffix}"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root.parent).as_posix() if self.root.parent in path.parents else str(path)

    async def write_bytes(self, path: Path, data: bytes) -> None:
        await asyncio.to_thread(write_bytes_atomic, path, data)

    async def write_json(self, path: Path, payload: Any) -> None:
        data = json.dumps(payload, indent=2, ensure_ascii=False).encode()
        await self.write_bytes(path, data)

    # -- nodes and their temporaries -------------------------------------------------------------------------

    @property
    def heartbeat_path(self) -> Path:
        return self.root / "nodes" / f"{self.node}.json"

    def beat(self) -> None:
        """Say this node is alive: write its heartbeat file (host, pid) the first time, then touch it."""
        path = self.heartbeat_path
        try:
            os.utime(path)
        except FileNotFoundError:
            write_bytes_atomic(
                path,
                json.dumps(
                    {"node": self.node, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
                ).encode(),
            )

    def stop_beating(self) -> None:
        """A clean exit: this node's heartbeat goes (its writers have removed their temporaries)."""
        self.heartbeat_path.unlink(missing_ok=True)

    def heartbeats(self) -> dict[str, Heartbeat]:
        beats = {}
        for path in (self.root / "nodes").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                raw = json.loads(path.read_bytes())
                beats[path.stem] = Heartbeat(path.stem, str(raw["host"]), int(raw["pid"]), path.stat().st_mtime)
        return beats

    def abandoned(self, owner: str | None, mtime: float, beats: dict[str, Heartbeat], now: float) -> bool:
        """Whether a temporary written by node ``owner`` (None: unknown) and last changed at ``mtime`` is provably
        abandoned. Never this node's own (its writer removes it); at once when its node is gone from this host;
        else only when it is older than ``stale_temp_seconds`` and its node has not beaten for as long."""
        if owner == self.node:
            return False
        beat = beats.get(owner) if owner else None
        if beat is not None and beat.gone():
            return True
        stale = now - self.stale_temp_seconds
        return mtime < stale and (beat is None or beat.beat < stale)

    def remove_abandoned_temporaries(self) -> int:
        """Delete the temporaries no live node is writing (left by a crash, on any node sharing this directory),
        and the heartbeats of nodes that are dead; at start-up and every ``stale_temp_seconds``."""
        now = time.time()
        beats = self.heartbeats()
        count = 0
        for path in self.root.glob(f"*/.*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if self.abandoned(temp_owner(path.name), path.stat().st_mtime, beats, now):
                    path.unlink(missing_ok=True)
                    count += 1
        for beat in beats.values():
            if beat.node != self.node and (beat.gone() or beat.beat < now - self.stale_temp_seconds):
                (self.root / "nodes" / f"{beat.node}.json").unlink(missing_ok=True)
        if count:
            log.info("removed %d abandoned temporary file(s)", count)
        return count

    @property
    def beat_interval(self) -> float:
        return max(0.05, min(MAX_BEAT_SECONDS, self.stale_temp_seconds / 4))

    async def keep_beating(self) -> None:
        """Touch the heartbeat every :attr:`beat_interval`; look for abandoned temporaries every
        ``stale_temp_seconds`` (a node that died on another host is noticed without a restart here)."""
        next_sweep = time.monotonic() + self.stale_temp_seconds
        while True:
            await asyncio.sleep(self.beat_interval)
            try:
                await asyncio.to_thread(self.beat)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.stale_temp_seconds
                    await asyncio.to_thread(self.remove_abandoned_temporaries)
            except OSError as exc:  # a full or unreachable disk must not end the heartbeat
                log.warning("node heartbeat failed: %s", exc)


# -- the artefact layer ---------------------------------------------------------------------------------------------

_KEY = re.compile(r"^(?P<kind>[a-z]+)/(?P<id>[0-9a-f-]{36})(?P<suffix>(?:\.[a-z0-9]+)*)$")
CHUNK_BYTES = 256 << 10  # what :meth:`Artefacts.open` reads at a time


def artefact_key(kind: str, file_id: str, suffix: str = "") -> str:
    """The key of an artefact: ``<kind>/<id><suffix>`` (``videos/<id>.mp4``), for an already validated id; the
    name is built here, never taken from a client."""
    key = f"{kind}/{file_id}{suffix}"
    assert kind in KINDS and is_valid_id(file_id) and _KEY.fullmatch(key), key
    return key


def split_key(key: str) -> tuple[str, str, str]:
    """``(kind, id, suffix)`` of a key made by :func:`artefact_key` (ValueError for anything else)."""
    found = _KEY.fullmatch(key)
    if found is None or found["kind"] not in KINDS or not is_valid_id(found["id"]):
        raise ValueError(f"not an artefact key: {key!r}")
    return found["kind"], found["id"], found["suffix"]


@dataclass(frozen=True)
class ArtefactStat:
    """What a reader may know of a stored artefact without reading it."""

    key: str
    size: int
    mtime: float  # seconds since the epoch of the last write
    etag: str  # changes whenever the content may have (the local store's is aiohttp's FileResponse ETag)


class Artefacts(Protocol):
    """Every file the service writes or serves, by key. Writes are atomic (a reader sees the whole artefact or
    none); ``create_only`` writes raise :class:`ArtefactExists` instead of replacing one (a retried or taken-over
    job never overwrites a finished artefact). Reads of a missing artefact raise FileNotFoundError, except
    :meth:`get_json` and :meth:`stat`, which answer None."""

    async def put_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> int:
        """Store ``data``; its size."""
        ...

    async def put_json(self, key: str, payload: Any, *, create_only: bool = False) -> int:
        """Store ``payload`` as indented UTF-8 JSON (a sidecar); its size."""
        ...

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], *, create_only: bool = False) -> int:
        """Store the chunks as they come (never all in memory); nothing is stored if the stream fails or the task is
        cancelled. Its size."""
        ...

    def scratch(self, key: str, tag: str = "") -> contextlib.AbstractAsyncContextManager[Path]:
        """A local temporary file for an artefact to be (``key`` may lack its suffix, e.g. ``audio/<id>``: an upload
        whose format is not known yet), named so the clean-up knows its node; removed at the block's end unless
        :meth:`put_file` took it."""
        ...

    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> int:
        """Store the finished local file ``path`` (from :meth:`scratch`, written by this process or by ffmpeg) as
        ``key``; the file is taken (moved or uploaded and removed). Its size."""
        ...

    def writing(
        self, key: str, *, create_only: bool = False, tag: str = ""
    ) -> contextlib.AbstractAsyncContextManager[Path]:
        """A scratch file to fill (ffmpeg's output), stored as ``key`` when the block ends without an error and
        removed otherwise."""
        ...

    async def get_bytes(self, key: str) -> bytes: ...

    async def get_json(self, key: str) -> Any:
        """The parsed JSON (a sidecar), or None when it is missing or unreadable."""
        ...

    def open(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` as a stream of chunks."""
        ...

    async def stat(self, key: str) -> ArtefactStat | None: ...

    async def response(self, key: str, *, noun: str, headers: dict[str, str]) -> web.StreamResponse:
        """The HTTP answer serving it (single Range, ETag/304, the JSON 416 naming ``noun``); checks of access come
        before. Locally a FileResponse; an object store answers a presigned redirect or proxies the stream."""
        ...

    async def delete(self, *keys: str) -> None:
        """Remove artefacts; a missing one is no error."""
        ...

    async def link_origin(self) -> str | None:
        """The origin (``scheme://host[:port]``) :meth:`response` redirects browsers to, which a page's
        Content-Security-Policy must allow for its ``<video>`` and ``<img>``; None when artefacts are served from
        the server's own origin."""
        ...

    async def list_old(self, kind: str, before: float) -> list[str]:
        """Keys of ``kind`` last written before ``before`` (epoch seconds); temporaries are not artefacts."""
        ...

    def local_file(self, key: str) -> contextlib.AbstractAsyncContextManager[Path]:
        """A local file holding the artefact for the block (ffmpeg's input): the local store's own file, an object
        store's scratch copy. FileNotFoundError when it is missing."""
        ...


class LocalArtefacts:
    """:class:`Artefacts` in today's ``outputs/`` directory: key ``<kind>/<name>`` is the file ``outputs/<kind>/<name>``,
    every temporary sits next to its artefact and is named by :func:`temp_path`."""

    def __init__(self, outputs: OutputStore):
        self.outputs = outputs

    def file(self, key: str) -> Path:
        kind, file_id, suffix = split_key(key)
        return self.outputs.path(kind, file_id, suffix)

    async def put_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> int:
        await asyncio.to_thread(write_bytes_atomic, self.file(key), data, create_only=create_only)
        return len(data)

    async def put_json(self, key: str, payload: Any, *, create_only: bool = False) -> int:
        data = json.dumps(payload, indent=2, ensure_ascii=False).encode()
        return await self.put_bytes(key, data, create_only=create_only)

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], *, create_only: bool = False) -> int:
        async with self.scratch(key) as tmp:
            async with aiofiles.open(tmp, "wb") as handle:
                async for chunk in chunks:
                    await handle.write(chunk)
            return await self.put_file(key, tmp, create_only=create_only)

    @contextlib.asynccontextmanager
    async def scratch(self, key: str, tag: str = "") -> AsyncIterator[Path]:
        kind, file_id, suffix = split_key(key)
        tmp = temp_path(self.outputs.root / kind / f"{file_id}{suffix}", tag)
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)  # at once, even in a task cancelled twice

    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> int:
        dest = self.file(key)

        def store() -> int:
            size = sync_file(path)
            commit(path, dest, create_only=create_only)
            return size

        return await asyncio.to_thread(store)

    @contextlib.asynccontextmanager
    async def writing(self, key: str, *, create_only: bool = False, tag: str = "") -> AsyncIterator[Path]:
        async with self.scratch(key, tag) as tmp:
            yield tmp
            await self.put_file(key, tmp, create_only=create_only)

    async def get_bytes(self, key: str) -> bytes:
        return await asyncio.to_thread(self.file(key).read_bytes)

    async def get_json(self, key: str) -> Any:
        try:
            return json.loads(await self.get_bytes(key))
        except (OSError, ValueError):
            return None

    async def open(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        async with aiofiles.open(self.file(key), "rb") as handle:
            await handle.seek(start)
            left = None if end is None else max(0, end - start)
            while left is None or left > 0:
                chunk = await handle.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    async def stat(self, key: str) -> ArtefactStat | None:
        try:
            st = await asyncio.to_thread(self.file(key).stat)
        except FileNotFoundError:
            return None
        return ArtefactStat(key, st.st_size, st.st_mtime, f"{st.st_mtime_ns:x}-{st.st_size:x}")

    async def response(self, key: str, *, noun: str, headers: dict[str, str]) -> web.StreamResponse:
        return SavedFileResponse(self.file(key), noun=noun, headers=headers)

    async def delete(self, *keys: str) -> None:
        await asyncio.to_thread(_unlink_all, [self.file(key) for key in keys])

    async def link_origin(self) -> str | None:
        return None

    async def list_old(self, kind: str, before: float) -> list[str]:
        assert kind in KINDS, kind
        return await asyncio.to_thread(_old_names, self.outputs.root / kind, kind, before)

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        path = self.file(key)
        if not await asyncio.to_thread(path.is_file):
            raise FileNotFoundError(key)
        yield path


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _old_names(folder: Path, kind: str, before: float) -> list[str]:
    """Keys of the files in ``folder`` named by an id (not temporaries) last changed before ``before``."""
    keys = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            key = f"{kind}/{entry.name}"
            if entry.name.startswith(".") or not _KEY.fullmatch(key) or not is_valid_id(entry.name[:36]):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and entry.stat().st_mtime < before:
                    keys.append(key)
    return keys


async def node_context(app: web.Application) -> AsyncIterator[None]:
    """The node's heartbeat while the app runs (written at start-up by :func:`start_node`); gone at a clean exit."""
    store = app[STORE]
    task = asyncio.get_running_loop().create_task(store.keep_beating(), name="node-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(store.stop_beating)


def start_node(store: OutputStore) -> int:
    """At start-up: announce this node (its heartbeat), then remove what dead nodes left; returns how many."""
    store.beat()
    return store.remove_abandoned_temporaries()


class SavedFileResponse(web.FileResponse):
    """aiohttp's FileResponse (sendfile, single ranges, ETag/304, RFC 9110 precondition order), except that its
    416 carries the JSON error body every other error has instead of an empty body of the file's type (``noun``
    names the file in the message: video, song, image).

    FileResponse decides on 416 (a range past the end, or a multi-range or malformed ``Range``) after the
    conditional headers, sets ``Content-Range: bytes */<size>`` and the status, and only then sends the headers;
    hooking ``set_status`` is what lets the body follow that exact decision rather than a second parse of it.
    """

    _error_body: bytes | None = None

    def __init__(self, path: Path, *, noun: str, **kwargs: Any):
        super().__init__(path, **kwargs)
        self._noun = noun

    def set_status(self, status: int, reason: str | None = None) -> None:
        super().set_status(status, reason)
        if status == web.HTTPRequestRangeNotSatisfiable.status_code and not self.prepared:
            size = self.headers.get("Content-Range", "").rpartition("/")[2]
            error = ErrorInfo(
                "range_not_satisfiable",
                f"the Range header must be one byte range inside the {size}-byte {self._noun}",
                field="Range",
            )
            self._error_body = json.dumps({"error": error.to_dict()}).encode()
            self.content_type = "application/json"
            self.content_length = len(self._error_body)

    async def prepare(self, request: web.BaseRequest) -> Any:
        writer = await super().prepare(request)
        if self._error_body is not None and request.method != "HEAD":
            await self.write(self._error_body)
        return writer
