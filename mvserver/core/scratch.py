"""This node's scratch directory: local copies of stored objects for ffmpeg, bounded in size.

With artefacts in object storage, ffmpeg still reads local files (clips for an assembly, a song for a lip-sync
cut) and writes one. :meth:`Scratch.local` fetches an object into ``MV_SCRATCH_DIR`` once and hands out its path
while a caller uses it; :meth:`Scratch.output` gives a path for a file to be written and then stored, and
:meth:`Scratch.keep` makes a file just stored (an output, or a :meth:`Scratch.tee` copy of a stream) the local copy
of its object, so this node never fetches back what it wrote. The directory
is kept under ``MV_SCRATCH_MAX_MB`` by removing the least recently used files first; a file in use (between entering
and leaving its context) is never removed, so the cap may be passed while more than the cap is in use.

A copy is named by a hash of its key, which callers make from the object's path *and* ETag, so a changed object is
fetched again and an old copy just ages out. Recency is the file's mtime, touched at each use, so it survives a
restart. The directory belongs to one process (an exclusive lock on ``.lock``): nodes never share scratch, and a
process starting on it removes the unfinished downloads and outputs a dead predecessor left there, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("mvserver")

TEMP_SUFFIX = ".part"
OUTPUT_PREFIX = "out-"
LOCK_NAME = ".lock"


class ScratchBusy(RuntimeError):
    """Another process holds the scratch directory."""


def default_scratch_dir(port: int) -> Path:
    """``<temporary directory>/mvserver-scratch-<uid>-<port>``: one per server process on a machine."""
    return Path(tempfile.gettempdir()) / f"mvserver-scratch-{os.getuid()}-{port}"


class Scratch:
    """A size-capped directory of local files, least recently used out first, files in use kept."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        self._pins: dict[str, int] = {}
        self._fetching: dict[str, asyncio.Lock] = {}
        self._lock_fd: int | None = None

    # -- life cycle ----------------------------------------------------------------------------------------------

    def open(self) -> int:
        """Take the directory (ScratchBusy when another process has it), remove unfinished downloads and evict down
        to the cap; returns how many files were removed."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ScratchBusy(
                f"MV_SCRATCH_DIR {self.root} is in use by another process (one directory per process)"
            ) from None
        self._lock_fd = fd
        removed = 0
        for path in [*self.root.glob(f"*{TEMP_SUFFIX}"), *self.root.glob(f"{OUTPUT_PREFIX}*")]:
            path.unlink(missing_ok=True)  # a dead process's unfinished download or ffmpeg output
            removed += 1
        return removed + self.evict()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- use -----------------------------------------------------------------------------------------------------

    def name(self, key: str, suffix: str = "") -> str:
        """The file name of ``key`` (a hash: any key is a safe name), keeping ``suffix`` for ffmpeg's eyes."""
        assert not suffix or (suffix.startswith(".") and suffix[1:].isalnum() and len(suffix) <= 8), suffix
        return hashlib.sha256(key.encode()).hexdigest()[:40] + suffix

    @contextlib.asynccontextmanager
    async def local(
        self, key: str, fetch: Callable[[Path], Awaitable[object]], suffix: str = ""
    ) -> AsyncIterator[Path]:
        """The local copy of ``key``, fetched by ``await fetch(temporary path)`` when absent; kept while in use.

        Concurrent users of one key share one fetch. A failed fetch leaves nothing behind."""
        name = self.name(key, suffix)
        path = self.root / name
        self._pin(name)
        try:
            lock = self._fetching.setdefault(name, asyncio.Lock())
            async with lock:
                if not await asyncio.to_thread(_touch, path):
                    tmp = self.root / f"{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
                    try:
                        await fetch(tmp)
                        await asyncio.to_thread(os.replace, tmp, path)
                    finally:
                        tmp.unlink(missing_ok=True)
                    await asyncio.to_thread(self.evict)
            yield path
        finally:
            self._unpin(name)
            if name not in self._pins:
                self._fetching.pop(name, None)
        await asyncio.to_thread(self.evict)

    @contextlib.asynccontextmanager
    async def output(self, suffix: str = "") -> AsyncIterator[Path]:
        """A fresh path in scratch for a file to be written (an ffmpeg output) and stored; removed at the end."""
        name = f"{OUTPUT_PREFIX}{secrets.token_hex(8)}{suffix}"
        path = self.root / name
        self._pin(name)
        try:
            yield path
        finally:
            self._unpin(name)
            path.unlink(missing_ok=True)

    def keep(self, key: str, path: Path, suffix: str = "") -> bool:
        """Make the finished file ``path`` (a scratch output or :meth:`tee` copy) the local copy of ``key`` by
        renaming it, no copy, so what this node has just stored is not fetched back. A file larger than the cap, or
        one on another file system, is not kept; ``path`` is gone either way. Whether it was kept. Blocking."""
        target = self.root / self.name(key, suffix)
        try:
            if path.stat().st_size > self.max_bytes:
                return False
            os.replace(path, target)
        except OSError as exc:
            log.debug("scratch: %s not kept: %s", path, exc)
            return False
        finally:
            path.unlink(missing_ok=True)
        _touch(target)
        self.evict()
        return True

    @contextlib.asynccontextmanager
    async def tee(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[Tee]:
        """``chunks`` passed through while they are copied into a temporary here (see :class:`Tee`), for
        :meth:`keep` once the stream has been stored; removed at the end unless kept."""
        copy = Tee(chunks, self.root / f"tee-{secrets.token_hex(8)}{TEMP_SUFFIX}", self._make_room)
        try:
            yield copy
        finally:
            copy.drop()  # at once, even in a task cancelled twice

    # -- size ----------------------------------------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes of the files in the directory (unfinished downloads included)."""
        return sum(size for _, _, size in self._files(include_temporaries=True))

    def evict(self, reserve: int = 0) -> int:
        """Remove least recently used files not in use until the directory fits the cap with ``reserve`` bytes to
        spare; returns how many."""
        files = self._files(include_temporaries=True)
        total = sum(size for _, _, size in files)
        removed = 0
        for mtime, name, size in sorted(files):
            if total + reserve <= self.max_bytes:
                break
            if name in self._pins or name.endswith(TEMP_SUFFIX) or name.startswith(OUTPUT_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
                total -= size
                removed += 1
                log.debug("scratch: evicted %s (%d bytes, last used %.0f)", name, size, mtime)
        return removed

    def _make_room(self, size: int) -> int:
        """Evict until ``size`` more bytes fit under the cap; the bytes that fit then (less than ``size`` when files
        in use fill it)."""
        self.evict(size)
        return self.max_bytes - self.usage()

    def _files(self, *, include_temporaries: bool) -> list[tuple[float, str, int]]:
        found = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name == LOCK_NAME or not entry.is_file(follow_symlinks=False):
                    continue
                if not include_temporaries and entry.name.endswith(TEMP_SUFFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat(follow_symlinks=False)
                    found.append((stat.st_mtime, entry.name, stat.st_size))
        return found

    def _pin(self, name: str) -> None:
        self._pins[name] = self._pins.get(name, 0) + 1

    def _unpin(self, name: str) -> None:
        left = self._pins[name] - 1
        if left:
            self._pins[name] = left
        else:
            del self._pins[name]


class Tee:
    """A stream passed on unchanged while its chunks are written to a file in scratch, within the cap: when the room
    it last found is used up it asks ``make_room`` (which evicts least recently used copies) for the next chunk;
    when there is none (a stream longer than the cap, or files in use fill it) the copy is dropped at once and the
    rest passes uncopied, and so is a copy that cannot be written (a full disk): the copy never fails the stream."""

    def __init__(self, chunks: AsyncIterable[bytes], path: Path, make_room: Callable[[int], int]):
        self._chunks = aiter(chunks)
        self.path = path
        self._make_room = make_room
        self._room = 0  # bytes the copy may reach before it asks for more
        self.written = 0
        self._file: BinaryIO | None = None
        self._ended = False
        self._dropped = False

    @property
    def complete(self) -> bool:
        """Whether the stream has ended and the file holds all of it."""
        return self._ended and not self._dropped

    def __aiter__(self) -> Tee:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._ended = True
            if not self._dropped:
                await asyncio.to_thread(self._close)
            raise
        if chunk and not self._dropped:
            await self._write(chunk)
        return chunk

    async def _write(self, chunk: bytes) -> None:
        if self.written + len(chunk) > self._room:
            free = await asyncio.to_thread(self._make_room, len(chunk))
            if free < len(chunk):
                self.drop()
                return
            self._room = self.written + free
        try:
            if self._file is None:
                self._file = await asyncio.to_thread(open, self.path, "xb")
            await asyncio.to_thread(self._file.write, chunk)
            self.written += len(chunk)
        except OSError as exc:
            log.warning("scratch: the copy of a stored stream was dropped: %s", exc)
            self.drop()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.path.touch()  # an empty stream: an empty copy

    def drop(self) -> None:
        """Stop copying and remove the copy (a no-op once :meth:`Scratch.keep` took it)."""
        self._dropped = True
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


def _touch(path: Path) -> bool:
    """Mark ``path`` used now (its mtime orders eviction); False when it does not exist."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True
