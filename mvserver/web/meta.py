"""Service endpoints: health (with liveness and readiness for load balancers), the OpenAPI document, and the
caller's key (its limits and what is left)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from mvserver import __version__
from mvserver.appkeys import CONFIG, JOBS, KEYRING, PROJECTS, PROVIDERS, QUOTAS
from mvserver.core.errors import STORE_UNAVAILABLE, ApiError, StoreUnavailable, one_line
from mvserver.web.access.auth import API_KEY, public

log = logging.getLogger("mvserver")
READY_TIMEOUT_SECONDS = 2.0  # a store that takes longer to answer a ping counts as unreachable


async def store_problem(app: web.Application) -> str | None:
    """Why the job or project store cannot be used now (None: both answer a ping within the time limit)."""

    async def ping() -> None:
        await app[JOBS].ping()
        await app[PROJECTS].ping()

    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            try:
                await ping()
            except STORE_UNAVAILABLE:  # a pooled connection a Redis restart cut: once more, on a fresh one
                await ping()
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT_SECONDS:g} s"
    except (OSError, StoreUnavailable, *STORE_UNAVAILABLE) as exc:
        return f"{exc.__class__.__name__}: {one_line(str(exc))}"
    return None


def _store_kind(app: web.Application) -> str:
    return "redis" if app[CONFIG].env.redis_url else "files"


@public
async def health(request: web.Request) -> web.Response:
    """Version, for each provider service whether it is live or answered by the sandbox simulator, and whether the
    API needs a key (so a page knows to ask for one before its first call)."""
    providers = request.app[PROVIDERS]
    modes = providers.modes()
    problem = await store_problem(request.app)
    return web.json_response(
        {
            "status": "ok" if problem is None else "degraded",
            "version": __version__,
            "mode": "sandbox" if providers.sandboxed else "live",
            "sandbox": bool(providers.sandboxed),
            "providers": modes,
            "styles": [
                {"name": name, "label": preset.label, "description": preset.description}
                for name, preset in request.app[CONFIG].styles.items()
            ],
            "auth": {"keys_required": KEYRING in request.app},
            "store": {"kind": _store_kind(request.app), "reachable": problem is None},
        }
    )


@public
async def live(request: web.Request) -> web.Response:
    """Liveness: the process serves requests (whatever its store does); a failure means restart it."""
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


@public
async def ready(request: web.Request) -> web.Response:
    """Readiness: the job and project store answer, so requests can be served; 503 ``store_unavailable`` while they
    do not (take the node out of the balancer, do not restart it: it reconnects by itself)."""
    problem = await store_problem(request.app)
    if problem is not None:
        log.warning("not ready: the %s store is unreachable: %s", _store_kind(request.app), problem)
        raise ApiError(503, "store_unavailable", f"the {_store_kind(request.app)} store is unreachable", retry_after=1)
    return web.json_response(
        {"status": "ready", "store": _store_kind(request.app)}, headers={"Cache-Control": "no-store"}
    )


async def me(request: web.Request) -> web.Response:
    """The caller's key: its id and name, its limits, the tokens left in each bucket and its jobs holding a running
    place (queued for a slot or running) or waiting for one, so a page can pace itself instead of meeting 429s.
    With keys off every field is null: nothing is limited."""
    key = request.get(API_KEY)
    if key is None:
        return web.json_response(
            {"key_id": None, "name": None, "limits": None, "tokens": None, "jobs": None},
            headers={"Cache-Control": "no-store"},
        )
    quotas = request.app[QUOTAS]
    engine = request.app[JOBS]
    unfinished, (_, waiting) = await engine.running_jobs(key.id), await engine.places(key.id)
    running = max(0, unfinished - waiting)
    return web.json_response(
        {
            "key_id": key.id,
            "name": key.name,
            "limits": key.limits.model_dump(),
            "tokens": await quotas.tokens(key),
            "jobs": {"running": running, "waiting": waiting},
        },
        headers={"Cache-Control": "no-store"},
    )
