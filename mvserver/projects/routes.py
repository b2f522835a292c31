"""The project routes (``/api/mv/projects``): each parses the request, charges the caller, calls the project
service (:mod:`mvserver.projects.service`) and answers with the project as clients see it and its ``ETag``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mvserver.core.config import CONFIG
from mvserver.core.errors import ApiError, validate
from mvserver.core.storage import check_id
from mvserver.images.routes import generate_reference
from mvserver.jobs.accepted import accepted_response
from mvserver.openapi.schemas import REQUEST_MODELS, read_json_object
from mvserver.projects import song as project_song
from mvserver.projects.schemas import CHARACTER_OPTIONS, CLIP_OPTIONS
from mvserver.projects.service import (
    BASE,
    JobStates,
    _check_image,
    action_options,
    apply_patch,
    check_if_match,
    create_project,
    etag,
    generate_clips,
    job_states,
    load,
    load_settled,
    normal_options,
    project_timeline,
    project_view,
    song_duration,
    update,
    write_project_scenes,
)
from mvserver.projects.store import CharacterCandidate, Project, Song
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge

routes = web.RouteTableDef()


async def owned_project(request: web.Request) -> Project:
    """The project of the route's ``{project_id}`` if the caller may see it (404 otherwise, as for an unknown id).
    Every project route calls it first; a project's owner never changes, so later reads need no second check."""
    return await load(request.app, _project_id(request), key_id(request))


def _respond(
    project: Project,
    jobs: JobStates,
    status: int = 200,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = project_view(project, jobs) if extra is None else {**extra, "project": project_view(project, jobs)}
    return web.json_response(
        body, status=status, headers={"ETag": etag(project), "Cache-Control": "no-store", **(headers or {})}
    )


# -- handlers ------------------------------------------------------------------------------------------------------


def _project_id(request: web.Request) -> str:
    return check_id(request.match_info["project_id"], "project_id")


@routes.post(BASE)
@idempotent
async def create(request: web.Request) -> web.Response:
    body, _ = validate(request.app[REQUEST_MODELS].projects.create, await read_json_object(request))
    await reserve(request, body)
    project = await create_project(request.app, body, owner=key_id(request))
    return _respond(project, {}, 201, headers={"Location": f"{BASE}/{project.id}"})


@routes.get(BASE + "/{project_id}")
async def get(request: web.Request) -> web.Response:
    project = await owned_project(request)
    return _respond(project, await job_states(request.app, project))


@routes.patch(BASE + "/{project_id}")
async def patch(request: web.Request) -> web.Response:
    app = request.app
    current = await owned_project(request)
    project_id = current.id
    if_match = request.headers.get("If-Match")
    if if_match is None:
        raise ApiError(
            428, "precondition_required", "PATCH needs If-Match with the ETag of the project as read", field="If-Match"
        )
    body, _ = validate(app[REQUEST_MODELS].projects.patch, await read_json_object(request))
    song: Song | None | bool = False
    if "audio_id" in body.model_fields_set:
        song = None
        if body.audio_id is not None:
            duration = await song_duration(app, body.audio_id, "audio_id", key_id(request))
            song = Song(audio_id=body.audio_id, duration=duration)
    if body.character_image_id is not None:
        await _check_image(app, body.character_image_id, key_id(request))
    audio_id = body.audio_id if "audio_id" in body.model_fields_set else current.song and current.song.audio_id
    analysis = (await project_song.load_analysis(app, audio_id, wait=0))[0] if audio_id else None  # if ready
    project = await update(
        app, project_id, lambda p, jobs: apply_patch(app[CONFIG], p, jobs, body, song, analysis), if_match
    )
    return _respond(project, await job_states(app, project))


@routes.post(BASE + "/{project_id}/write_scenes")
@idempotent
async def write(request: web.Request) -> web.Response:
    app = request.app
    project_id = (await owned_project(request)).id
    options, _ = validate(app[REQUEST_MODELS].projects.write_scenes, await read_json_object(request, optional=True))
    await reserve(request, options)
    await charge(request, "blocking")
    project = await write_project_scenes(request, project_id, options, request.headers.get("If-Match"))
    return _respond(project, await job_states(app, project))


@routes.post(BASE + "/{project_id}/character")
@idempotent
async def character(request: web.Request) -> web.Response:
    """Render the project's character (Imagen): ``number_of_images`` candidates (within the images settings), the
    first one the chosen reference image of its clips; all of them kept on the record until the next render."""
    app = request.app
    project = await owned_project(request)
    project_id = project.id
    options = action_options(await read_json_object(request, optional=True), CHARACTER_OPTIONS)
    params, defaulted = validate(
        app[REQUEST_MODELS].image, {"character_description": project.character_description, **options}
    )
    # Before If-Match: the retry of a request that went through (and moved the ETag) gets its answer, not a 412.
    await reserve(request, {name: getattr(params, name) for name in CHARACTER_OPTIONS})
    check_if_match(project, request.headers.get("If-Match"))
    await charge(request, "blocking")

    def abandoned() -> bool:
        return request.transport is None or request.transport.is_closing()

    image = await generate_reference(app, params.model_dump(), defaulted, abandoned, owner=project.owner)

    def pick(current: Project, _jobs: JobStates) -> None:
        current.character_image_id = image["image_id"]
        current.character_candidates = [
            CharacterCandidate(image_id=i["image_id"], mime_type=i["mime_type"], seed=i["seed"])
            for i in image["images"]
        ]

    project = await update(app, project_id, pick)
    image = {k: v for k, v in image.items() if k != "image_base64"}
    return _respond(project, await job_states(app, project), extra={"image": image})


@routes.post(BASE + "/{project_id}/clips")
@idempotent
async def generate_missing(request: web.Request) -> web.Response:
    """A clip job for every scene without a chosen clip and without one in progress."""
    project_id = (await owned_project(request)).id
    options = action_options(await read_json_object(request, optional=True), CLIP_OPTIONS)
    await reserve(request, normal_options(request.app[REQUEST_MODELS].video, options, CLIP_OPTIONS))
    project, jobs, started = await generate_clips(
        request.app,
        project_id,
        None,
        options,
        request.headers.get("If-Match"),
        owner=key_id(request),
        charge=lambda ids: charge(request, "jobs", job_ids=ids),
    )
    return accepted_response(request, started, project=project_view(project, jobs), many=True)


@routes.post(BASE + "/{project_id}/scenes/{scene_id}/clips")
@idempotent
async def generate_one(request: web.Request) -> web.Response:
    """A new clip version of one scene (a regeneration keeps the old versions)."""
    project_id = (await owned_project(request)).id
    scene_id = check_id(request.match_info["scene_id"], "scene_id")
    options = action_options(await read_json_object(request, optional=True), CLIP_OPTIONS)
    await reserve(request, normal_options(request.app[REQUEST_MODELS].video, options, CLIP_OPTIONS))
    project, jobs, started = await generate_clips(
        request.app,
        project_id,
        [scene_id],
        options,
        request.headers.get("If-Match"),
        owner=key_id(request),
        charge=lambda ids: charge(request, "jobs", job_ids=ids),
    )
    return accepted_response(request, started, project=project_view(project, jobs))


@routes.get(BASE + "/{project_id}/timeline")
async def timeline(request: web.Request) -> web.Response:
    """The scenes in display order with their chosen clip, trims and song window."""
    project, jobs = await load_settled(request.app, (await owned_project(request)).id)
    entries = [
        {
            "scene_id": e.scene.id,
            "job_id": e.job_id,
            "trim_in": e.trim_in,
            "trim_out": e.trim_out,
            "seconds": round(e.seconds, 6),
            "song_start": e.song_start,
            "status": jobs[e.job_id].status if e.job_id and jobs.get(e.job_id) else None,
            "video_url": f"/api/mv/get_video/{e.job_id}" if e.job_id else None,
        }
        for e in project_timeline(project)
    ]
    song = project.song
    song_view = {**song.model_dump(), "audio_url": f"/api/mv/get_audio/{song.audio_id}"} if song else None
    return web.json_response(
        {"project_id": project.id, "song": song_view, "entries": entries},
        headers={"ETag": etag(project), "Cache-Control": "no-store"},
    )
