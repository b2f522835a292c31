"""Assembly jobs: finished clips joined into one music video with the song, on the same job engine as videos.

``POST /api/mv/assemble`` takes an ordered list of clips (succeeded video or lip-sync jobs, with optional trims),
an optional song, the transition and what to do with the clips' audio; ``POST /api/mv/projects/{id}/assemble``
builds that list from the project's timeline. Everything is checked (clips probed; the caps of
``settings/media.yaml``) before the job is accepted, so a job fails only when its files changed meanwhile or ffmpeg
passed its limits. The job is *local*: its driver runs :func:`mvserver.media.assemble.assemble` (ffmpeg in its own process
group, killed when the job is cancelled or its server dies) and is simply run again after a restart, but never
while an ffmpeg of an earlier run of the job is still alive (a lock each ffmpeg inherits), and only while one of the
node's few ffmpeg slots is free. The output is ``outputs/videos/<job_id>.mp4``, served by ``get_video``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mvserver.assembly.schemas import AssemblyOptions
from mvserver.audio import songs
from mvserver.core.artefacts import Artefacts, OutputStore, artefact_key, temp_path
from mvserver.core.config import AssemblyLimits, Config
from mvserver.core.errors import ApiError
from mvserver.jobs import Job, JobEngine
from mvserver.jobs.clips import CLIP_KINDS, finished_clip
from mvserver.jobs.options import job_fields
from mvserver.jobs.runner import Progress
from mvserver.lipsync.service import ffmpeg_limits
from mvserver.media.assemble import AssemblyResult, Clip
from mvserver.media.assemble import assemble as assemble_clips
from mvserver.media.errors import AssemblyInputError, MediaError, MediaMemoryError, MediaTimeout
from mvserver.media.probe import MediaInfo, probe, probe_clips
from mvserver.media.run import run_lock
from mvserver.media.song import SongCopy
from mvserver.media.timeline import (
    ASPECT_TOLERANCE,
    check_graph_clips,
    crossfade_frames,
    kept_frames,
    output_fps,
    output_frames,
)
from mvserver.projects.service import JobStates, ProjectDeps, chosen_clip, project_timeline, settled, update_loaded
from mvserver.projects.store import Project

KIND = "assembly"
BACKEND = "ffmpeg"
LOCK_SUFFIX = ".ffmpeg.lock"  # outputs/jobs/<job_id>.ffmpeg.lock: held by every ffmpeg of a run of the job


class PlannedClip(NamedTuple):
    job_id: str
    trim_in: float
    trim_out: float


@dataclass(frozen=True)
class AssemblyDeps:
    """What assembly works with, so that its plan and its job driver never see a request or the app (the routes
    build it: :func:`mvserver.app.assembly_deps`): the settings, the job engine, the records next to the
    outputs (the runs' locks), the artefacts (clips, songs, the video made), the songs' copies, the slots bounding
    probes and the node's ffmpeg-heavy runs, and the saved songs."""

    config: Config
    jobs: JobEngine
    outputs: OutputStore
    artefacts: Artefacts
    songs: songs.SongWork
    probe_slots: asyncio.Semaphore  # lipsync.limits.ffmpeg_concurrency, shared with lip sync's probes
    heavy_slots: asyncio.Semaphore  # media.yaml ffmpeg.concurrency, shared with lip-sync cuts
    saved_audio: Callable[
        ..., Awaitable[tuple[str, dict[str, Any]]]
    ]  # audio: (audio_id, field, caller) -> (key, sidecar)


# -- checks before a job is accepted ------------------------------------------------------------------------------


async def _clip_file(
    deps: AssemblyDeps, job_id: str, field: str, caller: str | None, known: dict[str, Job | None]
) -> str:
    """The MP4 (its key) of a succeeded clip job the caller may use (400 naming ``field`` otherwise; another key's
    job is as unknown as a missing one). ``known``: jobs the request has read already (a clip listed twice is read once)."""
    if job_id not in known:
        known[job_id] = await deps.jobs.get(job_id)
    job = known[job_id]
    key, _ = await finished_clip(
        job, job_id, deps.artefacts, field, caller, "assembly needs finished clips", kinds=CLIP_KINDS
    )
    return key


async def _probe(deps: AssemblyDeps, paths: list[Path], fields: list[str]) -> list[tuple[MediaInfo, int]]:
    """Every clip probed in one ffmpeg run (bounded like lip sync's probes); on failure, the culprit is named."""
    async with deps.probe_slots:
        try:
            described = await probe_clips(paths)
        except MediaError:
            described = None
        if described is None or any(i.first_video is None or n < 1 for i, n in described):
            for path, field in zip(paths, fields, strict=False):
                try:
                    info = await probe(path)
                except MediaError as exc:
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
        first, kept = kept_frames(trim_in, trim_out, frames, fps, out_fps)
    except AssemblyInputError as exc:
        name = field(index, exc.field)
        raise ApiError(400, "invalid_trim", f"{name}: {str(exc).partition(': ')[2]}", field=name) from None
    start = trim_in or 0.0
    return start, min(frames / fps, trim_out) if trim_out is not None else frames / fps, kept / fps


def _clip_field(index: int, name: str) -> str:
    return f"clips.{index}.{name}"


async def plan(
    deps: AssemblyDeps,
    clips: Sequence[tuple[str, float | None, float | None]],
    options: AssemblyOptions,
    audio_id: str | None,
    audio_offset: float,
    field: Callable[[int, str], str] = _clip_field,
    caller: str | None = None,
    clips_field: str = "clips",
    known: dict[str, Job | None] | None = None,
) -> dict[str, Any]:
    """Check an assembly against the files (clips probed, the song's length) and the caps of one request (output
    seconds, clips per filter graph), and return the job's request: what the job runs. ``known``: the clips' jobs
    when the request has read them already (a project's), so that none is read twice."""
    known = dict(known or {})
    keys = []
    for i, (job_id, _, _) in enumerate(clips):
        keys.append(await _clip_file(deps, job_id, field(i, "job_id"), caller, known))
    async with contextlib.AsyncExitStack() as files:
        paths = [await files.enter_async_context(deps.artefacts.local_file(key)) for key in keys]
        described = await _probe(deps, paths, [field(i, "job_id") for i in range(len(clips))])
    planned: list[PlannedClip] = []
    seconds: list[float] = []
    first = described[0][0].first_video
    assert first is not None
    out_fps = output_fps(first)
    for index, ((job_id, trim_in, trim_out), (info, frames)) in enumerate(zip(clips, described, strict=False)):
        video = info.first_video
        assert video is not None
        start, end, kept = _kept(index, trim_in, trim_out, frames, video.fps or 24.0, out_fps, field)
        planned.append(PlannedClip(job_id, start, end))
        seconds.append(kept)
        if options.fit is None and abs(video.aspect - first.aspect) > ASPECT_TOLERANCE:
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
        expected = _crossfaded_seconds(seconds, options.crossfade_seconds, out_fps, deps.config.media.assembly)
    cap = deps.config.media.assembly.output_seconds_max
    if expected > cap:
        raise ApiError(
            400,
            "assembly_too_long",
            f"{clips_field}: the video would last {expected:.3f} s; one assembly may make at most {cap:g} s",
            field=clips_field,
        )
    if audio_id is not None:
        await _check_song(deps, audio_id, audio_offset, caller)
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
    frames = [output_frames(s, out_fps) for s in seconds]
    try:
        fade = crossfade_frames(crossfade, out_fps)
    except AssemblyInputError as exc:
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
        check_graph_clips(frames, fade, limits.graph_clips_max)
    except AssemblyInputError as exc:
        raise ApiError(400, "graph_too_large", str(exc), field="crossfade_seconds") from None
    return (sum(frames) - (len(frames) - 1) * fade) / out_fps


async def _check_song(deps: AssemblyDeps, audio_id: str, offset: float, caller: str | None) -> None:
    try:
        _, sidecar = await deps.saved_audio(audio_id, caller=caller)
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


async def submit(deps: AssemblyDeps, request: dict[str, Any], owner: str | None, job_id: str) -> Job:
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
    return await deps.jobs.submit(job)


async def assemble(
    deps: AssemblyDeps, body: Any, caller: str | None, charge: Callable[[], Awaitable[list[str]]]
) -> Job:
    """``POST /api/mv/assemble``: plan the clips of a validated request and queue the job that runs that plan
    (``charge`` takes the caller's quota once the plan holds)."""
    clips = [(c.job_id, c.trim_in, c.trim_out) for c in body.clips]
    planned = await plan(deps, clips, body, body.audio_id, body.audio_offset, caller=caller)
    [job_id] = await charge()  # only a request that got this far costs a token
    return await submit(deps, planned, caller, job_id)


async def assemble_project(
    deps: AssemblyDeps,
    projects: ProjectDeps,
    project: Project,
    options: AssemblyOptions,
    caller: str | None,
    charge: Callable[[], Awaitable[list[str]]],
) -> tuple[Job, Project, JobStates]:
    """The project's chosen clips in display order with their trims, and its song from its offset, planned and
    queued; the job recorded as the project's assembly. ``project``: as the request loaded it. The project is
    settled once, its versions' jobs read once (the plan reuses them) and the link's compare-and-set reuses both;
    the job, the project as written and the job states it was settled with."""
    project, jobs = await settled(projects, project)
    entries = project_timeline(project)
    if not entries:
        raise ApiError(400, "no_scenes", "scenes: the project has no scenes to assemble", field="scenes")
    limit = projects.config.projects.limits.assembly_clips_max
    if len(entries) > limit:
        raise ApiError(
            400,
            "too_many_clips",
            f"scenes: {len(entries)} scenes, more than the {limit} clips one assembly may join",
            field="scenes",
        )
    for index, entry in enumerate(entries):
        chosen_clip(entry, jobs, f"scenes.{index}")

    def field(index: int, name: str) -> str:
        return f"scenes.{index}" if name == "job_id" else f"scenes.{index}.{name}"

    clips = [(e.job_id or "", e.trim_in, e.trim_out) for e in entries]
    song = project.song
    planned = await plan(
        deps,
        clips,
        options,
        song.audio_id if song else None,
        song.offset if song else 0.0,
        field,
        caller=caller,
        clips_field="scenes",
        known=jobs,
    )
    planned["project_id"] = project.id
    [job_id] = await charge()
    job = await submit(deps, planned, caller, job_id)

    def link(current: Project, _jobs: JobStates) -> None:
        current.assembly_job_id = job.id

    project, jobs = await update_loaded(projects, project, jobs, link)
    return job, project, jobs


# -- the job driver -------------------------------------------------------------------------------------------------


_MEDIA_FIELD = re.compile(r"^clips\[(\d+)\]")


def _field(name: str) -> str:
    """media names fields ``clips[2].trim_in`` and ``song_offset``; the API says ``clips.2.trim_in``, ``audio_offset``."""
    name = _MEDIA_FIELD.sub(lambda m: f"clips.{m[1]}", name)
    return {"song": "audio_id", "song_offset": "audio_offset"}.get(name, name)


class AssemblyDriver:
    """Runs ffmpeg on this machine (a local driver: after a restart it simply runs again)."""

    def __init__(self, deps: AssemblyDeps):
        self.deps = deps

    async def run(self, job: Job, dest: str, progress: Progress) -> int:
        request = job.request
        store = self.deps.artefacts
        async with contextlib.AsyncExitStack() as files:
            clips = []
            for clip in request["clips"]:
                try:
                    path = await files.enter_async_context(
                        store.local_file(artefact_key("videos", clip["job_id"], ".mp4"))
                    )
                except FileNotFoundError:
                    raise ApiError(500, "assembly_failed", f"the clip {clip['job_id']} is gone") from None
                clips.append(Clip(path, clip["trim_in"], clip["trim_out"]))
            song: Path | None = None
            song_copy: SongCopy | None = None
            if request.get("audio_id"):
                song_key, sidecar = await self.deps.saved_audio(request["audio_id"])
                song = await files.enter_async_context(store.local_file(song_key))
                song_copy = await _song_copy(self.deps, request["audio_id"], song_key, sidecar, files)
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

        slots = self.deps.heavy_slots
        async with run_lock(self.deps.outputs.path("jobs", job.id, LOCK_SUFFIX), on_wait=waiting) as held:
            if slots.locked():
                await waiting()
            async with slots:
                yield held

    async def _assemble(
        self,
        request: dict[str, Any],
        clips: list[Clip],
        song: Path | None,
        song_copy: SongCopy | None,
        dest: Path,
        progress: Progress,
        held: int,
    ) -> AssemblyResult:
        """``assemble_clips`` within the limits of media.yaml, its progress pumped to the job, its failures as job
        errors (``invalid_assembly``, ``assembly_timeout``, ``assembly_too_large``, ``assembly_failed``)."""
        settings = self.deps.config.media
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
            return await assemble_clips(
                clips,
                dest,
                temp_name=temp_path,
                song=song,
                song_offset=request["audio_offset"],
                transition=request["transition"],
                crossfade_seconds=request["crossfade_seconds"],
                clip_audio=request["clip_audio"],
                fit=request["fit"],
                progress=on_progress,
                limits=ffmpeg_limits(self.deps.config),
                hold=(held,),
                graph_clips_max=settings.assembly.graph_clips_max,
                song_copy=song_copy,
            )
        except AssemblyInputError as exc:
            raise ApiError(400, "invalid_assembly", str(exc), field=_field(exc.field)) from None
        except MediaTimeout as exc:
            limits = settings.ffmpeg
            raise ApiError(
                500,
                "assembly_timeout",
                f"{exc} (each run may last {limits.timeout_base_seconds:g} s + "
                f"{limits.timeout_seconds_per_output_second:g} s per second it "
                "writes: media.yaml ffmpeg.timeout_*)",
            ) from None
        except MediaMemoryError as exc:
            raise ApiError(500, "assembly_too_large", f"{exc} (media.yaml ffmpeg.memory_mb)") from None
        except MediaError as exc:
            raise ApiError(500, "assembly_failed", f"ffmpeg failed: {exc}") from None
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)


async def _song_copy(
    deps: AssemblyDeps, audio_id: str, song: str, sidecar: dict[str, Any], files: contextlib.AsyncExitStack
) -> SongCopy | None:
    """The song's AAC copy made at upload, whose packets a cut-only assembly copies, held open in ``files``; None
    (the song is encoded instead) if it is not there yet, in which case it is made now for the next assembly."""
    duration = sidecar.get("duration")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool):
        return None
    try:
        path = await files.enter_async_context(deps.artefacts.local_file(songs.aac_copy(audio_id)))
    except FileNotFoundError:
        deps.songs.copies(audio_id, song, float(duration))
        return None
    return SongCopy(path, float(duration))
