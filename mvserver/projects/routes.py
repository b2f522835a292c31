"""The project routes (``/api/mv/projects``): each parses the request, charges the caller, calls the project
service (:mod:`mvserver.projects.service`) and answers with the project as clients see it and its ``ETag``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mvserver.appkeys import PROJECT_DEPS
from mvserver.core.artefacts import check_id
from mvserver.core.errors import ApiError
from mvserver.core.validation import validate
from mvserver.jobs.accepted import accepted_response
from mvserver.projects.schemas import CHARACTER_OPTIONS, CLIP_OPTIONS
from mvserver.projects.service import (
    BASE,
    JobStates,
    action_options,
    check_if_match,
    create_project,
    etag,
    generate_clips,
    job_states,
    load,
    normal_options,
    patch_project,
    project_view,
    render_character,
    settled,
    timeline_view,
    write_project_scenes,
)
from mvserver.projects.store import Project
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge
from mvserver.web.body import read_json_object


async def owned_project(request: web.Request) -> Project:
    """The project of the route's ``{project_id}`` if the caller may see it (404 otherwise, as for an unknown id).
    Every project route calls it first; a project's owner never changes, so later reads need no second check."""
    return await load(request.app[PROJECT_DEPS], _project_id(request), key_id(request))


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


@idempotent
async def create(request: web.Request) -> web.Response:
    deps = request.app[PROJECT_DEPS]
    body, _ = validate(deps.models.projects.create, await read_json_object(request))
    await reserve(request, body)
    project = await create_project(deps, body, owner=key_id(request))
    return _respond(project, {}, 201, headers={"Location": f"{BASE}/{project.id}"})


async def get(request: web.Request) -> web.Response:
    project = await owned_project(request)
    return _respond(project, await job_states(request.app[PROJECT_DEPS], project))


async def patch(request: web.Request) -> web.Response:
    deps = request.app[PROJECT_DEPS]
    current = await owned_project(request)
    if_match = request.headers.get("If-Match")
    if if_match is None:
        raise ApiError(
            428, "precondition_required", "PATCH needs If-Match with the ETag of the project as read", field="If-Match"
        )
    body, _ = validate(deps.models.projects.patch, await read_json_object(request))
    project = await patch_project(deps, current, body, if_match, key_id(request))
    return _respond(project, await job_states(deps, project))


@idempotent
async def write(request: web.Request) -> web.Response:
    deps = request.app[PROJECT_DEPS]
    project_id = (await owned_project(request)).id
    options, _ = validate(deps.models.projects.write_scenes, await read_json_object(request, optional=True))
    await reserve(request, options)
    await charge(request, "blocking")
    if_match = request.headers.get("If-Match")
    project = await write_project_scenes(deps, project_id, options, if_match, owner=key_id(request))
    return _respond(project, await job_states(deps, project))


@idempotent
async def character(request: web.Request) -> web.Response:
    """Render the project's character (Imagen): ``number_of_images`` candidates (within the images settings), the
    first one the chosen reference image of its clips; all of them kept on the record until the next render."""
    deps = request.app[PROJECT_DEPS]
    project = await owned_project(request)
    options = action_options(await read_json_object(request, optional=True), CHARACTER_OPTIONS)
    params, defaulted = validate(deps.models.image, {"character_description": project.character_description, **options})
    # Before If-Match: the retry of a request that went through (and moved the ETag) gets its answer, not a 412.
    await reserve(request, {name: getattr(params, name) for name in CHARACTER_OPTIONS})
    check_if_match(project, request.headers.get("If-Match"))
    await charge(request, "blocking")

    def abandoned() -> bool:
        return request.transport is None or request.transport.is_closing()

    project, image = await render_character(deps, project, params, defaulted, abandoned)
    return _respond(project, await job_states(deps, project), extra={"image": image})


@idempotent
async def generate_missing(request: web.Request) -> web.Response:
    """A clip job for every scene without a chosen clip and without one in progress."""
    deps = request.app[PROJECT_DEPS]
    project_id = (await owned_project(request)).id
    options = action_options(await read_json_object(request, optional=True), CLIP_OPTIONS)
    await reserve(request, normal_options(deps.models.video, options, CLIP_OPTIONS))
    project, jobs, started = await generate_clips(
        deps,
        project_id,
        None,
        options,
        request.headers.get("If-Match"),
        owner=key_id(request),
        charge=lambda ids: charge(request, "jobs", job_ids=ids),
    )
    return accepted_response(request, started, project=project_view(project, jobs), many=True)


@idempotent
async def generate_one(request: web.Request) -> web.Response:
    """A new clip version of one scene (a regeneration keeps the old versions)."""
    deps = request.app[PROJECT_DEPS]
    project_id = (await owned_project(request)).id
    scene_id = check_id(request.match_info["scene_id"], "scene_id")
    options = action_options(await read_json_object(request, optional=True), CLIP_OPTIONS)
    await reserve(request, normal_options(deps.models.video, options, CLIP_OPTIONS))
    project, jobs, started = await generate_clips(
        deps,
        project_id,
        [scene_id],
        options,
        request.headers.get("If-Match"),
        owner=key_id(request),
        charge=lambda ids: charge(request, "jobs", job_ids=ids),
    )
    return accepted_response(request, started, project=project_view(project, jobs))


async def timeline(request: web.Request) -> web.Response:
    """The scenes in display order with their chosen clip, trims and song window."""
    project, jobs = await settled(request.app[PROJECT_DEPS], await owned_project(request))
    return web.json_response(timeline_view(project, jobs), headers={"ETag": etag(project), "Cache-Control": "no-store"})
