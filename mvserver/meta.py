"""Service endpoints: health and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from . import __version__
from .auth import KEYRING, public
from .backends import PROVIDERS
from .config import CONFIG
from .metrics import METRICS
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
