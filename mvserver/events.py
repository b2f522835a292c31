"""``GET /api/mv/events?jobs=<id>,<id>,…``: many jobs' events on one Server-Sent Events connection."""

from __future__ import annotations

from aiohttp import web

from .auth import key_id, visible_to
from .config import CONFIG
from .errors import ApiError
from .jobs import JOBS
from .jobs.stream import stream_many
from .storage import check_id

routes = web.RouteTableDef()


@routes.get("/api/mv/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    settings = request.app[CONFIG].videos.jobs
    job_ids = await _job_ids(request, settings.sse_max_jobs_per_stream)
    return await stream_many(request, request.app[JOBS], job_ids, ping_interval=settings.sse_ping_interval_seconds,
                             retry_ms=settings.sse_retry_ms, after=request.query.get("after"))


async def _job_ids(request: web.Request, limit: int) -> list[str]:
    """The ``jobs`` parameter: 1..limit distinct, existing job ids the caller may see, comma-separated, in the order given."""
    raw = request.query.get("jobs", "")
    parts = [part for part in raw.split(",") if part] if raw else []
    if not parts:
        raise ApiError(400, "missing_field", "jobs is required: a comma-separated list of job ids", field="jobs")
    if len(parts) > limit:
        raise ApiError(400, "invalid_field", f"jobs: at most {limit} job ids per stream", field="jobs")
    if len(set(parts)) != len(parts):
        raise ApiError(400, "invalid_field", "jobs: a job id is listed twice", field="jobs")
    engine = request.app[JOBS]
    caller = key_id(request)
    for job_id in parts:
        check_id(job_id, "jobs")
        job = await engine.get(job_id)
        if job is None or not visible_to(job.owner, caller):
            raise ApiError(404, "not_found", f"no job with id {job_id}", field="jobs")
    return parts
