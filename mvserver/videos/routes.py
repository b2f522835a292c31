"""``POST /api/mv/generate_video``: a video job from a prompt, an optional reference image and the client's rules
(the job API, for jobs of every kind, is in :mod:`mvserver.jobs.routes`)."""

from __future__ import annotations

from aiohttp import web

from mvserver.appkeys import CONFIG, REQUEST_MODELS
from mvserver.jobs.accepted import accepted_response
from mvserver.videos.service import submit_video_job
from mvserver.web.access.auth import key_id
from mvserver.web.access.idempotency import idempotent, reserve
from mvserver.web.access.quotas import charge
from mvserver.web.body import parse_body


@idempotent
async def generate_video(request: web.Request) -> web.Response:
    body, defaulted = await parse_body(request, request.app[REQUEST_MODELS].video, request.app[CONFIG].debug)
    await reserve(request, body)
    job = await submit_video_job(
        request.app, body, defaulted, owner=key_id(request), charge=lambda: charge(request, "jobs")
    )
    return accepted_response(request, [job])
