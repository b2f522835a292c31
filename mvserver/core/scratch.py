"""This node's scratch directory: local copies of stored objects for ffmpeg, bounded in size.

With artefacts in object storage, ffmpeg still reads local files (clips for an assembly, a song for a lip-sync
cut) and writes one. :meth:`Scratch.local` fetches an object into ``MV_SCRATCH_DIR`` once and hands out its path
while a caller uses it; :meth:`Scratch.output` gives a path for a file to be written and then stored. The directory
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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

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

    # -- size ----------------------------------------------------------------------------------------------------

    def usage(self) -> int:
        """Bytes of the files in the directory (unfinished downloads included)."""
        return sum(size for _, _, size in self._files(include_temporaries=True))

    def evict(self) -> int:
        """Remove least recently used files not in use until the directory fits the cap; returns how many."""
        files = self._files(include_temporaries=True)
        total = sum(size for _, _, size in files)
        removed = 0
        for mtime, name, size in sorted(files):
            if total <= self.max_bytes:
                break
            if name in self._pins or name.endswith(TEMP_SUFFIX) or name.startswith(OUTPUT_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
                total -= size
                removed += 1
                log.debug("scratch: evicted %s (%d bytes, last used %.0f)", name, size, mtime)
        return removed

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


def _touch(path: Path) -> bool:
    """Mark ``path`` used now (its mtime orders eviction); False when it does not exist."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True
