"""Server-Sent Events for a job: the history after ``Last-Event-ID``, then live events, then close."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp_sse import sse_response

from .runner import JobEngine


async def stream_events(request: web.Request, engine: JobEngine, job_id: str, *, ping_interval: float,
                        retry_ms: int) -> web.StreamResponse:
    """Serve one job's events; the stream ends after the final event, when the client goes, or at shutdown."""
    async with sse_response(request, ping_interval=ping_interval) as response:
        after = last_event_id(response.last_event_id)
        gone = asyncio.ensure_future(response.wait())  # done when a ping finds the client gone
        assert engine.closing is not None
        retry: int | None = retry_ms
        try:
            while not engine.closing.done():
                events = await engine.events(job_id, after)
                for event in events:
                    await response.send(event.data_json, id=str(event.id), event=event.event, retry=retry)
                    after, retry = event.id, None
                    if event.final:
                        return response
                if not events:
                    job = await engine.get(job_id)
                    if job is None or (job.final and after >= job.last_event_id):
                        return response
                await asyncio.wait({engine.next_event(job_id, after), gone, engine.closing},
                                   return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    break
        except (ConnectionResetError, RuntimeError):
            pass  # the client disconnected during a write
        finally:
            gone.cancel()
    return response


def last_event_id(raw: str | None) -> int:
    try:
        return max(0, int(raw)) if raw else 0
    except ValueError:
        return 0
