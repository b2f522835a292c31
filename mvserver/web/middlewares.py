"""Wiring of access control into the app: middlewares, keys, signed links, quotas, metrics, CORS.

Everything here is off by default; the keyless quick start only gets request ids. The order of the middlewares
(outermost first): request id, metrics (sees the final status of every answer), errors, auth, signed links (inside
auth, so links made for a request admitted by a signed link expire with it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp_cors
from aiohttp import web

from mvserver.appkeys import CONFIG, KEYRING, METRICS, QUOTAS, SIGNER
from mvserver.core.config import ConfigError, EnvSettings
from mvserver.core.errors import error_middleware
from mvserver.core.logs import add_request_id_header, request_id_middleware
from mvserver.web.access.auth import KeyRing, key_id, make_auth_middleware
from mvserver.web.access.quotas import LocalRateLimiter, Quotas, RedisRateLimiter, set_rate_limiter
from mvserver.web.access.signing import MIN_SECRET_CHARS, UrlSigner, sign_body
from mvserver.web.metrics import Metrics, metrics_middleware

CORS_ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "If-Match",
    "If-None-Match",
    "Last-Event-ID",
    "Range",
    "X-Request-Id",
)
CORS_EXPOSE_HEADERS = (
    "Location",
    "Retry-After",
    "WWW-Authenticate",
    "X-Request-Id",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Idempotent-Replayed",
)
CORS_MAX_AGE = 600


def setup(app: web.Application, env: EnvSettings, guard: Any = None) -> None:
    """Install request ids, and when configured keys, signed links, quotas and metrics (before the routes).

    ``guard`` (the cross-site checks) runs inside the error middleware, so its refusals are JSON errors, and after
    the key check, so a request without a valid key learns nothing but 401."""
    metrics = Metrics() if env.metrics else None
    middlewares: list[Any] = [request_id_middleware]
    if metrics is not None:
        app[METRICS] = metrics
        middlewares.append(metrics_middleware)
    middlewares.append(error_middleware)
    if env.api_keys_file is not None:
        secret = env.url_signing_key
        if not secret or len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"environment: MV_API_KEYS_FILE is set, so MV_URL_SIGNING_SECRET must be set to at least "
                f"{MIN_SECRET_CHARS} random characters (e.g. python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))')"
            )
        app[KEYRING] = KeyRing(env.api_keys_file)
        app[SIGNER] = UrlSigner(secret, env.signed_url_ttl_seconds)
        on_refusal = (lambda bucket, code: metrics.rate_limit_refusals.labels(bucket, code).inc()) if metrics else None
        app[QUOTAS] = Quotas(LocalRateLimiter(), on_refusal)
        if env.redis_url:
            app.cleanup_ctx.append(shared_buckets_context)
        on_failure = (lambda code: metrics.auth_failures.labels(code).inc()) if metrics else None
        middlewares.append(make_auth_middleware(on_failure))
        middlewares.append(links_middleware)
    if guard is not None:
        middlewares.append(guard)
    app.middlewares.extend(middlewares)
    app.on_response_prepare.append(add_request_id_header)


@web.middleware
async def links_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every successful JSON answer to a keyed request carries the signed twin of each link it holds
    (:func:`signing.sign_links`): the one place that decides it, for every route, and after the idempotency layer
    kept the answer, so a replay gets fresh links."""
    response = await handler(request)
    if (
        isinstance(response, web.Response)
        and 200 <= response.status < 300
        and isinstance(response.body, bytes)
        and response.content_type == "application/json"
    ):
        signed = sign_body(request.app, key_id(request), response.body)
        if signed is not None:
            response.body = signed
    return response


async def shared_buckets_context(app: web.Application) -> AsyncIterator[None]:
    """With ``MV_REDIS_URL``, the quota buckets live in Redis (under ``MV_REDIS_PREFIX`` + ``bucket:``), so every
    process sharing that Redis draws from the same buckets."""
    from redis.asyncio import Redis  # redis is imported only when it is used

    env = app[CONFIG].env
    assert env.redis_url is not None  # the context is added only with one
    client = Redis.from_url(env.redis_url, decode_responses=True)
    set_rate_limiter(app, RedisRateLimiter(client, prefix=f"{env.redis_prefix}bucket:"))
    try:
        yield
    finally:
        await client.aclose()


def setup_cors(app: web.Application, env: EnvSettings) -> None:
    """CORS for the ``MV_CORS_ORIGINS`` allow-list on every route; call it after the last route is added.

    No wildcard and no credentials: the API authenticates with a bearer header, not cookies.
    """
    if not env.cors_origins:
        return
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,
        expose_headers=CORS_EXPOSE_HEADERS,
        allow_headers=CORS_ALLOW_HEADERS,
        max_age=CORS_MAX_AGE,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in env.cors_origins})
    for route in list(app.router.routes()):
        cors.add(route)
