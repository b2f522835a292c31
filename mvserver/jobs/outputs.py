"""A job's stored output (its video, its poster) as a route serves it, with the job's access rules."""

from __future__ import annotations

from aiohttp import web

from mvserver.appkeys import ARTEFACTS, JOBS
from mvserver.core.artefacts import artefact_key, check_id
from mvserver.core.errors import ApiError
from mvserver.web.access.auth import key_id, require_owner


async def not_expired(request: web.Request, job_id: str) -> None:
    """410 for a job that finished long ago and was removed (``jobs.retention_hours``)."""
    if await request.app[JOBS].expired(job_id):
        raise ApiError(410, "expired", f"job {job_id} finished long ago and was removed (jobs.retention_hours)")


async def job_output(request: web.Request, suffix: str, what: str) -> str:
    """The artefact ``videos/<video_id><suffix>`` of the route's succeeded job, with the video's access rules:
    another key's job is unknown (404), an unfinished or unsuccessful one 409, an expired one 410, a missing file
    404."""
    video_id = check_id(request.match_info["video_id"], "video_id")
    key = artefact_key("videos", video_id, suffix)
    job = await request.app[JOBS].get(video_id)
    if job is not None:
        require_owner(job.owner, key_id(request), ApiError(404, "not_found", f"no {what} with id {video_id}"))
    if job is not None and job.status != "succeeded":
        code = {"failed": "job_failed", "canceled": "job_canceled"}.get(job.status, "video_not_ready")
        cause = job.error or {}
        message = f"job {video_id} is {job.status}" + (f": {cause['message']}" if cause else f" ({job.stage})")
        raise ApiError(
            409,
            code,
            message,
            provider=cause.get("provider"),
            provider_status=cause.get("provider_status"),
            provider_error=cause.get("provider_error"),
        )
    if await request.app[ARTEFACTS].stat(key) is None:
        await not_expired(request, video_id)
        raise ApiError(404, "not_found", f"no {what} with id {video_id}")
    return key
