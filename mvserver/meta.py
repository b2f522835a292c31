"""Service endpoints: health, the OpenAPI document, and the caller's key (its limits and what is left)."""

from __future__ import annotations

from aiohttp import web

from . import __version__
from .auth import API_KEY, KEYRING, public
from .backends import PROVIDERS
from .config import CONFIG
from .jobs import JOBS
from .metrics import METRICS
from .quotas import QUOTAS
from .schemas import REQUEST_MODELS, openapi_document

routes = web.RouteTableDef()


@routes.get("/api/mv/health")
@public
async def health(request: web.Request) -> web.Response:
    """Version, for each provider service whether it is live or answered by the sandbox simulator, and whether the
    API needs a key (so a page knows to ask for one before its first call)."""
    providers = request.app[PROVIDERS]
    modes = providers.modes()
    return web.json_response({
        "status": "ok",
        "version": __version__,
        "mode": "sandbox" if providers.sandboxed else "live",
        "sandbox": bool(providers.sandboxed),
        "providers": modes,
        "styles": [{"name": name, "label": preset.label, "description": preset.description}
                   for name, preset in request.app[CONFIG].styles.items()],
        "auth": {"keys_required": KEYRING in request.app},
    })


@routes.get("/api/mv/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response(openapi_document(app[REQUEST_MODELS], keys=KEYRING in app, metrics=METRICS in app))


@routes.get("/api/mv/me")
async def me(request: web.Request) -> web.Response:
    """The caller's key: its id and name, its limits, the tokens left in each bucket and its jobs holding a running
    place (queued for a slot or running) or waiting for one, so a page can pace itself instead of meeting 429s.
    With keys off every field is null: nothing is limited."""
    key = request.get(API_KEY)
    if key is None:
        return web.json_response({"key_id": None, "name": None, "limits": None, "tokens": None, "jobs": None},
                                 headers={"Cache-Control": "no-store"})
    quotas = request.app[QUOTAS]
    engine = request.app[JOBS]
    unfinished, (_, waiting) = await engine.running_jobs(key.id), await engine.places(key.id)
    running = max(0, unfinished - waiting)
    return web.json_response({"key_id": key.id, "name": key.name, "limits": key.limits.model_dump(),
                              "tokens": await quotas.tokens(key), "jobs": {"running": running, "waiting": waiting}},
                             headers={"Cache-Control": "no-store"})
