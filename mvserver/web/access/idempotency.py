"""``Idempotency-Key`` on the POSTs that create something: a retried request gets the first answer, not a second
job, project or upload.

The key is scoped to the caller (API key id, or none with keys off). A handler marked :func:`idempotent` validates
its request first and then calls :func:`reserve` with the request *as it will be used*: the validated body (text
trimmed, defaults filled, ``8.0`` read as ``8``), the options an action takes, or the digest of an uploaded file.
So a retry that differs only in what the server normalises (spacing, key order, surrounding whitespace the server
trims, a default sent explicitly) is the same request, and a malformed request never holds a key. :func:`reserve`
claims the key in the job store (files, or Redis ``SET NX`` across processes) with a fingerprint of method, path
and that normalised request; the successful answer is kept for ``KEEP_SECONDS`` (24 h) and replayed, with
``Idempotent-Replayed: true``, to any request with the same key and fingerprint. The same key with another request
is 422 ``idempotency_key_reused``. A request that arrives while the first is still being answered waits for that
answer (up to ``WAIT_SECONDS``, then 409 ``idempotency_in_progress``). An error answer is not kept: the
reservation is dropped, so the client may retry with the same key.

Answers are kept as the handler made them, before signed links are added (:mod:`.signing` adds them on the way
out), so a replay carries fresh links, not the first answer's, which may have expired.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel

from mvserver.appkeys import JOBS
from mvserver.core.errors import ApiError
from mvserver.web.access.auth import key_id

if TYPE_CHECKING:
    from mvserver.jobs import JobStore

log = logging.getLogger("mvserver")

HEADER = "Idempotency-Key"
KEY_PATTERN = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")  # printable ASCII, 1..255 characters
KEEP_SECONDS = 24 * 3600
PENDING_SECONDS = 60.0  # a reservation whose request died (crash) lapses after this
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.05
REPLAYED_HEADERS = ("Location", "ETag")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Remembered:
    """What the store keeps for an ``Idempotency-Key``: the request's fingerprint and, once answered, the answer.

    ``token`` identifies the request that reserved the key, so only it can complete or release the reservation."""

    token: str
    fingerprint: str
    status: int | None = None  # None while the first request is still being answered
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def dumps(self) -> str:
        return json.dumps(
            {
                "token": self.token,
                "fingerprint": self.fingerprint,
                "status": self.status,
                "body": self.body,
                "headers": self.headers,
            },
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, text: str | bytes) -> Remembered:
        raw = json.loads(text)
        return cls(
            token=raw["token"],
            fingerprint=raw["fingerprint"],
            status=raw["status"],
            body=raw["body"],
            headers=raw["headers"],
        )


@dataclass
class _Claim:
    """The state of one request that carries the header: its scope and, once :func:`reserve` ran, its hold."""

    store: JobStore
    scope: str
    mine: Remembered | None = None


class _Replayed(Exception):
    """Raised by :func:`reserve` when the key already has an answer for this request: the decorator returns it."""

    def __init__(self, response: web.Response):
        super().__init__("replayed")
        self.response = response


_CLAIM = web.RequestKey("idempotency_claim", _Claim)


def idempotent(handler: Handler) -> Handler:
    """Mark a POST handler as honouring ``Idempotency-Key``; it must call :func:`reserve` once its request is valid
    and before it changes anything."""

    @functools.wraps(handler)
    async def honour_key(request: web.Request) -> web.StreamResponse:
        raw = request.headers.get(HEADER)
        if raw is None:
            return await handler(request)
        if not KEY_PATTERN.fullmatch(raw):
            raise ApiError(400, "invalid_field", f"{HEADER}: 1 to 255 printable ASCII characters", field=HEADER)
        store = request.app[JOBS].store
        claim = _Claim(store, hashlib.sha256(f"{key_id(request) or '-'}\n{raw}".encode()).hexdigest())
        request[_CLAIM] = claim
        try:
            response = await handler(request)
        except _Replayed as replay:
            return replay.response
        except BaseException:
            if claim.mine is not None:
                await asyncio.shield(store.forget(claim.scope, claim.mine.token))
            raise
        mine = claim.mine
        if mine is None:  # a handler that never reserved: a bug, but the answer stands
            log.error("%s %s: idempotent handler answered without reserving the key", request.method, request.path)
            return response
        if 200 <= response.status < 300 and isinstance(response, web.Response) and isinstance(response.body, bytes):
            headers = {name: response.headers[name] for name in REPLAYED_HEADERS if name in response.headers}
            answer = Remembered(mine.token, mine.fingerprint, response.status, response.body.decode(), headers)
            await store.complete(claim.scope, answer, KEEP_SECONDS)
        else:
            await store.forget(claim.scope, mine.token)
        return response

    return honour_key


async def reserve(request: web.Request, normalised: Any) -> None:
    """Hold the request's ``Idempotency-Key`` for ``normalised`` (the validated request: a pydantic model, or any
    JSON value), or end the request with the answer already kept for it (or 422 / 409); nothing without the
    header. Call it once the request is known to be valid and before anything is created or charged."""
    claim = request.get(_CLAIM)
    if claim is None:
        return
    assert claim.mine is None, "reserve() is called once per request"
    mine = Remembered(token=secrets.token_hex(16), fingerprint=fingerprint(request.method, request.path, normalised))
    kept = await _reserve(claim.store, claim.scope, mine)
    if kept is not None:
        raise _Replayed(_replay(kept))
    claim.mine = mine


def fingerprint(method: str, path: str, normalised: Any) -> str:
    """Method, path and the normalised request in canonical JSON (sorted keys, no spacing)."""
    if isinstance(normalised, BaseModel):
        normalised = normalised.model_dump(mode="json")
    canonical = json.dumps(normalised, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    digest = hashlib.sha256(f"{method} {path}\n".encode())
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
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"{HEADER} was already used with another request (method, path or body) in the last 24 hours",
                field=HEADER,
            )
        if kept.status is not None:
            return kept
        if asyncio.get_running_loop().time() > deadline:
            raise ApiError(
                409,
                "idempotency_in_progress",
                f"a request with this {HEADER} is still being answered; retry shortly",
                field=HEADER,
                retry_after=1,
            )
        await asyncio.sleep(POLL_SECONDS)


def _replay(kept: Remembered) -> web.Response:
    assert kept.status is not None
    return web.Response(
        status=kept.status,
        text=kept.body,
        content_type="application/json",
        headers={**kept.headers, "Idempotent-Replayed": "true"},
    )
