"""``POST /api/mv/lipsync``: a lip-sync job. A finished clip's mouth movements follow a window of a song.

The job runs Replicate ``sync/lipsync-2-pro`` on the same job engine as videos (JSON status, SSE, cancel, resume with
the same prediction id, ``get_video/{job_id}``). When the prediction is created, the window is cut from the song with
the bundled ffmpeg (an asyncio subprocess) to the clip's length, as a WAV file, and the clip and the window are
uploaded through Replicate's files API by the replicate client. The cut is redone whenever ``start`` runs again (a job
resumed before its prediction existed), and removed once the prediction holds its copy.

Every read of a song goes through :func:`song_file`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mvserver.audio.service import FORMATS
from mvserver.core.artefacts import Artefacts, artefact_key, new_id
from mvserver.core.config import Config, LipsyncLimits, LipsyncSettings
from mvserver.core.debug import debug_print
from mvserver.core.errors import ApiError
from mvserver.core.validation import validate
from mvserver.jobs import Job, JobEngine, clips
from mvserver.jobs.options import job_fields
from mvserver.media.args import duration_arg, input_args
from mvserver.media.errors import MediaError
from mvserver.media.limits import DEFAULT_LIMITS, FfmpegLimits
from mvserver.media.probe import MediaInfo, probe
from mvserver.media.run import run_ffmpeg
from mvserver.projects.service import (
    JobStates,
    ProjectDeps,
    TimelineEntry,
    add_version,
    check_room,
    chosen_clip,
    project_timeline,
    settled,
    update_loaded,
)
from mvserver.projects.store import ClipVersion, Project
from mvserver.projects.store import Song as ProjectSong
from mvserver.providers import Providers, Snapshot
from mvserver.providers.replicate import ReplicateProvider

KIND = "lipsync"
WINDOW_SUFFIX = ".lipsync.wav"
TOLERANCE_SECONDS = 0.05  # a window may pass the song's end by this much (rounding); the rest is silence
COPY_PACKET_BYTES = 1024  # WAV packets this small make a stream-copied cut end within ~6 ms of the wanted length
AUDIO_SUFFIXES = {"mp3": ".mp3", "wav": ".wav", "m4a": ".m4a", "aac": ".aac", "ogg": ".ogg", "flac": ".flac"}
COPY_MAX_CHANNELS = 2
COPY_MAX_RATE = 48000
# Bytes per second a cut may write: a copied cut keeps the song's PCM samples (at most 8 bytes, pcm_f64le), a decoded
# one writes 16-bit samples; both at most COPY_MAX_CHANNELS x COPY_MAX_RATE. Plus room for the header and a packet.
COPY_BYTES_PER_SECOND = COPY_MAX_CHANNELS * COPY_MAX_RATE * 8
DECODE_BYTES_PER_SECOND = COPY_MAX_CHANNELS * COPY_MAX_RATE * 2
CUT_SLACK_BYTES = 1 << 16


@dataclass(frozen=True)
class LipsyncDeps:
    """What lip sync works with, so that its checks and its job driver never see a request or the app (the routes
    build it: :func:`mvserver.app.lipsync_deps`): the settings, the job engine, the output files, the
    providers (Replicate), the slots bounding its probes and the node's ffmpeg-heavy runs, and the saved songs."""

    config: Config
    jobs: JobEngine
    artefacts: Artefacts
    providers: Providers
    probe_slots: asyncio.Semaphore  # lipsync.limits.ffmpeg_concurrency
    heavy_slots: asyncio.Semaphore  # media.yaml ffmpeg.concurrency, shared with assembly runs
    saved_audio: Callable[
        ..., Awaitable[tuple[str, dict[str, Any]]]
    ]  # audio: (audio_id, field, caller) -> (key, sidecar)


def ffmpeg_limits(config: Config) -> FfmpegLimits:
    """The limits of every ffmpeg a job runs (media.yaml ``ffmpeg``)."""
    return FfmpegLimits(**config.media.ffmpeg.model_dump(exclude={"concurrency"}))


# -- songs ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Song:
    """A saved song, as far as lip sync needs it: ``path`` is the local file ffmpeg cuts (None until a job holds one
    of the artefact ``key``)."""

    path: Path | None
    duration: float
    format: str
    sample_rate: int | None
    channels: int | None
    key: str = ""  # the artefact, e.g. audio/<id>.mp3


async def song_file(deps: LipsyncDeps, audio_id: str, field: str = "audio_id", caller: str | None = None) -> Song:
    """An uploaded song (:func:`mvserver.audio.service.saved_audio`) with what lip sync needs from its record. 400 for a
    malformed id or a format lip sync cannot cut, 404 for a missing song or a record without its length."""
    key, sidecar = await deps.saved_audio(audio_id, field, caller)
    fmt, duration = sidecar.get("format"), sidecar.get("duration")
    if duration is None:
        raise ApiError(404, "not_found", f"audio {audio_id}: its record has no duration", field=field)
    if fmt not in AUDIO_SUFFIXES:
        raise ApiError(
            400, "invalid_audio", f"audio {audio_id} is {fmt!r}; lip sync takes {sorted(AUDIO_SUFFIXES)}", field=field
        )
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
        raise ApiError(400, "invalid_audio", f"audio {audio_id} has no playable length ({duration!r})", field=field)
    rate, channels = _int_or_none(sidecar.get("sample_rate")), _int_or_none(sidecar.get("channels"))
    return Song(None, float(duration), fmt, rate, channels, key=key)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- the audio cut (probing and running ffmpeg: mvserver.media.run and .probe) -------------------------------------------------------


def cut_args(song: Song, start: float, seconds: float, length: float, dest: Path) -> list[str]:
    """ffmpeg arguments that write ``seconds`` of ``song`` from ``start``, padded with silence to ``length``, as WAV.

    A PCM WAV song within two channels and 48 kHz whose window needs no padding is stream-copied (in small packets,
    so the cut is exact to a few ms); anything else is decoded, trimmed to the sample and written as 16-bit PCM. The
    song is read with the demuxer of its format, from the local file only. Whatever the filters do, the output
    stops at ``length`` seconds and at the bytes that many seconds may take (``-t``, ``-fs``); a duration that is 0
    at ffmpeg's precision raises :class:`mvserver.media.errors.DurationError` (ffmpeg would read it as "no limit").
    """
    assert song.path is not None, song
    source = input_args(song.path, [FORMATS[song.format].demuxer])
    if (
        song.format == "wav"
        and (song.channels or 99) <= COPY_MAX_CHANNELS
        and (song.sample_rate or 1e9) <= COPY_MAX_RATE
        and seconds >= length - 0.001
    ):
        return [
            "-loglevel",
            "error",
            "-y",
            "-max_size",
            str(COPY_PACKET_BYTES),
            "-ss",
            f"{start:.6f}",
            "-t",
            duration_arg(length),
            *source,
            "-map",
            "0:a:0",
            "-c",
            "copy",
            *_output_limits(length, COPY_BYTES_PER_SECOND),
            "-f",
            "wav",
            str(dest),
        ]
    args = [
        "-loglevel",
        "error",
        "-y",
        "-ss",
        f"{start:.6f}",
        *source,
        "-map",
        "0:a:0",
        "-af",
        f"atrim=duration={duration_arg(seconds)},asetpts=N/SR/TB,apad=whole_dur={duration_arg(length)}",
    ]
    if song.channels is None or song.channels > COPY_MAX_CHANNELS:
        args += ["-ac", "2"]
    if song.sample_rate is None or song.sample_rate > COPY_MAX_RATE:
        args += ["-ar", str(COPY_MAX_RATE)]
    return args + ["-c:a", "pcm_s16le", *_output_limits(length, DECODE_BYTES_PER_SECOND), "-f", "wav", str(dest)]


def _output_limits(length: float, bytes_per_second: int) -> list[str]:
    """Output options that end a cut at ``length`` seconds and at the size that many seconds may take."""
    return ["-t", duration_arg(length), "-fs", str(max_cut_bytes(length, bytes_per_second))]


def max_cut_bytes(length: float, bytes_per_second: int = COPY_BYTES_PER_SECOND) -> int:
    """The most bytes a cut of ``length`` seconds may write (ffmpeg may pass ``-fs`` by one packet)."""
    return math.ceil(length * bytes_per_second) + CUT_SLACK_BYTES


async def cut_window(
    song: Song,
    start: float,
    seconds: float,
    length: float,
    dest: Path,
    timeout: float,
    limits: FfmpegLimits = DEFAULT_LIMITS,
) -> None:
    """Write the window to ``dest`` (a file of :meth:`Artefacts.writing`, stored whole or not at all); removed on any
    failure."""
    try:
        await run_ffmpeg(cut_args(song, start, seconds, length, dest), timeout=timeout, limits=limits)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


# -- request checks ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The song's seconds [start, end) laid under a clip of ``length`` seconds (padded with silence if shorter)."""

    start: float
    end: float
    length: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def plan_window(
    start: float, end: float | None, clip_seconds: float, song_seconds: float, min_seconds: float
) -> Window:
    """Check the window against the clip, the song and the shortest window allowed (400 naming the field)."""
    sent_end = end
    if start >= song_seconds:
        raise ApiError(
            400,
            "song_too_short",
            f"audio_start: {start:g} s is not before the song's end ({song_seconds:g} s)",
            field="audio_start",
        )
    if end is None:
        end = start + clip_seconds
        if end > song_seconds + TOLERANCE_SECONDS:
            raise ApiError(
                400,
                "song_too_short",
                f"audio_start: a {clip_seconds:g} s window (the clip's length) from "
                f"{start:g} s ends at {end:g} s, after the song's end "
                f"({song_seconds:g} s)",
                field="audio_start",
            )
    else:
        if end <= start:
            raise ApiError(400, "invalid_field", "audio_end: must be greater than audio_start", field="audio_end")
        if end - start > clip_seconds + TOLERANCE_SECONDS:
            raise ApiError(
                400,
                "window_too_long",
                f"audio_end: the window ({end - start:g} s) is longer than the clip ({clip_seconds:g} s)",
                field="audio_end",
            )
        if end > song_seconds + TOLERANCE_SECONDS:
            raise ApiError(
                400,
                "song_too_short",
                f"audio_end: {end:g} s is after the song's end ({song_seconds:g} s)",
                field="audio_end",
            )
    window = Window(start=start, end=min(end, start + clip_seconds, song_seconds), length=clip_seconds)
    if window.seconds < min_seconds:  # ffmpeg would cut ~0 s as "no limit"; and no one can sing in it
        field = "video_job_id" if clip_seconds < min_seconds else "audio_start" if sent_end is None else "audio_end"
        raise ApiError(
            400,
            "window_too_short",
            f"{field}: the window ({window.seconds:g} s) is shorter than "
            f"{min_seconds:g} s (lipsync.limits.min_window_seconds)",
            field=field,
        )
    return window


# -- a project's scene ----------------------------------------------------------------------------------------------


def scene_window(entry: TimelineEntry, song: ProjectSong, field: str) -> tuple[float, float]:
    """The song under the scene's clip, from the clip's first frame: the kept part (from ``trim_in``) plays the song
    from the timeline's ``song_start``, so the window starts ``trim_in`` earlier and lasts until the kept part ends
    (cut at the song's end; the rest of the clip gets silence)."""
    assert entry.song_start is not None
    start = round(entry.song_start - entry.trim_in, 6)
    if start < 0:
        raise ApiError(
            400,
            "invalid_trim",
            f"{field}.trim_in: the scene's trim ({entry.trim_in:g} s) starts before the "
            "song does; lower trim_in or raise the song offset",
            field=f"{field}.trim_in",
        )
    if start >= song.duration:
        raise ApiError(
            400,
            "song_too_short",
            f"{field}: the scene starts at {start:g} s, after the song's end ({song.duration:g} s)",
            field=field,
        )
    return start, min(round(entry.song_start + entry.seconds, 6), song.duration)


async def finished_clip(
    deps: LipsyncDeps, job_id: str, limits: LipsyncLimits, caller: str | None = None, known: Job | None = None
) -> tuple[str, MediaInfo]:
    """The MP4 (its artefact key) of a succeeded job, probed (400 naming ``video_job_id`` otherwise; another key's job is unknown).
    ``known``: the job, when the request has read it already."""
    field = "video_job_id"
    job = known if known is not None and known.id == job_id else await deps.jobs.get(job_id)
    key, size = await clips.finished_clip(job, job_id, deps.artefacts, field, caller, "lip sync needs a finished clip")
    if size > limits.max_clip_bytes:
        raise ApiError(
            400, "clip_too_large", f"{field}: the clip has {size} bytes; at most {limits.max_clip_bytes}", field=field
        )
    try:
        async with deps.probe_slots, deps.artefacts.local_file(key) as path:
            info = await probe(path, timeout=limits.ffmpeg_timeout_seconds)
    except FileNotFoundError:
        raise ApiError(400, "clip_not_found", f"{field}: the video of job {job_id} is gone", field=field) from None
    except MediaError as exc:
        raise ApiError(400, "invalid_clip", f"{field}: the clip cannot be read: {exc}", field=field) from None
    if info.first_video is None or info.duration is None or not info.duration > 0:
        raise ApiError(400, "invalid_clip", f"{field}: the file of job {job_id} holds no video", field=field)
    if info.duration > limits.max_clip_seconds:
        raise ApiError(
            400,
            "clip_too_long",
            f"{field}: the clip lasts {info.duration:g} s; lip sync takes at most {limits.max_clip_seconds:g} s",
            field=field,
        )
    return key, info


async def submit_lipsync(
    deps: LipsyncDeps,
    body: Any,
    defaulted: list[str],
    owner: str | None,
    charge: Callable[[], Awaitable[list[str]]] | None = None,
    clip_job: Job | None = None,
) -> Job:
    """Check a lip-sync request against the clip and the song and queue its job (``owner``: the caller's key;
    ``charge`` takes the caller's quota once the request is known to be valid; ``clip_job``: the clip's job, when
    the request has read it already)."""
    config = deps.config
    settings = config.lipsync
    song = await song_file(deps, body.audio_id, caller=owner)
    _, clip = await finished_clip(deps, body.video_job_id, settings.limits, owner, clip_job)
    assert clip.duration is not None  # finished_clip refuses a clip without one
    window = plan_window(
        body.audio_start, body.audio_end, clip.duration, song.duration, settings.limits.min_window_seconds
    )
    summary = body.model_dump()
    summary.update(
        window={"start": window.start, "end": window.end, "seconds": round(window.seconds, 6)},
        clip_seconds=clip.duration,
        song_seconds=song.duration,
        defaults_applied=defaulted,
    )
    debug_print(config.debug, f"lipsync job for {settings.model}", summary)
    [job_id] = await charge() if charge is not None else [new_id()]  # only a valid request costs a token
    provider = deps.providers.replicate
    job = Job(
        id=job_id,
        backend=provider.name,
        model=settings.model,
        sandbox=provider.sandbox,
        request=summary,
        kind=KIND,
        owner=owner,
        **job_fields(body),
    )
    return await deps.jobs.submit(job)


async def submit_scene_lipsync(
    deps: LipsyncDeps,
    projects: ProjectDeps,
    project: Project,
    scene_id: str,
    options: dict[str, Any],
    owner: str | None,
    charge: Callable[[], Awaitable[list[str]]] | None = None,
) -> tuple[Job, Project, JobStates]:
    """Lip-sync the scene's chosen clip to its slice of the project's song (``project``: as the request loaded it)
    and link the job as a new version of the scene's clip; the job, the project as written and its versions' jobs.
    The project is settled and its jobs read once; the link's compare-and-set reuses them."""
    project, jobs = await settled(projects, project)
    index = next((i for i, s in enumerate(project.scenes) if s.id == scene_id), None)
    if index is None:
        raise ApiError(404, "not_found", f"the project has no scene {scene_id}", field="scene_id")
    field = f"scenes.{index}"
    if project.song is None:
        raise ApiError(400, "missing_field", "audio_id: the project has no song to lip-sync to", field="audio_id")
    entry = project_timeline(project)[index]
    chosen = chosen_clip(entry, jobs, field)
    limit = projects.config.projects.limits.versions_per_scene_max
    check_room(entry.scene, jobs, limit, field)
    start, end = scene_window(entry, project.song, field)
    data = {
        "video_job_id": chosen.id,
        "audio_id": project.song.audio_id,
        "audio_start": start,
        "audio_end": end,
        "project_id": project.id,
        "scene_id": scene_id,
        **options,
    }
    body, defaulted = validate(projects.models.lipsync, data)
    job = await submit_lipsync(deps, body, defaulted, owner, charge, clip_job=chosen)
    duration = next(v.duration for v in entry.scene.versions if v.job_id == chosen.id)

    def link(current: Project, states: JobStates) -> None:
        target = current.scene(scene_id)
        if target is None:
            raise ApiError(409, "conflict", f"scene {scene_id} was removed meanwhile", field="scene_id")
        add_version(target, ClipVersion(job_id=job.id, duration=duration), states, limit)

    try:
        project, jobs = await update_loaded(projects, project, jobs, link)
    except BaseException:
        await deps.jobs.cancel(job.id)  # not linked: it must not run unseen
        raise
    return job, project, {**jobs, job.id: job}


# -- the job driver ---------------------------------------------------------------------------------------------------


class LipsyncDriver:
    """A lip-sync job as a Replicate prediction (a remote driver: the engine saves, polls, resumes and cancels it)."""

    def __init__(self, deps: LipsyncDeps):
        self.deps = deps
        self.provider: ReplicateProvider = deps.providers.replicate
        self.settings: LipsyncSettings = deps.config.lipsync

    def inputs(self, job: Job, clip: Path, window: Path) -> dict[str, Any]:
        """The model's input; the two paths are uploaded through Replicate's files API by the client."""
        request = job.request
        return {
            "video": clip,
            "audio": window,
            "sync_mode": request["sync_mode"],
            "temperature": request["temperature"],
            "active_speaker": request["active_speaker"],
        }

    async def start(self, job: Job, webhook: str | None) -> str:
        """Cut the window (again, if a restart came before the prediction existed) and create the prediction."""
        store = self.deps.artefacts
        request = job.request
        song = await song_file(self.deps, request["audio_id"])
        window = request["window"]
        dest = artefact_key("jobs", job.id, WINDOW_SUFFIX)
        async with contextlib.AsyncExitStack() as files:
            try:
                clip = await files.enter_async_context(
                    store.local_file(artefact_key("videos", request["video_job_id"], ".mp4"))
                )
            except FileNotFoundError:
                raise ApiError(
                    409, "clip_not_found", f"the clip {request['video_job_id']} is gone", field="video_job_id"
                ) from None
            song = replace(song, path=await files.enter_async_context(store.local_file(song.key)))
            try:
                async with self.deps.heavy_slots, store.writing(dest) as out:
                    await cut_window(
                        song,
                        window["start"],
                        window["seconds"],
                        request["clip_seconds"],
                        out,
                        self.settings.limits.ffmpeg_timeout_seconds,
                        ffmpeg_limits(self.deps.config),
                    )
            except MediaError as exc:
                raise ApiError(
                    500, "audio_cut_failed", f"the audio window could not be cut: {exc}", field="audio_id"
                ) from None
            try:
                cut = await files.enter_async_context(store.local_file(dest))
                prediction = await self.provider.create(
                    self.settings.model,
                    self.inputs(job, clip, cut),
                    webhook,
                    cancel_after=job.seconds_left(),
                    logs=job.provider_logs,
                )
            finally:
                await store.delete(dest)
        return prediction.id

    async def poll(self, prediction_id: str) -> Snapshot:
        return await self.provider.poll(prediction_id)

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: str) -> int:
        return await self.provider.download(snapshot, prediction_id, dest)

    async def cancel(self, prediction_id: str) -> Snapshot:
        return await self.provider.cancel(prediction_id)
