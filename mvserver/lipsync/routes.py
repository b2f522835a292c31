"""The lip-sync routes: ``POST /api/mv/lipsync`` and a project scene's ``lipsync``; the checks and the cut are in
:mod:`mvserver.lipsync.service`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mvserver.appkeys import CONFIG, LIPSYNC_DEPS, PROJECT_DEPS, REQUEST_MODELS
from mvserver.core.artefacts import check_id
from mvserver.core.errors import ApiError
from mvserver.jobs.accepted import accepted_response
from mvserver.lipsync.service import submit_lipsync, submit_scene_lipsync
from mvserver.projects.schemas import SCENE_LIPSYNC_OPTIONS
from mvserver.projects.service import action_options, load, normal_options, project_view
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge
from mvserver.web.body import parse_body, read_json_object

# -- the handler ------------------------------------------------------------------------------------------------------


@idempotent
async def create_lipsync(request: web.Request) -> web.Response:
    app = request.app
    config = app[CONFIG]
    body: Any  # a model made from the settings at run time
    body, defaulted = await parse_body(request, app[REQUEST_MODELS].lipsync, config.debug)
    if body.scene_id is not None and body.project_id is None:
        raise ApiError(400, "invalid_field", "scene_id: needs project_id", field="scene_id")
    await reserve(request, body)
    job = await submit_lipsync(
        app[LIPSYNC_DEPS], body, defaulted, key_id(request), charge=lambda: charge(request, "jobs")
    )
    return accepted_response(request, [job])


@idempotent
async def lipsync_scene(request: web.Request) -> web.Response:
    """Lip-sync the scene's chosen clip to its slice of the project's song; the result becomes a new version of the
    scene's clip (chosen once it succeeds, like a regeneration)."""
    projects = request.app[PROJECT_DEPS]
    # The projects service, not their routes: 404 for an unknown id or another key's project.
    project = await load(projects, request.match_info["project_id"], key_id(request))
    scene_id = check_id(request.match_info["scene_id"], "scene_id")
    options = action_options(await read_json_object(request, optional=True), SCENE_LIPSYNC_OPTIONS)
    await reserve(request, normal_options(projects.models.lipsync, options, SCENE_LIPSYNC_OPTIONS))
    job, project, jobs = await submit_scene_lipsync(
        request.app[LIPSYNC_DEPS],
        projects,
        project,
        scene_id,
        options,
        key_id(request),
        charge=lambda: charge(request, "jobs"),
    )
    return accepted_response(request, [job], project=project_view(project, jobs))
