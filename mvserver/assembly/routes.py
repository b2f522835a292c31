"""The assembly routes: ``POST /api/mv/assemble`` and a project's ``assemble``; the plan and the job driver are in
:mod:`mvserver.assembly.service`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mvserver.assembly.service import AssemblyDriver, plan, submit
from mvserver.core.config import CONFIG
from mvserver.core.errors import ApiError, validate
from mvserver.jobs.accepted import accepted_response
from mvserver.openapi.schemas import REQUEST_MODELS, read_json_object
from mvserver.projects.routes import owned_project
from mvserver.projects.service import (
    BASE,
    chosen_clip,
    job_states,
    load_settled,
    project_timeline,
    project_view,
    update,
)
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge

routes = web.RouteTableDef()


def assembly_kind(app: web.Application):  # type: ignore[no-untyped-def]
    """The driver factory for ``assembly`` jobs."""
    return lambda job: AssemblyDriver(app)


# -- handlers -------------------------------------------------------------------------------------------------------


@routes.post("/api/mv/assemble")
@idempotent
async def assemble(request: web.Request) -> web.Response:
    app = request.app
    body, _ = validate(app[REQUEST_MODELS].assemble, await read_json_object(request))
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
    options, _ = validate(app[REQUEST_MODELS].assembly_options, await read_json_object(request, optional=True))
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
        chosen_clip(entry, jobs, f"scenes.{index}")

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
