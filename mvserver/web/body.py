"""Request bodies: a JSON object, validated against a request model, every error a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from mvserver.core.debug import debug_print
from mvserver.core.errors import ApiError, validation_error

Model = TypeVar("Model", bound=BaseModel)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; 400 ``invalid_json`` for anything else."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return body


async def parse_body(request: web.Request, model: type[Model], debug: bool) -> tuple[Model, list[str]]:
    """Parse and validate a JSON body; return the model and the names of the fields filled from settings."""
    body = json_object(await request.read())
    debug_print(debug, f"{request.path} request arguments received", body)
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    defaulted = [name for name in model.model_fields if name not in parsed.model_fields_set]
    debug_print(
        debug, f"{request.path} defaults applied from settings", {name: getattr(parsed, name) for name in defaulted}
    )
    return parsed, defaulted
