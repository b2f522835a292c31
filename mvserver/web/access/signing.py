"""Signed links for what a browser loads without headers (``EventSource``, ``<video>``, ``<img>``).

A link is the resource path (and its query, if any) plus ``kid=<key id>&exp=<unix seconds>&sig=<HMAC-SHA256>`` over
key id, expiry, path and query, with the server's ``MV_URL_SIGNING_SECRET``. It never carries the key itself, works
only for GET/HEAD of that exact path with exactly those query parameters (e.g. the job list of the multi-job stream)
until it expires, and dies with its key when the key is revoked. Signing happens on the way out (the data models
and handlers keep plain paths): :func:`sign_links` below, and :func:`signed_url` for one path.

A request admitted by a signed link gets links that expire no later than that link (:func:`links_expire_by`, set
by the auth middleware for the request's task): otherwise a link would renew itself (``GET`` on a signed
``status_url`` answers fresh ``signed_urls``), and a leaked link would never expire.

Which answers carry links is decided in one place, :func:`sign_links`: every object of a JSON answer (or event) that
names a resource of this API in a ``*_url`` field (or in a ``urls`` object) gets a ``signed_urls`` object next to
it, with the signed twin of each and ``expires_at``. The access middleware applies it to every successful JSON
answer of a keyed request, and the event streams to every event, so a field added to any answer later is covered
without another line of code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web

from mvserver.appkeys import CONFIG, SIGNER
from mvserver.core.errors import ApiError

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

    def verify(self, request: web.Request) -> str:
        """The id of the key a signed link was made for; ApiError 403 when it is tampered, expired or not a GET.
        (Its expiry is then ``int(request.query["exp"])``.) Whether that key still exists is the caller's to ask
        (the auth middleware looks it up in the key ring), so signing knows nothing of keys."""
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
        return key_id


def signed_url(app: web.Application, key_id: str | None, path: str, ttl: int | None = None) -> str:
    """``path`` signed for ``key_id`` for ``ttl`` seconds (default ``MV_SIGNED_URL_TTL_SECONDS``); the plain path
    when keys are off (``key_id`` None or no signer)."""
    signer = app.get(SIGNER)
    if signer is None or key_id is None:
        return path
    return signer.sign(key_id, path, ttl)[0]


API_PREFIX = "/api/mv/"
LINKS = "signed_urls"
# Cheap test on a serialised answer before it is parsed: does it hold a link at all?
_MAY_HOLD_LINKS = re.compile(rb'_url"\s*:\s*"|"urls"\s*:\s*\{')


def _split(url: str, base: str | None) -> tuple[str, str]:
    """(what comes before the path the server sees, that path and query): a URL on ``MV_PUBLIC_BASE_URL`` (which may
    end in a path of its own, a proxy's prefix) drops the base, another absolute URL its origin."""
    if base and url.startswith(base + "/"):
        return base, url[len(base) :]
    parts = urlsplit(url)
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    return (f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""), target


def _loadable(value: Any, base: str | None = None) -> bool:
    """A path (or absolute URL) of a resource of this API, not signed yet."""
    if not isinstance(value, str):
        return False
    parts = urlsplit(_split(value, base)[1])
    return parts.path.startswith(API_PREFIX) and not any(name == "sig" for name, _ in parse_qsl(parts.query))


def _links_of(obj: dict[str, Any], base: str | None = None) -> dict[str, str]:
    """The links an object names: its ``*_url`` fields and the entries of its ``urls`` object."""
    links = {name: value for name, value in obj.items() if name.endswith("_url") and _loadable(value, base)}
    urls = obj.get("urls")
    if isinstance(urls, dict):
        links.update({name: value for name, value in urls.items() if _loadable(value, base)})
    return links


def has_links(value: Any, base: str | None = None) -> bool:
    """Whether :func:`sign_links` would sign anything in ``value``."""
    if isinstance(value, dict):
        return bool(_links_of(value, base)) or any(has_links(v, base) for k, v in value.items() if k != LINKS)
    if isinstance(value, list):
        return any(has_links(item, base) for item in value)
    return False


def _sign(signer: UrlSigner, key_id: str, url: str, now: float, base: str | None) -> tuple[str, int]:
    """An absolute URL keeps its origin (or public base); the signature covers the path and query the checker sees."""
    prefix, target = _split(url, base)
    signed, expires = signer.sign(key_id, target, now=now)
    return prefix + signed, expires


def _public_base(app: web.Application) -> str | None:
    config = app.get(CONFIG)
    return config.env.public_base_url if config is not None else None


def sign_links(app: web.Application, key_id: str | None, value: Any) -> bool:
    """Add ``signed_urls`` (``{field: signed link, ..., "expires_at": ISO time}``) to every object in ``value`` (a
    parsed JSON answer or event, changed in place) that names a resource of this API; True if it added any.
    Nothing when keys are off (``key_id`` None or no signer)."""
    signer = app.get(SIGNER)
    if signer is None or key_id is None:
        return False
    return _sign_all(signer, key_id, value, time.time(), _public_base(app))


def _sign_all(signer: UrlSigner, key_id: str, value: Any, now: float, base: str | None) -> bool:
    signed = False
    if isinstance(value, list):
        for item in value:
            signed = _sign_all(signer, key_id, item, now, base) or signed
        return signed
    if not isinstance(value, dict):
        return False
    for name, item in value.items():
        if name != LINKS and isinstance(item, (dict, list)):
            signed = _sign_all(signer, key_id, item, now, base) or signed
    links = _links_of(value, base)
    if links:
        twins: dict[str, Any] = {}
        expires = int(now)
        for name, url in links.items():
            twins[name], expires = _sign(signer, key_id, url, now, base)
        twins["expires_at"] = datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")
        value[LINKS] = twins
        signed = True
    return signed


def sign_body(app: web.Application, key_id: str | None, body: bytes) -> bytes | None:
    """A serialised JSON answer with its links signed (:func:`sign_links`), or None when it has none to sign."""
    if app.get(SIGNER) is None or key_id is None or not _MAY_HOLD_LINKS.search(body):
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not sign_links(app, key_id, parsed):
        return None
    return json.dumps(parsed).encode()


def signed_event_data(app: web.Application, key_id: str | None, data: dict[str, Any], data_json: str) -> str:
    """An event's ``data`` as sent to a subscriber of ``key_id``: with ``signed_urls`` when it names a resource (a
    ``succeeded`` event's ``video_url``), else the stored JSON unchanged. Events are stored once, for every
    subscriber; the links are made per subscriber, for its key and within its own link's lifetime."""
    if app.get(SIGNER) is None or key_id is None or not has_links(data, _public_base(app)):
        return data_json
    parsed = json.loads(data_json)
    sign_links(app, key_id, parsed)
    return json.dumps(parsed, separators=(",", ":"))
