"""The one answer of every request that starts jobs: ``202`` with the started jobs in one envelope.

Every job-starting route (``generate_video``, ``lipsync``, ``assemble`` and a project's ``clips``,
``scenes/{id}/clips``, ``scenes/{id}/lipsync`` and ``assemble``) answers through :func:`accepted_response`, so a
client reads them all the same way:

- ``jobs``: every job the request started (a project's ``clips`` may start none), each an *accepted job*:
  ``job_id``, ``kind``, ``status``, ``backend``, ``sandbox``, ``status_url``, ``events_url``, ``video_url``,
  ``project_id``/``scene_id`` for a project's job, and ``signed_urls`` when keys are on (added on the way out by
  the links middleware, :func:`signing.sign_links`, like every other answer's links);
- ``job``: the job, when the route starts exactly one; its fields are also repeated at the top level, as the
  single-job routes always answered (older clients read ``job_id`` there);
- ``project``: the project as ``GET /api/mv/projects/{id}`` shows it, on a project's routes (with its ``ETag``).

With ``MV_PUBLIC_BASE_URL`` set, every URL in the jobs (and ``Location``) is absolute on that base, so a client
behind another origin or a native app can use them as they are.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mvserver.appkeys import CONFIG
from mvserver.jobs import Job, job_urls

URL_FIELDS = ("status_url", "events_url", "video_url")
LINK_FIELDS = ("project_id", "scene_id")


def absolute(app: web.Application, path: str) -> str:
    """``path`` on ``MV_PUBLIC_BASE_URL`` when it is set (the server's public address), else unchanged."""
    base = app[CONFIG].env.public_base_url
    return f"{base}{path}" if base and path.startswith("/") else path


def accepted_job(request: web.Request, job: Job) -> dict[str, Any]:
    """One started job as every 202 lists it (absolute URLs when configured; their signed twins come from the links
    middleware)."""
    app = request.app
    urls = job_urls(job.id)
    entry: dict[str, Any] = {
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "backend": job.backend,
        "sandbox": job.sandbox,
        **{name: absolute(app, urls[name]) for name in URL_FIELDS},
    }
    entry.update({name: job.request[name] for name in LINK_FIELDS if isinstance(job.request.get(name), str)})
    return entry


def accepted_response(
    request: web.Request, jobs: list[Job], *, project: dict[str, Any] | None = None, many: bool = False
) -> web.Response:
    """The 202 of a request that started ``jobs``. ``many``: the route may start any number (no ``job``, no
    top-level job fields, no ``Location``); otherwise it started exactly one. ``project``: the project view."""
    entries = [accepted_job(request, job) for job in jobs]
    body: dict[str, Any] = {}
    headers = {"Cache-Control": "no-store"}
    if not many:
        (entry,) = entries
        body.update(entry)
        body["job"] = entry
        headers["Location"] = entry["status_url"]
    body["jobs"] = entries
    if project is not None:
        body["project"] = project
        headers["ETag"] = project["etag"]
    return web.json_response(body, status=202, headers=headers)
