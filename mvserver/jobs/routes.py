"""The jobs API, for jobs of every kind: list, status, cancel, the event stream of one job, and a finished video."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from mvserver.appkeys import ARTEFACTS, CONFIG, JOBS
from mvserver.core.artefacts import check_id
from mvserver.core.errors import ApiError
from mvserver.jobs import Job, job_urls, listing, stream_events
from mvserver.jobs.model import STATUSES, Event
from mvserver.jobs.outputs import job_output, not_expired
from mvserver.web.access.auth import key_id, visible_to
from mvserver.web.access.signing import signed_event_data


def listing_query(request: web.Request, owner: str | None, kinds: set[str]) -> listing.JobQuery:
    """``status``, ``kind``, ``project_id``, ``cursor`` and ``limit`` (1..100, default 20) from the query string."""
    params = request.query
    status, kind = params.get("status"), params.get("kind")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid_field", f"status: one of {', '.join(STATUSES)}", field="status")
    if kind is not None and kind not in kinds:
        raise ApiError(400, "invalid_field", f"kind: one of {', '.join(sorted(kinds))}", field="kind")
    project_id = params.get("project_id")
    if project_id is not None:
        check_id(project_id, "project_id")
    cursor = params.get("cursor")
    if cursor is not None and not listing.CURSOR.fullmatch(cursor):
        raise ApiError(400, "invalid_field", "cursor: pass back a next_cursor value unchanged", field="cursor")
    raw_limit = params.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= listing.MAX_LIMIT):
        raise ApiError(400, "invalid_field", f"limit: an integer from 1 to {listing.MAX_LIMIT}", field="limit")
    return listing.JobQuery(
        owner=owner, status=status, kind=kind, project_id=project_id, cursor=cursor, limit=int(raw_limit)
    )


def listing_item(job: Job) -> dict[str, Any]:
    """A job as listed: its state (never the request, which can be large) and where to follow it."""
    links = {name: job.request[name] for name in ("project_id", "scene_id") if isinstance(job.request.get(name), str)}
    return {
        **job.state(),
        "status_url": job_urls(job.id)["status_url"],
        "events_url": job_urls(job.id)["events_url"],
        **links,
    }


async def _job(request: web.Request) -> Job:
    job_id = check_id(request.match_info["job_id"], "job_id")
    job = await request.app[JOBS].get(job_id)
    if job is None:
        await not_expired(request, job_id)
    if job is None or not visible_to(job.owner, key_id(request)):
        raise ApiError(404, "not_found", f"no job with id {job_id}")
    return job


async def list_jobs(request: web.Request) -> web.Response:
    """The caller's jobs, newest first; ``next_cursor`` (when not null) fetches the next, older page."""
    query = listing_query(request, key_id(request), set(request.app[JOBS].kinds))
    page = await listing.list_jobs(request.app[JOBS].store, query)
    items = [listing_item(job) for job in page.jobs]
    return web.json_response({"jobs": items, "next_cursor": page.next_cursor})


async def job_status(request: web.Request) -> web.Response:
    return web.json_response((await _job(request)).public())


async def cancel_job(request: web.Request) -> web.Response:
    job = await request.app[JOBS].cancel((await _job(request)).id)
    assert job is not None
    return web.json_response(job.public())


async def job_events(request: web.Request) -> web.StreamResponse:
    jobs = request.app[JOBS]
    settings = request.app[CONFIG].videos.jobs
    return await stream_events(
        request,
        jobs,
        (await _job(request)).id,
        ping_interval=settings.sse_ping_interval_seconds,
        retry_ms=settings.sse_retry_ms,
        dress=event_links(request),
    )


def event_links(request: web.Request) -> Callable[[Event], str]:
    """How a subscriber gets each event: with the signed twin of every link in it (a ``succeeded`` event's
    ``video_url``) when keys are on, made for its key (:func:`signing.signed_event_data`)."""
    caller = key_id(request)
    return lambda event: signed_event_data(request.app, caller, event.data, event.data_json)


async def get_video(request: web.Request) -> web.StreamResponse:
    key = await job_output(request, ".mp4", "video")
    return await request.app[ARTEFACTS].response(
        key, noun="video", headers={"Content-Type": "video/mp4", "Cache-Control": "private, max-age=3600"}
    )
