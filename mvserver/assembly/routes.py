"""The assembly routes: ``POST /api/mv/assemble`` and a project's ``assemble``; the plan and the job driver are in
:mod:`mvserver.assembly.service`."""

from __future__ import annotations

from aiohttp import web

from mvserver.appkeys import ASSEMBLY_DEPS, PROJECT_DEPS, REQUEST_MODELS
from mvserver.assembly import service
from mvserver.core.validation import validate
from mvserver.jobs.accepted import accepted_response
from mvserver.projects.service import load, project_view
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge
from mvserver.web.body import read_json_object

# -- handlers -------------------------------------------------------------------------------------------------------


@idempotent
async def assemble(request: web.Request) -> web.Response:
    body, _ = validate(request.app[REQUEST_MODELS].assemble, await read_json_object(request))
    await reserve(request, body)
    job = await service.assemble(request.app[ASSEMBLY_DEPS], body, key_id(request), lambda: charge(request, "jobs"))
    return accepted_response(request, [job])


@idempotent
async def assemble_project(request: web.Request) -> web.Response:
    """The project's chosen clips in display order with their trims, and its song from its offset."""
    app = request.app
    # The projects service, not their routes: 404 for an unknown id or another key's project.
    project = await load(app[PROJECT_DEPS], request.match_info["project_id"], key_id(request))
    options, _ = validate(app[REQUEST_MODELS].assembly_options, await read_json_object(request, optional=True))
    await reserve(request, options)
    job, project, jobs = await service.assemble_project(
        app[ASSEMBLY_DEPS], app[PROJECT_DEPS], project, options, key_id(request), lambda: charge(request, "jobs")
    )
    return accepted_response(request, [job], project=project_view(project, jobs))
