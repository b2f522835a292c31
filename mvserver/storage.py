"""The ``outputs/`` directory: ids, paths and atomic writes (temporary file, fsync, rename)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, AsyncIterable

import aiofiles
import aiofiles.os
from aiohttp import web

from .errors import ApiError

_UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TEMP_SUFFIX = ".part"
FILE_MODE = 0o644  # every file written under outputs/: owner read-write, everyone else read

KINDS = ("scenes", "images", "videos", "jobs", "sandbox", "audio", "projects")


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


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def write_bytes_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputStore:
    """Paths under the output directory, one sub-directory per kind of artefact."""

    def __init__(self, root: Path):
        self.root = root.resolve()
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

    async def write_stream(self, path: Path, chunks: AsyncIterable[bytes]) -> int:
        """Stream chunks to a temporary file and rename it into place; returns the byte count.

        The temporary file is removed when the stream fails or the task is cancelled.
        """
        tmp = _temp_path(path)
        size = 0
        try:
            async with aiofiles.open(tmp, "wb") as handle:
                async for chunk in chunks:
                    await handle.write(chunk)
                    size += len(chunk)
                await handle.flush()
                await asyncio.to_thread(os.fchmod, handle.fileno(), FILE_MODE)  # whatever the umask
                await asyncio.to_thread(os.fsync, handle.fileno())
            await aiofiles.os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a crash; run once at start-up."""
        count = 0
        for stale in self.root.glob(f"*/.*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
            count += 1
        return count


STORE = web.AppKey("store", OutputStore)
