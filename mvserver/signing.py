"""Signed links for what a browser loads without headers (``EventSource``, ``<video>``, ``<img>``).

A link is the resource path (and its query, if any) plus ``kid=<key id>&exp=<unix seconds>&sig=<HMAC-SHA256>`` over
key id, expiry, path and query, with the server's ``MV_URL_SIGNING_SECRET``. It never carries the key itself, works
only for GET/HEAD of that exact path with exactly those query parameters (e.g. the job list of the multi-job stream)
until it expires, and dies with its key when the key is revoked. Signing happens in the handler layer
(:func:`signed_url`, :func:`signed_urls`); the data models keep plain paths.

A request admitted by a signed link gets links that expire no later than that link (:func:`links_expire_by`, set
by the auth middleware for the request's task): otherwise a link would renew itself (``GET`` on a signed
``status_url`` answers fresh ``signed_urls``), and a leaked link would never expire.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Iterator
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from .errors import ApiError

if TYPE_CHECKING:
    from .auth import KeyRecord, KeyRing

MIN_SECRET_CHARS = 32
LINK_PARAMETERS = frozenset({"kid", "exp", "sig"})
# The expiry of the signed link that admitted the current request (None: a bearer key, or keys off).
_ADMITTED_UNTIL: ContextVar[int | None] = ContextVar("mv_signed_link_expiry", default=None)


@contextlib.contextmanager
def links_expire_by(expires: int) -> Iterator[None]:
    """Within the block, every link signed expires at ``expires`` at the latest: the request was admitted by a
    signed link that expires then, and what it hands out must not outlive it."""
    token = _ADMITTED_UNTIL.set(expires)
    try:
        yield
    finally:
        _ADMITTED_UNTIL.reset(token)


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """The signed form of a link's own query parameters: every pair but kid/exp/sig, decoded, sorted and encoded
    again, so the signer and the checker agree however the client spells the encoding (a changed, added or removed
    parameter changes it)."""
    return urlencode(sorted((name, value) for name, value in pairs if name not in LINK_PARAMETERS))


class UrlSigner:
    """Signs and checks links with one secret; ``ttl`` is the default lifetime in seconds."""

    def __init__(self, secret: str, ttl: int):
        self._secret = secret.encode()
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"UrlSigner(ttl={self.ttl})"  # never the secret

    def _signature(self, key_id: str, path: str, expires: int, query: str = "") -> str:
        target = f"{path}?{query}" if query else path  # a link without a query signs what it always signed
        message = f"{key_id}\n{expires}\n{target}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, key_id: str, path: str, ttl: int | None = None, now: float | None = None) -> tuple[str, int]:
        """The signed link for ``path`` (which may carry a query, e.g. ``/api/mv/events?jobs=a,b``; the signature
        covers it) and its expiry (unix seconds): ``ttl`` from now, but never later than the signed link that
        admitted the current request (:func:`links_expire_by`)."""
        expires = int(now if now is not None else time.time()) + (self.ttl if ttl is None else ttl)
        admitted_until = _ADMITTED_UNTIL.get()
        if admitted_until is not None:
            expires = min(expires, admitted_until)
        path, _, own = path.partition("?")
        signature = self._signature(key_id, path, expires, canonical_query(parse_qsl(own, keep_blank_values=True)))
        query = urlencode({"kid": key_id, "exp": expires, "sig": signature})
        return f"{path}?{own}&{query}" if own else f"{path}?{query}", expires

    def verify(self, request: web.Request, keyring: "KeyRing") -> "KeyRecord":
        """The key a signed link was made for; ApiError 403 when it is tampered, expired, revoked or not a GET.
        (Its expiry is then ``int(request.query["exp"])``.)"""
        query = request.query
        key_id, expires, signature = query.get("kid", ""), query.get("exp", ""), query.get("sig", "")
        if request.method not in ("GET", "HEAD"):
            raise ApiError(403, "invalid_signature", "signed links are valid for GET only")
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12) or not key_id or len(key_id) > 64:
            raise ApiError(403, "invalid_signature", "the signed link is malformed")
        expected = self._signature(key_id, request.path, int(expires), canonical_query(request.query.items()))
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise ApiError(403, "invalid_signature", "the link's signature does not match")
        if int(expires) < time.time():
            raise ApiError(403, "signature_expired", "the signed link has expired; fetch a fresh one")
        record = keyring.get(key_id)
        if record is None:
            raise ApiError(403, "invalid_signature", "the key this link was made for has been revoked")
        return record


SIGNER = web.AppKey("url_signer", UrlSigner)


def signed_url(app: web.Application, key_id: str | None, path: str, ttl: int | None = None) -> str:
    """``path`` signed for ``key_id`` for ``ttl`` seconds (default ``MV_SIGNED_URL_TTL_SECONDS``); the plain path
    when keys are off (``key_id`` None or no signer)."""
    signer = app.get(SIGNER)
    if signer is None or key_id is None:
        return path
    return signer.sign(key_id, path, ttl)[0]


def signed_urls(app: web.Application, key_id: str | None, urls: dict[str, str | None],
                ttl: int | None = None) -> dict[str, Any] | None:
    """``{name: signed link, ..., "expires_at": ISO time}`` for the non-null ``urls``; None when keys are off."""
    signer = app.get(SIGNER)
    if signer is None or key_id is None:
        return None
    now = time.time()
    result: dict[str, Any] = {}
    expires = int(now)
    for name, path in urls.items():
        if path is not None:
            result[name], expires = signer.sign(key_id, path, ttl, now)
    result["expires_at"] = datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")
    return result
