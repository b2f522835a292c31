"""Server-Sent Events for a job: the history after ``Last-Event-ID``, then live events, then close."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp_sse import sse_response

from mvserver.jobs.model import Event
from mvserver.jobs.runner import JobEngine

Dress = Callable[[Event], str]  # an event's data as this subscriber gets it (e.g. with its signed links)


def _stored(event: Event) -> str:
    return event.data_json


async def stream_events(
    request: web.Request, engine: JobEngine, job_id: str, *, ping_interval: float, retry_ms: int, dress: Dress = _stored
) -> web.StreamResponse:
    """Serve one job's events; the stream ends after the final event, when the client goes, or at shutdown."""
    async with sse_response(request, ping_interval=ping_interval) as response:
        after = last_event_id(response.last_event_id)
        gone = asyncio.ensure_future(response.wait())  # done when a ping finds the client gone
        assert engine.closing is not None
        retry: int | None = retry_ms
        engine.hooks.subscribers(1)
        try:
            while not engine.closing.done():
                events = await engine.events(job_id, after)
                for event in events:
                    await response.send(dress(event), id=str(event.id), event=event.event, retry=retry)
                    after, retry = event.id, None
                    if event.final:
                        return response
                if not events:
                    job = await engine.get(job_id)
                    if job is None or (job.final and after >= job.last_event_id):
                        return response
                await asyncio.wait(
                    {engine.next_event(job_id, after), gone, engine.closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if gone.done():
                    break
        except (ConnectionResetError, RuntimeError):
            pass  # the client disconnected during a write
        finally:
            engine.hooks.subscribers(-1)
            gone.cancel()
    return response


def last_event_id(raw: str | None) -> int:
    try:
        return max(0, int(raw)) if raw else 0
    except ValueError:
        return 0


async def stream_many(
    request: web.Request,
    engine: JobEngine,
    job_ids: list[str],
    *,
    ping_interval: float,
    retry_ms: int,
    after: str | None = None,
    dress: Dress = _stored,
) -> web.StreamResponse:
    """Serve several jobs' events on one connection (a browser allows about six per origin).

    The SSE id of each event is every job's position, in the order of ``job_ids``, joined by dots (``3.7.0``):
    a reconnect with ``Last-Event-ID`` resumes each job where it stood. ``after`` (same form) does the same for
    a client that opens a new stream itself (an EventSource cannot set that header). The stream ends when every
    job has sent its final event, when the client goes, or at shutdown.
    """
    async with sse_response(request, ping_interval=ping_interval) as response:
        positions = _positions(response.last_event_id or after, len(job_ids))
        gone = asyncio.ensure_future(response.wait())
        assert engine.closing is not None
        open_jobs = await _unfinished(engine, job_ids, positions)
        retry: int | None = retry_ms
        engine.hooks.subscribers(1)
        try:
            while open_jobs and not engine.closing.done():
                for index in sorted(open_jobs):
                    for event in await engine.events(job_ids[index], positions[index]):
                        positions[index] = event.id
                        await response.send(
                            dress(event), id=".".join(map(str, positions)), event=event.event, retry=retry
                        )
                        retry = None
                        if event.final:
                            open_jobs.discard(index)
                waiters = {engine.next_event(job_ids[i], positions[i]) for i in open_jobs}
                if not waiters:
                    break
                await asyncio.wait(waiters | {gone, engine.closing}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    break
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            engine.hooks.subscribers(-1)
            gone.cancel()
    return response


async def _unfinished(engine: JobEngine, job_ids: list[str], positions: list[int]) -> set[int]:
    """Indexes of the jobs with events still to send."""
    open_jobs = set()
    for index, job_id in enumerate(job_ids):
        job = await engine.get(job_id)
        if job is not None and not (job.final and positions[index] >= job.last_event_id):
            open_jobs.add(index)
    return open_jobs


def _positions(raw: str | None, count: int) -> list[int]:
    """Per-job positions from a ``Last-Event-ID`` written by :func:`stream_many`; anything else starts over."""
    parts = (raw or "").split(".")
    if len(parts) != count or not all(part.isdigit() and len(part) <= 9 for part in parts):
        return [0] * count
    return [int(part) for part in parts]
