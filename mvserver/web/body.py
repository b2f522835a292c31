"""Request bodies: read a JSON object and validate it against a request model (:mod:`mvserver.core.validation`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mvserver.core.debug import debug_print
from mvserver.core.validation import Model, json_object, validate


async def read_json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's body as a JSON object; with ``optional``, an empty body is ``{}``."""
    raw = await request.read()
    if optional and not raw.strip():
        return {}
    return json_object(raw)


async def parse_body(request: web.Request, model: type[Model], debug: bool) -> tuple[Model, list[str]]:
    """Parse and validate a JSON body; return the model and the names of the fields filled from settings."""
    body = json_object(await request.read())
    debug_print(debug, f"{request.path} request arguments received", body)
    parsed: Model
    parsed, defaulted = validate(model, body)
    debug_print(
        debug, f"{request.path} defaults applied from settings", {name: getattr(parsed, name) for name in defaulted}
    )
    return parsed, defaulted
