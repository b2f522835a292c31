"""The assembly routes: ``POST /api/mv/assemble`` and a project's ``assemble``; the plan and the job driver are in
:mod:`mvserver.assembly.service`."""

from __future__ import annotations

import functools

from aiohttp import web

from mvserver.appkeys import ARTEFACTS, CONFIG, FFMPEG_SLOTS, HEAVY_FFMPEG_SLOTS, JOBS, REQUEST_MODELS, SONGS, STORE
from mvserver.assembly import service
from mvserver.assembly.service import AssemblyDeps, AssemblyDriver
from mvserver.audio.service import saved_audio
from mvserver.core.validation import validate
from mvserver.jobs.accepted import accepted_response
from mvserver.jobs.runner import DriverFactory
from mvserver.projects.routes import owned_project, project_deps
from mvserver.projects.service import project_view
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge
from mvserver.web.body import read_json_object


def assembly_deps(app: web.Application) -> AssemblyDeps:
    """Assembly's dependencies, from the app."""
    return AssemblyDeps(
        config=app[CONFIG],
        jobs=app[JOBS],
        outputs=app[STORE],
        artefacts=app[ARTEFACTS],
        songs=app[SONGS],
        probe_slots=app[FFMPEG_SLOTS],
        heavy_slots=app[HEAVY_FFMPEG_SLOTS],
        saved_audio=functools.partial(saved_audio, app),
    )


def assembly_kind(app: web.Application) -> DriverFactory:
    """The driver factory for ``assembly`` jobs."""
    return lambda job: AssemblyDriver(assembly_deps(app))


# -- handlers -------------------------------------------------------------------------------------------------------


@idempotent
async def assemble(request: web.Request) -> web.Response:
    body, _ = validate(request.app[REQUEST_MODELS].assemble, await read_json_object(request))
    await reserve(request, body)
    job = await service.assemble(assembly_deps(request.app), body, key_id(request), lambda: charge(request, "jobs"))
    return accepted_response(request, [job])


@idempotent
async def assemble_project(request: web.Request) -> web.Response:
    """The project's chosen clips in display order with their trims, and its song from its offset."""
    app = request.app
    project = await owned_project(request)  # 404 for an unknown id or another key's project
    options, _ = validate(app[REQUEST_MODELS].assembly_options, await read_json_object(request, optional=True))
    await reserve(request, options)
    job, project, jobs = await service.assemble_project(
        assembly_deps(app), project_deps(app), project, options, key_id(request), lambda: charge(request, "jobs")
    )
    return accepted_response(request, [job], project=project_view(project, jobs))
