"""``Idempotency-Key`` on the POSTs that create jobs: a retried request gets the first answer, not a second job.

The key is scoped to the caller (API key id, or none with keys off). The first request reserves it in the job store
(files, or Redis ``SET NX`` across processes) with a fingerprint of method, path and body; its successful answer is
kept for ``KEEP_SECONDS`` (24 h) and replayed, with ``Idempotent-Replayed: true``, to any request with the same key
and body. The same key with another body is 422 ``idempotency_key_reused``. A request that arrives while the first
is still being answered waits for that answer (up to ``WAIT_SECONDS``, then 409 ``idempotency_in_progress``). An
error answer is not kept: the reservation is dropped, so the client may retry with the same key.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import secrets
from typing import Awaitable, Callable

from aiohttp import web

from .auth import key_id
from .errors import ApiError
from .jobs import JOBS, JobStore
from .jobs.store import Remembered

HEADER = "Idempotency-Key"
KEY_PATTERN = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")  # printable ASCII, 1..255 characters
KEEP_SECONDS = 24 * 3600
PENDING_SECONDS = 60.0  # a reservation whose request died (crash) lapses after this
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.05
REPLAYED_HEADERS = ("Location",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def idempotent(handler: Handler) -> Handler:
    """Mark a job-creating POST handler as honouring ``Idempotency-Key``."""

    @functools.wraps(handler)
    async def honour_key(request: web.Request) -> web.StreamResponse:
        raw = request.headers.get(HEADER)
        if raw is None:
            return await handler(request)
        if not KEY_PATTERN.fullmatch(raw):
            raise ApiError(400, "invalid_field", f"{HEADER}: 1 to 255 printable ASCII characters", field=HEADER)
        store = request.app[JOBS].store
        scope = hashlib.sha256(f"{key_id(request) or '-'}\n{raw}".encode()).hexdigest()
        mine = Remembered(token=secrets.token_hex(16), fingerprint=await fingerprint(request))
        kept = await _reserve(store, scope, mine)
        if kept is not None:
            return _replay(kept)
        try:
            response = await handler(request)
        except BaseException:
            await asyncio.shield(store.forget(scope, mine.token))
            raise
        if 200 <= response.status < 300 and isinstance(response, web.Response) and isinstance(response.body, bytes):
            headers = {name: response.headers[name] for name in REPLAYED_HEADERS if name in response.headers}
            answer = Remembered(mine.token, mine.fingerprint, response.status, response.body.decode(), headers)
            await store.complete(scope, answer, KEEP_SECONDS)
        else:
            await store.forget(scope, mine.token)
        return response

    return honour_key


async def fingerprint(request: web.Request) -> str:
    """Method, path and body; a JSON body in canonical form, so key order and spacing do not matter."""
    body = await request.read()  # kept by aiohttp: the handler reads it again
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    digest.update(canonical)
    return digest.hexdigest()


async def _reserve(store: JobStore, scope: str, mine: Remembered) -> Remembered | None:
    """None once ``mine`` holds the key; else the finished answer kept for it (waiting while it is pending)."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        kept = await store.remember(scope, mine, PENDING_SECONDS)
        if kept is None:
            return None
        if kept.fingerprint != mine.fingerprint:
            raise ApiError(422, "idempotency_key_reused", f"{HEADER} was already used with another request "
                                                         "(method, path or body) in the last 24 hours", field=HEADER)
        if kept.status is not None:
            return kept
        if asyncio.get_running_loop().time() > deadline:
            raise ApiError(409, "idempotency_in_progress", f"a request with this {HEADER} is still being answered; "
                                                           "retry shortly", field=HEADER, retry_after=1)
        await asyncio.sleep(POLL_SECONDS)


def _replay(kept: Remembered) -> web.Response:
    assert kept.status is not None
    return web.Response(status=kept.status, text=kept.body, content_type="application/json",
                        headers={**kept.headers, "Idempotent-Replayed": "true"})
