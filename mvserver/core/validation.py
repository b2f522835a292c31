"""The one body validator: a JSON object checked against a request model, every refusal a 400 naming the field.

No HTTP here, so a service can validate what it builds (a scene's clip request, a project's options) the same way a
handler validates what it reads (:mod:`mvserver.web.body` reads a request's body and hands it here).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

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


def validate(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> tuple[Any, list[str]]:
    """``data`` as ``model`` and the names of the fields filled from defaults (the settings); a refusal names the
    first bad field (under ``prefix``, for a nested object). The models are built at start-up from the settings
    (``create_model``), so their fields are known only at run time: the parsed body is ``Any`` to the type checker."""
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        error = validation_error(exc)
        if prefix and error.info.field:
            error.info.field = f"{prefix}.{error.info.field}"
        raise error from None
    return parsed, [name for name in model.model_fields if name not in parsed.model_fields_set]
