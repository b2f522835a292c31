"""``GET /api/mv/events?jobs=<id>,<id>,…``: many jobs' events on one Server-Sent Events connection, and
``GET /api/mv/events/link?jobs=…``: the URL a browser's ``EventSource`` opens for it (signed when keys are on, since
an ``EventSource`` cannot send the key)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from aiohttp import web

from mvserver.appkeys import CONFIG, JOBS, SIGNER
from mvserver.core.artefacts import check_id
from mvserver.core.errors import ApiError
from mvserver.jobs.routes import event_links
from mvserver.jobs.stream import stream_many
from mvserver.web.access.auth import key_id, visible_to

EVENTS_PATH = "/api/mv/events"
AFTER = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,499}")


async def job_events(request: web.Request) -> web.StreamResponse:
    settings = request.app[CONFIG].videos.jobs
    job_ids = await _job_ids(request, settings.sse_max_jobs_per_stream)
    return await stream_many(
        request,
        request.app[JOBS],
        job_ids,
        ping_interval=settings.sse_ping_interval_seconds,
        retry_ms=settings.sse_retry_ms,
        after=request.query.get("after"),
        dress=event_links(request),
    )


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


async def events_link(request: web.Request) -> web.Response:
    """The multi-job stream's URL for these jobs (and ``after`` positions): with keys on, signed for the caller's key
    (the signature covers the exact job list, so it cannot be widened to other jobs) and valid until ``expires_at``;
    with keys off, the plain URL."""
    job_ids = await _job_ids(request, request.app[CONFIG].videos.jobs.sse_max_jobs_per_stream)
    query = f"jobs={','.join(job_ids)}"
    after = request.query.get("after")
    if after is not None:
        if not AFTER.fullmatch(after) or after.count(".") + 1 != len(job_ids):
            raise ApiError(
                400, "invalid_field", "after: one position per job, dot-separated (as in an event id)", field="after"
            )
        query += f"&after={after}"
    url, expires_at = f"{EVENTS_PATH}?{query}", None
    signer, caller = request.app.get(SIGNER), key_id(request)
    if signer is not None and caller is not None:
        url, expires = signer.sign(caller, url)
        expires_at = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
    return web.json_response(
        {"events_url": url, "expires_at": expires_at, "jobs": job_ids}, headers={"Cache-Control": "no-store"}
    )
