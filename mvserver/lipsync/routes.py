"""The lip-sync routes: ``POST /api/mv/lipsync`` and a project scene's ``lipsync``; the checks and the cut are in
:mod:`mvserver.lipsync.service`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from mvserver.core.config import CONFIG, LipsyncLimits, LipsyncSettings
from mvserver.core.debug import debug_print
from mvserver.core.errors import ApiError, validate
from mvserver.core.storage import STORE, OutputStore, check_id, new_id
from mvserver.jobs import JOBS, Job, clips
from mvserver.jobs.accepted import accepted_response
from mvserver.jobs.options import job_fields
from mvserver.lipsync.service import KIND, WINDOW_SUFFIX, cut_window, plan_window, scene_window, song_file
from mvserver.media import ffmpeg as media
from mvserver.openapi.schemas import REQUEST_MODELS, parse_body, read_json_object
from mvserver.projects.routes import owned_project
from mvserver.projects.schemas import SCENE_LIPSYNC_OPTIONS
from mvserver.projects.service import BASE as PROJECTS_BASE
from mvserver.projects.service import (
    JobStates,
    action_options,
    add_version,
    check_room,
    chosen_clip,
    job_states,
    load_settled,
    normal_options,
    project_timeline,
    project_view,
    update,
)
from mvserver.projects.store import ClipVersion, Project
from mvserver.providers import PROVIDERS, Snapshot
from mvserver.providers.replicate import ReplicateProvider
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge

routes = web.RouteTableDef()

FFMPEG_SLOTS = web.AppKey("lipsync_ffmpeg_slots", asyncio.Semaphore)
# ffmpeg-heavy job runs (assembly runs, lip-sync cuts) at once on this node: media.yaml ffmpeg.concurrency.
HEAVY_FFMPEG_SLOTS = web.AppKey("heavy_ffmpeg_slots", asyncio.Semaphore)


def ffmpeg_limits(app: web.Application) -> media.FfmpegLimits:
    """The limits of every ffmpeg a job of this app runs (media.yaml ``ffmpeg``)."""
    return media.FfmpegLimits(**app[CONFIG].media.ffmpeg.model_dump(exclude={"concurrency"}))


async def finished_clip(
    app: web.Application, job_id: str, limits: LipsyncLimits, caller: str | None = None
) -> tuple[Path, media.MediaInfo]:
    """The MP4 of a succeeded job, probed (400 naming ``video_job_id`` otherwise; another key's job is unknown)."""
    field = "video_job_id"
    job = await app[JOBS].get(job_id)
    path, size = await clips.finished_clip(job, job_id, app[STORE], field, caller, "lip sync needs a finished clip")
    if size > limits.max_clip_bytes:
        raise ApiError(
            400, "clip_too_large", f"{field}: the clip has {size} bytes; at most {limits.max_clip_bytes}", field=field
        )
    try:
        async with app[FFMPEG_SLOTS]:
            info = await media.probe(path, timeout=limits.ffmpeg_timeout_seconds)
    except media.MediaError as exc:
        raise ApiError(400, "invalid_clip", f"{field}: the clip cannot be read: {exc}", field=field) from None
    if info.first_video is None or not (info.duration or 0) > 0:
        raise ApiError(400, "invalid_clip", f"{field}: the file of job {job_id} holds no video", field=field)
    if info.duration > limits.max_clip_seconds:
        raise ApiError(
            400,
            "clip_too_long",
            f"{field}: the clip lasts {info.duration:g} s; lip sync takes at most {limits.max_clip_seconds:g} s",
            field=field,
        )
    return path, info


# -- the handler ------------------------------------------------------------------------------------------------------


@routes.post("/api/mv/lipsync")
@idempotent
async def create_lipsync(request: web.Request) -> web.Response:
    app = request.app
    config = app[CONFIG]
    body, defaulted = await parse_body(request, app[REQUEST_MODELS].lipsync, config.debug)
    if body.scene_id is not None and body.project_id is None:
        raise ApiError(400, "invalid_field", "scene_id: needs project_id", field="scene_id")
    await reserve(request, body)
    job = await submit_lipsync(app, body, defaulted, key_id(request), charge=lambda: charge(request, "jobs"))
    return accepted_response(request, [job])


async def submit_lipsync(
    app: web.Application,
    body: Any,
    defaulted: list[str],
    owner: str | None,
    charge: Callable[[], Awaitable[list[str]]] | None = None,
) -> Job:
    """Check a lip-sync request against the clip and the song and queue its job (``owner``: the caller's key;
    ``charge`` takes the caller's quota once the request is known to be valid)."""
    config = app[CONFIG]
    settings = config.lipsync
    song = await song_file(app, body.audio_id, caller=owner)
    _, clip = await finished_clip(app, body.video_job_id, settings.limits, owner)
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
    provider = app[PROVIDERS].replicate
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
    return await app[JOBS].submit(job)


@routes.post(PROJECTS_BASE + "/{project_id}/scenes/{scene_id}/lipsync")
@idempotent
async def lipsync_scene(request: web.Request) -> web.Response:
    """Lip-sync the scene's chosen clip to its slice of the project's song; the result becomes a new version of the
    scene's clip (chosen once it succeeds, like a regeneration)."""
    app = request.app
    project_id = (await owned_project(request)).id  # 404 for an unknown id or another key's project
    scene_id = check_id(request.match_info["scene_id"], "scene_id")
    options = action_options(await read_json_object(request, optional=True), SCENE_LIPSYNC_OPTIONS)
    await reserve(request, normal_options(app[REQUEST_MODELS].lipsync, options, SCENE_LIPSYNC_OPTIONS))
    project, jobs = await load_settled(app, project_id)
    index = next((i for i, s in enumerate(project.scenes) if s.id == scene_id), None)
    if index is None:
        raise ApiError(404, "not_found", f"the project has no scene {scene_id}", field="scene_id")
    field = f"scenes.{index}"
    if project.song is None:
        raise ApiError(400, "missing_field", "audio_id: the project has no song to lip-sync to", field="audio_id")
    entry = project_timeline(project)[index]
    chosen = chosen_clip(entry, jobs, field)
    limit = app[CONFIG].projects.limits.versions_per_scene_max
    check_room(entry.scene, jobs, limit, field)
    start, end = scene_window(entry, project.song, field)
    model = app[REQUEST_MODELS].lipsync
    data = {
        "video_job_id": chosen.id,
        "audio_id": project.song.audio_id,
        "audio_start": start,
        "audio_end": end,
        "project_id": project.id,
        "scene_id": scene_id,
        **options,
    }
    body, defaulted = validate(model, data)
    job = await submit_lipsync(app, body, defaulted, key_id(request), charge=lambda: charge(request, "jobs"))
    duration = next(v.duration for v in entry.scene.versions if v.job_id == chosen.id)

    def link(current: Project, states: JobStates) -> None:
        target = current.scene(scene_id)
        if target is None:
            raise ApiError(409, "conflict", f"scene {scene_id} was removed meanwhile", field="scene_id")
        add_version(target, ClipVersion(job_id=job.id, duration=duration), states, limit)

    try:
        project = await update(app, project_id, link)
    except BaseException:
        await app[JOBS].cancel(job.id)  # not linked: it must not run unseen
        raise
    return accepted_response(request, [job], project=project_view(project, await job_states(app, project)))


# -- the job driver ---------------------------------------------------------------------------------------------------


class LipsyncDriver:
    """A lip-sync job as a Replicate prediction (a remote driver: the engine saves, polls, resumes and cancels it)."""

    def __init__(self, app: web.Application, provider: ReplicateProvider, settings: LipsyncSettings):
        self.app = app
        self.provider = provider
        self.settings = settings

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
        outputs: OutputStore = self.app[STORE]
        request = job.request
        song = await song_file(self.app, request["audio_id"])
        clip = outputs.path("videos", request["video_job_id"], ".mp4")
        if not await asyncio.to_thread(clip.is_file):
            raise ApiError(409, "clip_not_found", f"the clip {request['video_job_id']} is gone", field="video_job_id")
        window = request["window"]
        dest = outputs.path("jobs", job.id, WINDOW_SUFFIX)
        try:
            async with self.app[HEAVY_FFMPEG_SLOTS]:
                await cut_window(
                    song,
                    window["start"],
                    window["seconds"],
                    request["clip_seconds"],
                    dest,
                    self.settings.limits.ffmpeg_timeout_seconds,
                    ffmpeg_limits(self.app),
                )
        except media.MediaError as exc:
            raise ApiError(
                500, "audio_cut_failed", f"the audio window could not be cut: {exc}", field="audio_id"
            ) from None
        try:
            prediction = await self.provider.create(
                self.settings.model, self.inputs(job, clip, dest), webhook, cancel_after=job.seconds_left()
            )
        finally:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
        return prediction.id

    async def poll(self, prediction_id: str) -> Snapshot:
        return await self.provider.poll(prediction_id)

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: Path) -> int:
        return await self.provider.download(snapshot, prediction_id, dest)

    async def cancel(self, prediction_id: str) -> Snapshot:
        return await self.provider.cancel(prediction_id)


def lipsync_kind(app: web.Application):  # type: ignore[no-untyped-def]
    """The driver factory for ``lipsync`` jobs."""
    return lambda job: LipsyncDriver(app, app[PROVIDERS].replicate, app[CONFIG].lipsync)


def setup(app: web.Application) -> None:
    """Routes and the per-app bounds on concurrent ffmpeg processes."""
    app[FFMPEG_SLOTS] = asyncio.Semaphore(app[CONFIG].lipsync.limits.ffmpeg_concurrency)
    app[HEAVY_FFMPEG_SLOTS] = asyncio.Semaphore(app[CONFIG].media.ffmpeg.concurrency)
    app.add_routes(routes)
