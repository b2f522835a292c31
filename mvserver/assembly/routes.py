"""Assembly jobs: finished clips joined into one music video with the song, on the same job engine as videos.

``POST /api/mv/assemble`` takes an ordered list of clips (succeeded video or lip-sync jobs, with optional trims),
an optional song, the transition and what to do with the clips' audio; ``POST /api/mv/projects/{id}/assemble``
builds that list from the project's timeline. Everything is checked (clips probed; the caps of
``settings/media.yaml``) before the job is accepted, so a job fails only when its files changed meanwhile or ffmpeg
passed its limits. The job is *local*: its driver runs :func:`mvserver.media.ffmpeg.assemble` (ffmpeg in its own process
group, killed when the job is cancelled or its server dies) and is simply run again after a restart, but never
while an ffmpeg of an earlier run of the job is still alive (a lock each ffmpeg inherits), and only while one of the
node's few ffmpeg slots is free. The output is ``outputs/videos/<job_id>.mp4``, served by ``get_video``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web
from pydantic import BaseModel, ValidationError

from mvserver.assembly.schemas import AssemblyOptions
from mvserver.audio import songs
from mvserver.audio.routes import saved_audio
from mvserver.core.artefacts import ARTEFACTS, STORE, artefact_key
from mvserver.core.config import CONFIG, AssemblyLimits
from mvserver.core.errors import ApiError, validation_error
from mvserver.jobs import JOBS, Job
from mvserver.jobs.accepted import accepted_response
from mvserver.jobs.options import job_fields
from mvserver.jobs.runner import Progress
from mvserver.lipsync.routes import FFMPEG_SLOTS, HEAVY_FFMPEG_SLOTS, ffmpeg_limits
from mvserver.media import ffmpeg as media
from mvserver.openapi.schemas import REQUEST_MODELS
from mvserver.projects.routes import (
    BASE,
    _json_object,
    job_states,
    load_settled,
    owned_project,
    project_timeline,
    project_view,
    update,
)
from mvserver.web.access.auth import key_id, visible_to
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge

routes = web.RouteTableDef()

KIND = "assembly"
BACKEND = "ffmpeg"
LOCK_SUFFIX = ".ffmpeg.lock"  # outputs/jobs/<job_id>.ffmpeg.lock: held by every ffmpeg of a run of the job
CLIP_KINDS = frozenset({"video", "lipsync"})  # jobs whose output is a clip


class PlannedClip(NamedTuple):
    job_id: str
    trim_in: float
    trim_out: float


# -- checks before a job is accepted ------------------------------------------------------------------------------


async def _clip_file(app: web.Application, job_id: str, field: str, caller: str | None) -> str:
    """The MP4 (its key) of a succeeded clip job the caller may use (400 naming ``field`` otherwise; another key's job is
    as unknown as a missing one)."""
    job = await app[JOBS].get(job_id)
    if job is None or not visible_to(job.owner, caller):
        raise ApiError(400, "clip_not_found", f"{field}: no job with id {job_id}", field=field)
    if job.kind not in CLIP_KINDS:
        raise ApiError(400, "invalid_clip", f"{field}: job {job_id} is a {job.kind} job, not a clip", field=field)
    if job.status != "succeeded":
        raise ApiError(
            400, "clip_not_ready", f"{field}: job {job_id} is {job.status}; assembly needs finished clips", field=field
        )
    key = artefact_key("videos", job_id, ".mp4")
    if await app[ARTEFACTS].stat(key) is None:
        raise ApiError(400, "clip_not_found", f"{field}: the video of job {job_id} is gone", field=field)
    return key


async def _probe(app: web.Application, paths: list[Path], fields: list[str]) -> list[tuple[media.MediaInfo, int]]:
    """Every clip probed in one ffmpeg run (bounded like lip sync's probes); on failure, the culprit is named."""
    async with app[FFMPEG_SLOTS]:
        try:
            described = await media.probe_clips(paths)
        except media.MediaError:
            described = None
        if described is None or any(i.first_video is None or n < 1 for i, n in described):
            for path, field in zip(paths, fields, strict=False):
                try:
                    info = await media.probe(path)
                except media.MediaError as exc:
                    raise ApiError(
                        400, "invalid_clip", f"{field}: the clip cannot be read: {exc}", field=field
                    ) from None
                if info.first_video is None:
                    raise ApiError(400, "invalid_clip", f"{field}: the clip holds no video", field=field)
            raise ApiError(400, "invalid_clip", "clips: ffmpeg could not read the clips together", field="clips")
    return described


def _kept(
    index: int,
    trim_in: float | None,
    trim_out: float | None,
    frames: int,
    fps: float,
    out_fps: float,
    field: Callable[[int, str], str],
) -> tuple[float, float, float]:
    """The kept part of a clip of ``frames`` frames at ``fps``, snapped to whole frames as the run will snap it:
    ``(trim_in, trim_out, kept seconds)``; 400 naming the trim that does not fit or keeps under one output frame."""
    try:
        first, kept = media.kept_frames(trim_in, trim_out, frames, fps, out_fps)
    except media.AssemblyInputError as exc:
        name = field(index, exc.field)
        raise ApiError(400, "invalid_trim", f"{name}: {str(exc).partition(': ')[2]}", field=name) from None
    start = trim_in or 0.0
    return start, min(frames / fps, trim_out) if trim_out is not None else frames / fps, kept / fps


def _clip_field(index: int, name: str) -> str:
    return f"clips.{index}.{name}"


async def plan(
    app: web.Application,
    clips: list[tuple[str, float | None, float | None]],
    options: AssemblyOptions,
    audio_id: str | None,
    audio_offset: float,
    field: Callable[[int, str], str] = _clip_field,
    caller: str | None = None,
    clips_field: str = "clips",
) -> dict[str, Any]:
    """Check an assembly against the files (clips probed, the song's length) and the caps of one request (output
    seconds, clips per filter graph), and return the job's request."""
    keys = [await _clip_file(app, job_id, field(i, "job_id"), caller) for i, (job_id, _, _) in enumerate(clips)]
    async with contextlib.AsyncExitStack() as files:
        paths = [await files.enter_async_context(app[ARTEFACTS].local_file(key)) for key in keys]
        described = await _probe(app, paths, [field(i, "job_id") for i in range(len(clips))])
    planned: list[PlannedClip] = []
    seconds: list[float] = []
    first = described[0][0].first_video
    assert first is not None
    out_fps = media.output_fps(first)
    for index, ((job_id, trim_in, trim_out), (info, frames)) in enumerate(zip(clips, described, strict=False)):
        video = info.first_video
        assert video is not None
        start, end, kept = _kept(index, trim_in, trim_out, frames, video.fps or 24.0, out_fps, field)
        planned.append(PlannedClip(job_id, start, end))
        seconds.append(kept)
        if options.fit is None and abs(video.aspect - first.aspect) > media.ASPECT_TOLERANCE:
            name = field(index, "job_id")
            raise ApiError(
                400,
                "aspect_mismatch",
                f"{name}: the clip is {video.width}x{video.height}, another aspect "
                f"ratio than the first ({first.width}x{first.height}); pass fit "
                "letterbox or crop",
                field=name,
            )
    expected = sum(seconds)
    if options.transition == "crossfade":
        expected = _crossfaded_seconds(seconds, options.crossfade_seconds, out_fps, app[CONFIG].media.assembly)
    cap = app[CONFIG].media.assembly.output_seconds_max
    if expected > cap:
        raise ApiError(
            400,
            "assembly_too_long",
            f"{clips_field}: the video would last {expected:.3f} s; one assembly may make at most {cap:g} s",
            field=clips_field,
        )
    if audio_id is not None:
        await _check_song(app, audio_id, audio_offset, caller)
    return {
        "clips": [c._asdict() for c in planned],
        "audio_id": audio_id,
        "audio_offset": audio_offset,
        **options.model_dump(include=set(AssemblyOptions.model_fields)),
        "expected_seconds": round(expected, 6),
        **job_fields(options),
    }


def _crossfaded_seconds(seconds: list[float], crossfade: float, out_fps: float, limits: AssemblyLimits) -> float:
    """The length of a crossfaded video, in whole output frames as the run makes it; 400 naming
    ``crossfade_seconds`` for a crossfade under one frame, not shorter than every clip, or whose pieces would make
    one ffmpeg decode more than ``graph_clips_max`` clips at once."""
    frames = [media.output_frames(s, out_fps) for s in seconds]
    try:
        fade = media.crossfade_frames(crossfade, out_fps)
    except media.AssemblyInputError as exc:
        raise ApiError(400, "invalid_field", str(exc), field="crossfade_seconds") from None
    if len(frames) < 2:
        return sum(seconds)
    if fade >= min(frames):
        raise ApiError(
            400,
            "invalid_field",
            f"crossfade_seconds: must be shorter than the shortest clip ({min(frames) / out_fps:.3f} s)",
            field="crossfade_seconds",
        )
    try:
        media.check_graph_clips(frames, fade, limits.graph_clips_max)
    except media.AssemblyInputError as exc:
        raise ApiError(400, "graph_too_large", str(exc), field="crossfade_seconds") from None
    return (sum(frames) - (len(frames) - 1) * fade) / out_fps


async def _check_song(app: web.Application, audio_id: str, offset: float, caller: str | None) -> None:
    try:
        _, sidecar = await saved_audio(app, audio_id, caller=caller)
    except ApiError as exc:
        raise ApiError(400, "audio_not_found", exc.info.message, field="audio_id") from None
    duration = sidecar.get("duration")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and offset >= duration:
        raise ApiError(
            400,
            "invalid_field",
            f"audio_offset: {offset:g} s is not before the song's end ({duration:g} s)",
            field="audio_offset",
        )


async def submit(app: web.Application, request: dict[str, Any], owner: str | None, job_id: str) -> Job:
    """Queue the assembly job (``job_id``: the id the quota charge answered)."""
    job = Job(
        id=job_id,
        backend=BACKEND,
        model="concat" if request["transition"] == "cut" else "xfade",
        sandbox=False,
        request=request,
        kind=KIND,
        owner=owner,
        **job_fields(request),
    )
    return await app[JOBS].submit(job)


# -- the job driver -------------------------------------------------------------------------------------------------


_MEDIA_FIELD = re.compile(r"^clips\[(\d+)\]")


def _field(name: str) -> str:
    """media names fields ``clips[2].trim_in`` and ``song_offset``; the API says ``clips.2.trim_in``, ``audio_offset``."""
    name = _MEDIA_FIELD.sub(lambda m: f"clips.{m[1]}", name)
    return {"song": "audio_id", "song_offset": "audio_offset"}.get(name, name)


class AssemblyDriver:
    """Runs ffmpeg on this machine (a local driver: after a restart it simply runs again)."""

    def __init__(self, app: web.Application):
        self.app = app

    async def run(self, job: Job, dest: str, progress: Progress) -> int:
        request = job.request
        store = self.app[ARTEFACTS]
        async with contextlib.AsyncExitStack() as files:
            clips = []
            for clip in request["clips"]:
                try:
                    path = await files.enter_async_context(
                        store.local_file(artefact_key("videos", clip["job_id"], ".mp4"))
                    )
                except FileNotFoundError:
                    raise ApiError(500, "assembly_failed", f"the clip {clip['job_id']} is gone") from None
                clips.append(media.Clip(path, clip["trim_in"], clip["trim_out"]))
            song: Path | None = None
            song_copy: media.SongCopy | None = None
            if request.get("audio_id"):
                song_key, sidecar = await saved_audio(self.app, request["audio_id"])
                song = await files.enter_async_context(store.local_file(song_key))
                song_copy = await _song_copy(self.app, request["audio_id"], song_key, sidecar, files)
            async with self._turn(job, progress) as held, store.writing(dest, tag="out") as out:
                result = await self._assemble(request, clips, song, song_copy, out, progress, held)
                size = (await asyncio.to_thread(out.stat)).st_size
        request["result"] = {
            "seconds": round(result.duration, 6),
            "copied": result.copied,
            "reencoded": result.reencoded,
            "audio": result.audio,
            "elapsed_seconds": result.elapsed_seconds,
        }
        return size

    @contextlib.asynccontextmanager
    async def _turn(self, job: Job, progress: Progress) -> AsyncIterator[int]:
        """Wait (stage ``waiting``) until no ffmpeg of an earlier run of this job is alive (the job's run lock,
        also held by an ffmpeg that outlived its server) and one of the node's ffmpeg slots is free; yield the lock
        for the run's ffmpegs to inherit."""

        async def waiting() -> None:
            await progress(None, "waiting")

        slots = self.app[HEAVY_FFMPEG_SLOTS]
        async with media.run_lock(self.app[STORE].path("jobs", job.id, LOCK_SUFFIX), on_wait=waiting) as held:
            if slots.locked():
                await waiting()
            async with slots:
                yield held

    async def _assemble(
        self,
        request: dict[str, Any],
        clips: list[media.Clip],
        song: Path | None,
        song_copy: media.SongCopy | None,
        dest: Path,
        progress: Progress,
        held: int,
    ) -> media.AssemblyResult:
        """``media.assemble`` within the limits of media.yaml, its progress pumped to the job, its failures as job
        errors (``invalid_assembly``, ``assembly_timeout``, ``assembly_too_large``, ``assembly_failed``)."""
        settings = self.app[CONFIG].media
        latest = [0.0]
        moved = asyncio.Event()

        def on_progress(fraction: float) -> None:
            latest[0] = fraction
            moved.set()

        async def pump() -> None:
            while True:
                await moved.wait()
                moved.clear()
                await progress(latest[0], "assembling")

        await progress(0.0, "assembling")
        pumping = asyncio.get_running_loop().create_task(pump(), name="assembly-progress")
        try:
            return await media.assemble(
                clips,
                dest,
                song=song,
                song_offset=request["audio_offset"],
                transition=request["transition"],
                crossfade_seconds=request["crossfade_seconds"],
                clip_audio=request["clip_audio"],
                fit=request["fit"],
                progress=on_progress,
                limits=ffmpeg_limits(self.app),
                hold=(held,),
                graph_clips_max=settings.assembly.graph_clips_max,
                song_copy=song_copy,
            )
        except media.AssemblyInputError as exc:
            raise ApiError(400, "invalid_assembly", str(exc), field=_field(exc.field)) from None
        except media.MediaTimeout as exc:
            limits = settings.ffmpeg
            raise ApiError(
                500,
                "assembly_timeout",
                f"{exc} (each run may last {limits.timeout_base_seconds:g} s + "
                f"{limits.timeout_seconds_per_output_second:g} s per second it "
                "writes: media.yaml ffmpeg.timeout_*)",
            ) from None
        except media.MediaMemoryError as exc:
            raise ApiError(500, "assembly_too_large", f"{exc} (media.yaml ffmpeg.memory_mb)") from None
        except media.MediaError as exc:
            raise ApiError(500, "assembly_failed", f"ffmpeg failed: {exc}") from None
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)


async def _song_copy(
    app: web.Application, audio_id: str, song: str, sidecar: dict[str, Any], files: contextlib.AsyncExitStack
) -> media.SongCopy | None:
    """The song's AAC copy made at upload, whose packets a cut-only assembly copies, held open in ``files``; None
    (the song is encoded instead) if it is not there yet, in which case it is made now for the next assembly."""
    duration = sidecar.get("duration")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool):
        return None
    try:
        path = await files.enter_async_context(app[ARTEFACTS].local_file(songs.aac_copy(audio_id)))
    except FileNotFoundError:
        app[songs.SONGS].copies(audio_id, song, float(duration))
        return None
    return media.SongCopy(path, float(duration))


def assembly_kind(app: web.Application):  # type: ignore[no-untyped-def]
    """The driver factory for ``assembly`` jobs."""
    return lambda job: AssemblyDriver(app)


# -- handlers -------------------------------------------------------------------------------------------------------


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


@routes.post("/api/mv/assemble")
@idempotent
async def assemble(request: web.Request) -> web.Response:
    app = request.app
    body = _parse(app[REQUEST_MODELS].assemble, await _json_object(request))
    await reserve(request, body)
    clips = [(c.job_id, c.trim_in, c.trim_out) for c in body.clips]
    planned = await plan(app, clips, body, body.audio_id, body.audio_offset, caller=key_id(request))
    [job_id] = await charge(request, "jobs")  # only a request that got this far costs a token
    job = await submit(app, planned, key_id(request), job_id)
    return accepted_response(request, [job])


@routes.post(BASE + "/{project_id}/assemble")
@idempotent
async def assemble_project(request: web.Request) -> web.Response:
    """The project's chosen clips in display order with their trims, and its song from its offset."""
    app = request.app
    project_id = (await owned_project(request)).id  # 404 for an unknown id or another key's project
    options = _parse(app[REQUEST_MODELS].assembly_options, await _json_object(request, optional=True))
    await reserve(request, options)
    project, jobs = await load_settled(app, project_id)
    entries = project_timeline(project)
    if not entries:
        raise ApiError(400, "no_scenes", "scenes: the project has no scenes to assemble", field="scenes")
    limit = app[CONFIG].projects.limits.assembly_clips_max
    if len(entries) > limit:
        raise ApiError(
            400,
            "too_many_clips",
            f"scenes: {len(entries)} scenes, more than the {limit} clips one assembly may join",
            field="scenes",
        )
    for index, entry in enumerate(entries):
        job = jobs.get(entry.job_id) if entry.job_id else None
        if job is None or job.status != "succeeded":
            raise ApiError(
                400,
                "clip_not_ready",
                f"scenes.{index}: scene {entry.scene.id} has no finished chosen clip",
                field=f"scenes.{index}",
            )

    def field(index: int, name: str) -> str:
        return f"scenes.{index}" if name == "job_id" else f"scenes.{index}.{name}"

    clips = [(e.job_id or "", e.trim_in, e.trim_out) for e in entries]
    song = project.song
    planned = await plan(
        app,
        clips,
        options,
        song.audio_id if song else None,
        song.offset if song else 0.0,
        field,
        caller=key_id(request),
        clips_field="scenes",
    )
    planned["project_id"] = project.id
    [job_id] = await charge(request, "jobs")
    job = await submit(app, planned, key_id(request), job_id)

    def link(current: Any, _jobs: Any) -> None:
        current.assembly_job_id = job.id

    project = await update(app, project_id, link)
    return accepted_response(request, [job], project=project_view(project, await job_states(app, project)))


def setup(app: web.Application) -> None:
    app.add_routes(routes)
