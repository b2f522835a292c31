"""``GET /api/mv/projects/{project_id}/events``: one Server-Sent Events stream that keeps a page's project current.

It carries, in order:

- ``project``: the project as ``GET /api/mv/projects/{id}`` shows it (with its ``etag``), first when the stream
  opens and again after every write, whoever made it (another tab, another node);
- ``version_added`` ``{project_id, scene_id, job_id, kind, etag}``: a clip version that was not in the previous
  ``project`` event (sent right after it);
- ``version_chosen`` ``{project_id, scene_id, job_id, previous_job_id, etag}``: a scene's chosen clip changed,
  by a write or because its awaited version succeeded (which changes no ``ETag``: see :mod:`mvserver.projects.service`);
- the events of the project's unfinished jobs (clip versions and the assembly job), exactly as on the job streams
  (``queued``, ``running``, ``progress``, ``succeeded``, ``failed``, ``canceled``; ``data.job_id`` says whose).

The event id is the project's version and the position of every job still followed (``7.736726c7-11.0e546bf8-3``:
the first 8 hex digits of each job id and its last event sent). A reconnect with ``Last-Event-ID`` (or a new
stream with ``?after=<id>``) resumes each job where it stood while the project is at that version; if the project
moved meanwhile (or the id is unreadable) the stream starts with a fresh ``project`` event and follows the jobs
from the state it shows. It never ends by itself: it stays open until the client goes or the server stops, with a
ping comment every ``jobs.sse_ping_interval_seconds``. Writes reach the stream through the project store's change
notifications (on Redis, a channel every node listens to), job events through the job store, as on the job streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from mvserver.appkeys import CONFIG, JOBS, PROJECT_DEPS, PROJECTS, SIGNER
from mvserver.core.errors import ApiError
from mvserver.jobs import Job
from mvserver.projects.routes import owned_project
from mvserver.projects.service import BASE, JobStates, etag, job_states, load, project_view
from mvserver.projects.store import Project
from mvserver.web.access.auth import key_id
from mvserver.web.access.signing import sign_links, signed_event_data

log = logging.getLogger("mvserver")
PREFIX_CHARS = 8
MAX_RESUME_JOBS = 1000
CURSOR = re.compile(rf"[0-9]{{1,9}}(\.[0-9a-f]{{{PREFIX_CHARS}}}-[0-9]{{1,9}}){{0,{MAX_RESUME_JOBS}}}")


def project_jobs(project: Project) -> dict[str, str | None]:
    """Every job of the project: its clip versions (job id -> scene id) and its assembly job (-> None)."""
    jobs: dict[str, str | None] = {v.job_id: scene.id for scene in project.scenes for v in scene.versions}
    if project.assembly_job_id:
        jobs.setdefault(project.assembly_job_id, None)
    return jobs


def chosen(
    project: Project, jobs: JobStates, pending: frozenset[str] | set[str] = frozenset()
) -> dict[str, str | None]:
    """Each scene's chosen clip as a client has seen it: the record's choice, or its awaited version once that
    succeeded, unless the client has not yet been told that it finished (``pending``)."""
    result = {}
    for scene in project.scenes:
        awaited = jobs.get(scene.awaited_job_id) if scene.awaited_job_id else None
        succeeded = awaited is not None and awaited.status == "succeeded" and awaited.id not in pending
        result[scene.id] = awaited.id if succeeded and awaited is not None else scene.chosen_job_id
    return result


def parse_cursor(raw: str | None) -> tuple[int, dict[str, int]] | None:
    """``(version, {job id prefix: position})`` from an event id of this stream, or None."""
    if not raw or not CURSOR.fullmatch(raw):
        return None
    version, *parts = raw.split(".")
    positions = {}
    for part in parts:
        prefix, _, position = part.partition("-")
        if prefix in positions:
            return None
        positions[prefix] = int(position)
    return int(version), positions


class ProjectStream:
    """What one stream has told its client: the project version, the chosen clips, the jobs it knows of and the
    position of every job it still follows."""

    def __init__(
        self,
        app: web.Application,
        response: EventSourceResponse,
        project_id: str,
        retry_ms: int,
        caller: str | None = None,
    ):
        self.app = app
        self.caller = caller  # the subscriber's key: every link sent is signed for it (keys on)
        self.engine = app[JOBS]
        self.projects = app[PROJECT_DEPS]
        self.response = response
        self.project_id = project_id
        self.retry: int | None = retry_ms
        self.project: Project | None = None
        self.version = 0
        self.followed: dict[str, int] = {}
        self.shown: dict[str, str | None] = {}
        self.known: set[str] = set()

    def event_id(self) -> str:
        return ".".join(
            [
                str(self.version),
                *(f"{job_id[:PREFIX_CHARS]}-{position}" for job_id, position in sorted(self.followed.items())),
            ]
        )

    async def send(self, data: str, name: str) -> None:
        await self.response.send(data, id=self.event_id(), event=name, retry=self.retry)
        self.retry = None

    async def send_json(self, data: dict[str, Any], name: str) -> None:
        sign_links(self.app, self.caller, data)  # the project view's links, as its GET answers them
        await self.send(json.dumps(data, separators=(",", ":")), name)

    # -- the project ------------------------------------------------------------------------------------------

    async def open(self, cursor: tuple[int, dict[str, int]] | None) -> None:
        """Resume from ``cursor`` when the project is still at its version, else send the project as it is."""
        project = await load(self.projects, self.project_id)
        jobs = await job_states(self.projects, project)
        if cursor is not None and cursor[0] == project.version and self._resume(project, jobs, cursor[1]):
            return
        await self.show(project, jobs, first=True)

    def _resume(self, project: Project, jobs: JobStates, positions: dict[str, int]) -> bool:
        by_prefix: dict[str, list[str]] = {}
        for job_id in project_jobs(project):
            by_prefix.setdefault(job_id[:PREFIX_CHARS], []).append(job_id)
        if any(len(by_prefix.get(prefix, ())) != 1 for prefix in positions):
            return False  # a job the project does not hold (or two it cannot tell apart): start over
        self.project, self.version = project, project.version
        self.followed = {by_prefix[prefix][0]: position for prefix, position in positions.items()}
        self.known = set(project_jobs(project))
        self.shown = chosen(project, jobs, set(self.followed))
        return True

    async def reread(self) -> None:
        """After a change notification: show the project again if its version moved."""
        project = await load(self.projects, self.project_id)
        if project.version != self.version:
            await self.show(project, await job_states(self.projects, project))

    async def show(self, project: Project, jobs: JobStates, first: bool = False) -> None:
        """Send ``project``, then what changed since the last one; follow its unfinished jobs from the state shown
        (the view supersedes their older events)."""
        view = project_view(project, jobs)
        self.project, self.version = project, project.version
        self.followed = {
            job_id: job.last_event_id
            for job_id in project_jobs(project)
            if (job := jobs.get(job_id)) is not None and not job.final
        }
        await self.send_json(view, "project")
        members = project_jobs(project)
        tag = etag(project)
        for job_id, scene_id in members.items():
            if not first and job_id not in self.known and scene_id is not None:
                job = jobs.get(job_id)
                await self.send_json(
                    {
                        "project_id": project.id,
                        "scene_id": scene_id,
                        "job_id": job_id,
                        "kind": job.kind if job else None,
                        "etag": tag,
                    },
                    "version_added",
                )
        now = chosen(project, jobs)
        if not first:
            for scene_id, chosen_id in now.items():
                if scene_id in self.shown and self.shown[scene_id] != chosen_id:
                    await self._chosen(scene_id, chosen_id)
        self.known, self.shown = set(members), now

    async def _chosen(self, scene_id: str, job_id: str | None) -> None:
        assert self.project is not None
        await self.send_json(
            {
                "project_id": self.project.id,
                "scene_id": scene_id,
                "job_id": job_id,
                "previous_job_id": self.shown.get(scene_id),
                "etag": etag(self.project),
            },
            "version_chosen",
        )
        self.shown[scene_id] = job_id

    # -- the jobs ---------------------------------------------------------------------------------------------

    async def pump(self) -> None:
        """Send every followed job's new events; a job's final event ends following it."""
        for job_id in sorted(self.followed):
            for event in await self.engine.events(job_id, self.followed[job_id]):
                if event.final:
                    del self.followed[job_id]
                else:
                    self.followed[job_id] = event.id
                await self.send(signed_event_data(self.app, self.caller, event.data, event.data_json), event.event)
                if event.final:
                    if event.event == "succeeded":
                        await self._settled(job_id)
                    break

    async def _settled(self, job_id: str) -> None:
        """An awaited version succeeded: it is the scene's chosen clip now (until a write says otherwise)."""
        assert self.project is not None
        scene = next((s for s in self.project.scenes if s.awaited_job_id == job_id), None)
        if scene is not None and self.shown.get(scene.id) != job_id:
            await self._chosen(scene.id, job_id)

    async def waiters(self) -> set[asyncio.Future[None]]:
        """A future per followed job; a job the job store no longer has news of (gone, or already told to the
        end) is dropped here."""
        futures = set()
        for job_id, position in list(self.followed.items()):
            future = self.engine.next_event(job_id, position)
            if future.done():
                job: Job | None = await self.engine.get(job_id)
                if job is None or (job.final and position >= job.last_event_id):
                    del self.followed[job_id]
                    continue
            futures.add(future)
        return futures


async def stream_project(
    request: web.Request, project_id: str, *, ping_interval: float, retry_ms: int, after: str | None = None
) -> web.StreamResponse:
    """Serve one project's stream until the client goes or the server stops."""
    app = request.app
    engine, store = app[JOBS], app[PROJECTS]
    async with sse_response(request, ping_interval=ping_interval) as response:
        gone = asyncio.ensure_future(response.wait())  # done when a ping finds the client gone
        assert engine.closing is not None
        stream = ProjectStream(app, response, project_id, retry_ms, key_id(request))
        engine.hooks.subscribers(1)
        try:
            change = store.changed(project_id)  # taken before the first read: no write is missed
            await stream.open(parse_cursor(response.last_event_id or after))
            while not engine.closing.done():
                if change.done():
                    change = store.changed(project_id)
                    await stream.reread()
                await stream.pump()
                await asyncio.wait(
                    {*await stream.waiters(), change, gone, engine.closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if gone.done():
                    break
        except (ConnectionResetError, RuntimeError):
            pass  # the client disconnected during a write
        except ApiError as exc:  # a store that did not answer: the client reconnects and resumes
            log.warning("project %s event stream ended: %s", project_id, exc.info.message)
        finally:
            engine.hooks.subscribers(-1)
            gone.cancel()
    return response


async def project_events(request: web.Request) -> web.StreamResponse:
    project = await owned_project(request)  # 404 for an unknown id or another key's project
    after = request.query.get("after")
    if after is not None and not CURSOR.fullmatch(after):
        raise ApiError(400, "invalid_field", "after: an event id of this stream", field="after")
    settings = request.app[CONFIG].videos.jobs
    return await stream_project(
        request,
        project.id,
        ping_interval=settings.sse_ping_interval_seconds,
        retry_ms=settings.sse_retry_ms,
        after=after,
    )


async def project_events_link(request: web.Request) -> web.Response:
    """The stream's URL for an ``EventSource`` (and ``after``, to resume): with keys on signed for the caller's key
    (the signature covers ``after``) and valid until ``expires_at``; with keys off the plain URL."""
    project = await owned_project(request)
    url = f"{BASE}/{project.id}/events"
    after = request.query.get("after")
    if after is not None:
        if not CURSOR.fullmatch(after):
            raise ApiError(400, "invalid_field", "after: an event id of this stream", field="after")
        url += f"?after={after}"
    expires_at = None
    signer, caller = request.app.get(SIGNER), key_id(request)
    if signer is not None and caller is not None:
        url, expires = signer.sign(caller, url)
        expires_at = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
    return web.json_response({"events_url": url, "expires_at": expires_at}, headers={"Cache-Control": "no-store"})
