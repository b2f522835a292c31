"""Cross-site request forgery and DNS-rebinding guards for a server that usually listens on a loopback address.

A web page the user visits can send requests to 127.0.0.1 without any CORS preflight when they look like a plain
form post or a ``text/plain`` fetch, and a rebound DNS name lets that page read the answers too. Three checks close
this, in this order:

- ``Host`` must name an allowed host (``MV_ALLOWED_HOSTS``; default the listen host, ``localhost``, ``127.0.0.1``
  and ``[::1]``), any port: 421 ``misdirected_request`` otherwise. A rebound name is not on the list.
- ``Origin``, when present, must be this server's own origin (scheme, host and port of the request) or one of
  ``MV_CORS_ORIGINS``: 403 ``forbidden_origin`` otherwise. Browsers send ``Origin`` on every POST, even a
  same-origin one, and on cross-origin fetches of any method; a same-origin GET carries none. A state-changing
  request (any method but GET, HEAD and OPTIONS) a browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site``
  must carry such an ``Origin``. A safe request without ``Origin`` passes whatever its ``Sec-Fetch-Site``: that is
  how browsers load ``<img>``, ``<video>`` and ``<audio>`` sources (and follow links), no GET changes anything, and
  the page that sent it cannot read the answer (no CORS headers without an allowed ``Origin``); with keys on, it
  still needs a valid signed link.
- A POST body must be ``application/json`` (a ``charset`` parameter is fine): 415 ``unsupported_media_type``
  otherwise. An HTML form cannot send that type, and a fetch that does needs a preflight. A handler marked with
  :func:`accepts` takes the types it names instead (a song upload: ``audio/*`` or a multipart form); a form post
  of those from another site is still stopped by its ``Origin``. A POST with an empty body
  (``/jobs/{id}/cancel``) has nothing to parse and passes; a cross-site one is still stopped by its ``Origin``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from mvserver.core.config import EnvSettings
from mvserver.core.errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCEPTS = "_mv_accepts"  # the body types a handler marked with accepts() takes
JSON_ONLY = ("application/json",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def split_host(value: str) -> tuple[str, str | None]:
    """``host[:port]`` -> (lower-case host, port or None); an IPv6 literal keeps its brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value.partition("]")
        return f"{host}]", rest[1:] if rest.startswith(":") else None
    host, colon, port = value.rpartition(":")
    return (host, port) if colon else (value, None)


def own_origin(request: web.Request) -> str:
    """The origin a page served by this server has: ``scheme://host[:port]`` as the client addressed it."""
    host, port = split_host(request.headers.get(hdrs.HOST, ""))
    default = {"http": "80", "https": "443"}.get(request.scheme)
    return f"{request.scheme}://{host}" + (f":{port}" if port and port != default else "")


def normal_origin(value: str) -> str:
    """An ``Origin`` header value in the form :func:`own_origin` builds (lower case, default port dropped)."""
    scheme, sep, rest = value.strip().lower().partition("://")
    if not sep:
        return value.strip().lower()  # "null" (sandboxed frames, file: pages) and garbage never match
    host, port = split_host(rest)
    default = {"http": "80", "https": "443"}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


def check_host(request: web.Request, allowed: frozenset[str]) -> None:
    raw = request.headers.get(hdrs.HOST)
    if raw is None:
        return  # HTTP/1.0 clients may omit it; browsers never do
    host, _ = split_host(raw)
    if host not in allowed:
        raise ApiError(
            421,
            "misdirected_request",
            f"Host: {host!r} is not a host name this server answers to (MV_ALLOWED_HOSTS)",
            field="Host",
        )


def check_origin(request: web.Request, allowed: frozenset[str]) -> None:
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        if request.method not in SAFE_METHODS and request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            raise ApiError(
                403, "forbidden_origin", "a request from another site must carry an allowed Origin", field="Origin"
            )
        return
    normal = normal_origin(origin)
    if normal != own_origin(request) and normal not in allowed:
        raise ApiError(
            403, "forbidden_origin", f"Origin: {origin!r} may not call this server (MV_CORS_ORIGINS)", field="Origin"
        )


def check_content_type(request: web.Request) -> None:
    """A POST that has a body must declare it JSON; an empty one (a cancel) has nothing to parse and passes."""
    if request.method != "POST" or not request.body_exists or request.match_info.http_exception is not None:
        return  # unknown routes and methods get their own 404/405
    raw = request.headers.get(hdrs.CONTENT_TYPE)
    types = getattr(request.match_info.handler, ACCEPTS, JSON_ONLY)
    if raw is None or not any(_matches(request.content_type, accepted) for accepted in types):
        sent = "none" if raw is None else repr(raw)
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type: send the body as {' or '.join(types)} (got {sent})",
            field="Content-Type",
        )


def _matches(content_type: str, accepted: str) -> bool:
    if accepted.endswith("/*"):
        return content_type.startswith(accepted[:-1])
    return content_type == accepted


def accepts(*types: str) -> Callable[[Handler], Handler]:
    """Mark a POST handler that takes bodies of ``types`` (``audio/*`` matches every audio type) instead of JSON."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, ACCEPTS, types)
        return handler

    return mark


def guard_middleware(
    allowed_hosts: frozenset[str], allowed_origins: frozenset[str]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware that runs the three checks before any handler (and so before any body is read)."""

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        check_host(request, allowed_hosts)
        check_origin(request, allowed_origins)
        check_content_type(request)
        return await handler(request)

    return guard


def security_middleware(env: EnvSettings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The guard configured from the environment (``MV_ALLOWED_HOSTS``, ``MV_CORS_ORIGINS``)."""
    return guard_middleware(env.host_names, frozenset(env.cors_origins))
