"""A saved song's background work and ``GET /api/mv/songs/{audio_id}``: its analysis and its two copies.

Once an upload is saved (its sidecar written), the app starts two things for the song, each at most once at a
time per song:

- its **copies**, in one ffmpeg run: the AAC copy a cut-only assembly copies packets from (``<id>.aac.m4a``) and the
  small MP3 Gemini hears with the scene request (``<id>.preview.mp3``), next to the song in ``outputs/audio``;
- its **analysis** (tempo, beats, bars, sections, energy, peaks) in the app's :class:`AnalysisPool`, stored in the
  song's sidecar under ``analysis`` (or ``analysis_error``: a song that cannot be decoded, took longer than the
  limit or ran out of memory is not analysed again until the analysis version changes).

The upload answer waits ``MV_ANALYSIS_WAIT_SECONDS`` for the analysis and otherwise says ``pending``; a GET shows
it once it is there. A song saved before analysis existed (or with an analysis of an older version) is analysed on
first use: its GET, or a project sized to it. With ``MV_ANALYSIS_WORKERS=0`` nothing is analysed (``off``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any, Literal

from aiohttp import web

from mvserver.analysis import ANALYSIS_VERSION, AnalysisError, AnalysisPool, AnalysisTimeout, SongAnalysis, load
from mvserver.appkeys import ARTEFACTS, CONFIG, SONGS
from mvserver.audio.service import FORMATS, saved_audio
from mvserver.core.artefacts import Artefacts, artefact_key, check_id, temp_path
from mvserver.core.config import EnvSettings
from mvserver.media.errors import MediaError
from mvserver.media.limits import DEFAULT_LIMITS, FfmpegLimits
from mvserver.media.song import encode_song_copies
from mvserver.web.access.auth import key_id

log = logging.getLogger("mvserver.songs")
AAC_SUFFIX = ".aac.m4a"
PREVIEW_SUFFIX = ".preview.mp3"
COPY_SLOTS = 2  # song copies encoded at once per process (each is one ffmpeg)
STORED_FAILURES = {"decode", "timeout", "memory"}  # failures that would happen again: not retried
Status = Literal["ready", "pending", "failed", "off"]
PUBLIC_FIELDS = (
    "audio_id",
    "format",
    "mime_type",
    "codec",
    "duration",
    "sample_rate",
    "channels",
    "size_bytes",
    "audio_url",
)


def aac_copy(audio_id: str) -> str:
    """The key of the song's AAC copy."""
    return artefact_key("audio", audio_id, AAC_SUFFIX)


def preview(audio_id: str) -> str:
    """The key of the song's small MP3 preview (what Gemini hears)."""
    return artefact_key("audio", audio_id, PREVIEW_SUFFIX)


class AnalysisOutcome:
    """What one analysis run ended with: the analysis, or an error (``code``, ``message``)."""

    def __init__(self, analysis: SongAnalysis | None = None, error: dict[str, str] | None = None):
        self.analysis, self.error = analysis, error


class SongWork:
    """The background work on saved songs of one app (see the module's docstring). Close it with :meth:`close`."""

    def __init__(
        self,
        store: Artefacts,
        env: EnvSettings,
        pool: AnalysisPool | None,
        limits: FfmpegLimits = DEFAULT_LIMITS,
    ):
        self.store, self.env, self.pool, self.limits = store, env, pool, limits
        self._copies: dict[str, asyncio.Task[bool]] = {}
        self._analyses: dict[str, asyncio.Task[AnalysisOutcome]] = {}
        self._copy_slots = asyncio.Semaphore(COPY_SLOTS)
        self._sidecar_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._closed = False

    # -- starting work ------------------------------------------------------------------------------------------

    def start(self, audio_id: str, song: str, duration: float) -> None:
        """Everything a new song needs: its copies and its analysis."""
        self.copies(audio_id, song, duration)
        self.analysis(audio_id, song)

    def copies(self, audio_id: str, song: str, duration: float) -> asyncio.Task[bool]:
        """The task making the copies of the song (its key) in AAC and preview (the running one, if any); it answers
        whether they exist."""
        return self._task(self._copies, audio_id, lambda: self._make_copies(audio_id, song, duration))

    def analysis(self, audio_id: str, song: str) -> asyncio.Task[AnalysisOutcome] | None:
        """The task analysing the song (the running one, if any); None when analysis is off."""
        if self.pool is None:
            return None
        return self._task(self._analyses, audio_id, lambda: self._analyse(audio_id, song))

    def _task(self, tasks: dict[str, asyncio.Task[Any]], audio_id: str, make: Any) -> asyncio.Task[Any]:
        if self._closed:
            raise RuntimeError("the song work is closed")
        task = tasks.get(audio_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(make(), name=f"song-{audio_id}")
            tasks[audio_id] = task
            task.add_done_callback(lambda done: tasks.pop(audio_id, None) if tasks.get(audio_id) is done else None)
        return task

    async def settled(self, audio_id: str) -> None:
        """Wait until no work on the song is running (tests, and a clean shutdown of one song)."""
        running = [t for t in (self._copies.get(audio_id), self._analyses.get(audio_id)) if t is not None]
        await asyncio.gather(*running, return_exceptions=True)

    async def close(self) -> None:
        """Cancel the running work (a song's copies are made again on its next use, its analysis too)."""
        self._closed = True
        running = [*self._copies.values(), *self._analyses.values()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()

    # -- the work -----------------------------------------------------------------------------------------------

    async def _make_copies(self, audio_id: str, song: str, duration: float) -> bool:
        store = self.store
        async with self._copy_slots:
            try:
                async with (
                    store.local_file(song) as source,
                    store.writing(aac_copy(audio_id), tag="enc") as aac,
                    store.writing(preview(audio_id), tag="enc") as small,
                ):
                    await encode_song_copies(
                        source,
                        aac,
                        small,
                        temp_name=temp_path,
                        duration=duration,
                        timeout=120.0 + duration,
                        limits=self.limits,
                    )
            except (MediaError, OSError) as exc:
                log.warning(
                    "song %s: its copies could not be made (assembly encodes it; Gemini does not hear it): %s",
                    audio_id,
                    exc,
                )
                return False
        return True

    async def _analyse(self, audio_id: str, song: str) -> AnalysisOutcome:
        assert self.pool is not None
        try:
            async with self.store.local_file(song) as path:
                analysis = await self.pool.analyse(path, timeout=self.env.analysis_timeout_seconds)
        except AnalysisError as exc:
            code = "analysis_timeout" if isinstance(exc, AnalysisTimeout) else "analysis_failed"
            error = {"code": code, "message": str(exc), "kind": exc.kind}
            if exc.kind in STORED_FAILURES:
                await self._update_sidecar(audio_id, {"analysis_error": {**error, "version": ANALYSIS_VERSION}})
            log.warning("song %s: the analysis failed (%s): %s", audio_id, exc.kind, exc)
            return AnalysisOutcome(error=error)
        await self._update_sidecar(
            audio_id, {"analysis": json.loads(analysis.model_dump_json()), "analysis_error": None}
        )
        return AnalysisOutcome(analysis=analysis)

    async def _update_sidecar(self, audio_id: str, fields: dict[str, Any]) -> None:
        """Merge ``fields`` into the song's sidecar (None removes a field), atomically; one writer per song here."""
        lock = self._sidecar_locks.get(audio_id)
        if lock is None:
            lock = self._sidecar_locks[audio_id] = asyncio.Lock()
        key = artefact_key("audio", audio_id, ".json")
        async with lock:
            sidecar = await self.store.get_json(key)
            if not isinstance(sidecar, dict):
                return  # the song is gone
            for name, value in fields.items():
                if value is None:
                    sidecar.pop(name, None)
                else:
                    sidecar[name] = value
            try:
                await self.store.put_json(key, sidecar)
            except OSError as exc:  # the answer still carries it; the next use analyses the song again
                log.warning("song %s: its analysis could not be stored: %s", audio_id, exc)


def analysis_state(
    sidecar: dict[str, Any], work: SongWork
) -> tuple[Status, SongAnalysis | None, dict[str, Any] | None]:
    """What the sidecar says about the song's analysis: ready (with it), failed (with the error), off or pending."""
    analysis = load(sidecar.get("analysis"))
    if analysis is not None:
        return "ready", analysis, None
    error = sidecar.get("analysis_error")
    if isinstance(error, dict) and error.get("version") == ANALYSIS_VERSION:
        return "failed", None, {"code": error.get("code"), "message": error.get("message")}
    if work.pool is None:
        return "off", None, None
    return "pending", None, None


async def read_sidecar(store: Artefacts, audio_id: str) -> dict[str, Any] | None:
    """The song's sidecar (None if there is none or it is unreadable)."""
    sidecar = await store.get_json(artefact_key("audio", audio_id, ".json"))
    return sidecar if isinstance(sidecar, dict) else None


async def song_analysis(
    app: web.Application, audio_id: str, sidecar: dict[str, Any], *, wait: float
) -> tuple[Status, SongAnalysis | None, dict[str, Any] | None]:
    """The song's analysis state, starting the analysis if it is due and waiting up to ``wait`` seconds for it."""
    work = app[SONGS]
    status, analysis, error = analysis_state(sidecar, work)
    if status != "pending":
        return status, analysis, error
    fmt = FORMATS.get(sidecar.get("format", ""))
    if fmt is None:
        return "failed", None, {"code": "analysis_failed", "message": "the song's format is unknown"}
    task = work.analysis(audio_id, artefact_key("audio", audio_id, fmt.suffix))
    assert task is not None
    if wait > 0:
        try:
            outcome = await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return "pending", None, None
        if outcome.analysis is not None:
            return "ready", outcome.analysis, None
        return "failed", None, {k: outcome.error[k] for k in ("code", "message")} if outcome.error else None
    return "pending", None, None


def song_body(
    sidecar: dict[str, Any], status: Status, analysis: SongAnalysis | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    """The upload's answer and the GET's: the song's description and its analysis."""
    body = {name: sidecar[name] for name in PUBLIC_FIELDS if name in sidecar}
    body.update(
        song_url=f"/api/mv/songs/{sidecar['audio_id']}",
        analysis_status=status,
        analysis=json.loads(analysis.model_dump_json()) if analysis is not None else None,
        analysis_error=error,
    )
    return body


async def on_song_saved(app: web.Application, audio_id: str, song: str, sidecar: dict[str, Any]) -> dict[str, Any]:
    """The upload's hook: start the song's copies and analysis; the answer's extra fields (the analysis, if it is
    ready within ``MV_ANALYSIS_WAIT_SECONDS``)."""
    work = app[SONGS]
    work.start(audio_id, song, float(sidecar["duration"]))
    state = await song_analysis(app, audio_id, sidecar, wait=app[SONGS].env.analysis_wait_seconds)
    body = song_body(sidecar, *state)
    return {name: body[name] for name in ("song_url", "analysis_status", "analysis", "analysis_error")}


async def get_song(request: web.Request) -> web.Response:
    """The song's description and analysis (``analysis_status`` pending: ask again shortly)."""
    app = request.app
    audio_id = check_id(request.match_info["audio_id"], "audio_id")
    key, sidecar = await saved_audio(app, audio_id, caller=key_id(request))
    if await app[ARTEFACTS].stat(aac_copy(audio_id)) is None:  # saved before copies existed
        app[SONGS].copies(audio_id, key, float(sidecar["duration"]))
    state = await song_analysis(app, audio_id, sidecar, wait=app[SONGS].env.analysis_wait_seconds)
    return web.json_response(song_body(sidecar, *state), headers={"Cache-Control": "no-store"})


async def songs_context(app: web.Application) -> AsyncIterator[None]:
    """The app's analysis pool (none with ``MV_ANALYSIS_WORKERS=0``) and its song work; both stop at exit. The
    copies' ffmpeg runs within the memory and thread limits of media.yaml ``ffmpeg`` (their time limit is their own)."""
    env = app[CONFIG].env
    limits = FfmpegLimits(**app[CONFIG].media.ffmpeg.model_dump(exclude={"concurrency"}))
    pool = None
    if env.analysis_workers > 0:
        pool = AnalysisPool(
            env.analysis_workers, max_seconds=env.analysis_max_seconds, memory_mb=env.analysis_memory_mb
        )
    app[SONGS] = SongWork(app[ARTEFACTS], env, pool, limits)
    try:
        yield
    finally:
        await app[SONGS].close()
