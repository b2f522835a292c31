"""Project records and where they live: files under ``outputs/projects`` (one process) or Redis (several).

A store only keeps whole records and swaps them with a compare-and-set on ``version`` (the number behind the
HTTP ``ETag``): a write that expected version *n* succeeds only if the stored record is still at *n*, and stores
*n + 1*. That is all optimistic concurrency needs; the editing rules live in :mod:`mvserver.projects.service`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Literal, Protocol

import redis.asyncio
import redis.exceptions
from pydantic import BaseModel, Field

from mvserver.core.artefacts import OutputStore
from mvserver.core.errors import ApiError, store_unavailable

log = logging.getLogger("mvserver.projects")


class ClipVersion(BaseModel):
    """One generated clip of a scene: a video job (its state and prompt are read from the job engine, never copied
    here, which keeps a record small)."""

    job_id: str
    created_at: float = Field(default_factory=time.time)
    duration: int  # seconds of the clip (the scene's duration when it was generated)


class SongWindow(BaseModel):
    """Where a scene's kept part plays in the project's song (seconds), its bars (``first_bar``, ``end_bar``
    exclusive; 0 is the first downbeat's bar, -1 before it) and section, and what its end (the cut) lands on within
    one frame: a downbeat, a beat, the song's end, or a plain time. Bars and section are None without an analysis
    (bars also without a beat grid). Updated whenever the scenes change through the project's API."""

    start: float
    end: float
    first_bar: int | None = None
    end_bar: int | None = None
    section: int | None = None
    section_label: str | None = None
    cut: Literal["downbeat", "beat", "time", "end"] = "time"


class Claim(BaseModel):
    """A request starting the scene's clip (``POST …/clips``): set before any job exists, so a concurrent request
    (a double click) leaves the scene alone; dropped when the clip is linked, or ignored once ``until`` passes."""

    token: str
    until: float


class Scene(BaseModel):
    id: str
    prompt: str = ""
    negative_prompt: str = ""
    duration: int
    trim_in: float = 0.0
    trim_out: float
    versions: list[ClipVersion] = []
    # The clip the user chose (or the newest one that succeeded while ``awaited`` pointed at it).
    chosen_job_id: str | None = None
    # The newest generation, chosen automatically once it succeeds unless the user chooses another meanwhile.
    awaited_job_id: str | None = None
    # Where it plays in the song (None without a song).
    window: SongWindow | None = None
    claim: Claim | None = None


class CharacterCandidate(BaseModel):
    """One image of the project's last character render (``POST .../character`` with ``number_of_images``): kept
    so a page can show the candidates again after a reload and the user can pick another one."""

    image_id: str
    mime_type: str
    seed: int | None = None
    created_at: float = Field(default_factory=time.time)


class Song(BaseModel):
    audio_id: str
    offset: float = 0.0
    duration: float
    # How the scenes were sized to the song when the project was made: on its bars, or by length (None: not sized
    # to it); and why not on bars (no analysis, no beat grid...).
    sized_by: Literal["bars", "length"] | None = None
    sizing_note: str | None = None


class Project(BaseModel):
    """The storyboard. ``version`` counts writes: 1 after create, +1 per successful compare-and-set."""

    id: str
    version: int = 0
    owner: str | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    idea: str
    character_description: str
    style: str | None = None
    aspect_ratio: str
    character_image_id: str | None = None
    # The images of the last character render, first one first (it became character_image_id).
    character_candidates: list[CharacterCandidate] = []
    song: Song | None = None
    scenes: list[Scene] = []
    # The newest assembly job started from this project (``POST .../assemble``).
    assembly_job_id: str | None = None

    def scene(self, scene_id: str) -> Scene | None:
        return next((s for s in self.scenes if s.id == scene_id), None)


class ProjectStore(Protocol):
    """Whole project records with an atomic compare-and-set on ``version``."""

    async def get(self, project_id: str) -> Project | None:
        """The record as last written, or None."""

    async def put(self, project: Project, expected_version: int) -> bool:
        """Store ``project`` with ``version = expected_version + 1`` if the stored version is still
        ``expected_version`` (0: the record must not exist yet); False, and nothing written, otherwise."""

    async def ping(self) -> None:
        """Raise unless the store answers now (readiness)."""

    def changed(self, project_id: str) -> asyncio.Future[None]:
        """A future done once the record may have been written since this call (or the store is closing): a
        follower takes it *before* it reads the record, then waits on it. Every follower of a project on this
        node shares one, and a node learns of writes made anywhere (files: this process is the only writer)."""

    async def close(self) -> None: ...


class _ChangeWaiters:
    """The shared "changed" futures of one node, by project id."""

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[None]] = {}
        self.closing = False

    def get(self, project_id: str) -> asyncio.Future[None]:
        future = self._futures.get(project_id)
        if future is None or future.done():
            future = self._futures[project_id] = asyncio.get_running_loop().create_future()
            if self.closing:
                future.set_result(None)
        return future

    def wake(self, project_id: str) -> None:
        future = self._futures.pop(project_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    def wake_all(self) -> None:
        for project_id in list(self._futures):
            self.wake(project_id)


class FileProjectStore:
    """``outputs/projects/<id>.json``, written atomically; a per-project lock makes the compare-and-set atomic
    within one process (the only writer of this directory)."""

    def __init__(self, outputs: OutputStore):
        self.outputs = outputs
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._changes = _ChangeWaiters()

    def _read(self, project_id: str) -> Project | None:
        path = self.outputs.path("projects", project_id, ".json")
        try:
            return Project.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.error("unreadable project record %s: %s", path.name, exc)
            return None

    async def get(self, project_id: str) -> Project | None:
        return await asyncio.to_thread(self._read, project_id)

    async def put(self, project: Project, expected_version: int) -> bool:
        lock = self._locks.get(project.id)
        if lock is None:
            lock = self._locks[project.id] = asyncio.Lock()
        async with lock:
            current = await self.get(project.id)
            if (current.version if current else 0) != expected_version:
                return False
            record = project.model_copy(update={"version": expected_version + 1})
            data = record.model_dump_json(indent=1).encode()
            await self.outputs.write_bytes(self.outputs.path("projects", project.id, ".json"), data)
            project.version = record.version
            self._changes.wake(project.id)
            return True

    async def ping(self) -> None:
        pass  # the output directory the job store checks

    def changed(self, project_id: str) -> asyncio.Future[None]:
        return self._changes.get(project_id)

    async def close(self) -> None:
        self._changes.closing = True
        self._changes.wake_all()


# KEYS[1] = the record, KEYS[2] = the change channel; ARGV[1] = expected version, ARGV[2] = the new record (JSON,
# version already set), ARGV[3] = the project id (published, so every node's followers of the project wake up).
_CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
local version = 0
if current then version = cjson.decode(current)['version'] end
if version ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""
LISTEN_RETRY_SECONDS = 0.5


class RedisProjectStore:
    """One Redis string per project (``<prefix><id>``, the JSON record), swapped by a Lua compare-and-set that also
    publishes the project's id on ``<prefix>changed``. A node subscribes to that channel once something follows a
    project (:meth:`changed`); after every (re)subscription it wakes all its followers, since a write may have
    happened while it was not listening."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str = "mv:project:"):
        self.client = client
        self.prefix = prefix
        self.channel = f"{prefix}changed"
        self._cas = client.register_script(_CAS_SCRIPT)
        self._changes = _ChangeWaiters()
        self._listener: asyncio.Task[None] | None = None

    async def get(self, project_id: str) -> Project | None:
        try:
            raw = await self.client.get(self.prefix + project_id)
        except redis.exceptions.RedisError as exc:
            raise _unavailable(exc) from None
        if raw is None:
            return None
        try:
            return Project.model_validate_json(raw)
        except ValueError as exc:
            log.error("unreadable project record %s in Redis: %s", project_id, exc)
            return None

    async def put(self, project: Project, expected_version: int) -> bool:
        record = project.model_copy(update={"version": expected_version + 1})
        try:
            swapped = await self._cas(
                keys=[self.prefix + project.id, self.channel],
                args=[expected_version, record.model_dump_json(), project.id],
            )
        except redis.exceptions.RedisError as exc:
            raise _unavailable(exc) from None
        if swapped:
            project.version = record.version
        return bool(swapped)

    async def ping(self) -> None:
        await self.client.ping()

    def changed(self, project_id: str) -> asyncio.Future[None]:
        if self._listener is None and not self._changes.closing:
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="redis-project-changes")
        return self._changes.get(project_id)

    async def _listen(self) -> None:
        while True:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    async for message in pubsub.listen():
                        if message.get("type") == "subscribe":
                            self._changes.wake_all()  # writes made before we listened are read again
                        elif message.get("type") == "message":
                            data = message["data"]
                            self._changes.wake(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("project store: change notifications lost (%s); resubscribing", exc)
                self._changes.wake_all()
                await asyncio.sleep(LISTEN_RETRY_SECONDS)

    async def close(self) -> None:
        self._changes.closing = True
        self._changes.wake_all()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self.client.aclose()


def _unavailable(exc: Exception) -> ApiError:
    return store_unavailable(exc)


def open_project_store(outputs: OutputStore, redis_url: str | None, prefix: str = "mv:") -> ProjectStore:
    """Redis when ``MV_REDIS_URL`` is set (records shared by every node, under ``MV_REDIS_PREFIX`` like the jobs),
    else files under ``outputs/projects``."""
    if not redis_url:
        return FileProjectStore(outputs)
    return RedisProjectStore(redis.asyncio.from_url(redis_url), prefix=f"{prefix}project:")
