"""``GET /api/mv/openapi.json``: the OpenAPI document of this app (its request models, keys and metrics on or off)."""

from __future__ import annotations

from aiohttp import web

from mvserver.appkeys import KEYRING, METRICS, REQUEST_MODELS
from mvserver.openapi.schemas import openapi_document


async def openapi(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response(openapi_document(app[REQUEST_MODELS], keys=KEYRING in app, metrics=METRICS in app))
