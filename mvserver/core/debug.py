"""Debug mode (``MV_DEBUG_MODE=true``): print what came in, what was defaulted, what was loaded and sent."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("mvserver.debug")


MAX_FIELD_CHARS = 2000
MAX_DEPTH = 20


def _shorten(value: Any, depth: int = 0) -> Any:
    """Cut long strings (e.g. base64 images) and deep nesting inside structured payloads: the log stays readable
    and printing never recurses deeper than ``MAX_DEPTH`` levels, whatever a client sent."""
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return f"{value[:80]}... ({len(value)} characters)"
    if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
        return f"... (nested deeper than {MAX_DEPTH} levels)"
    if isinstance(value, dict):
        return {key: _shorten(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_shorten(item, depth + 1) for item in value]
    return value


def debug_print(enabled: bool, title: str, payload: Any) -> None:
    """Log ``payload`` under ``title`` when debug mode is on; a string (a prompt, a reply) is printed whole.

    Debug output never changes an answer: a payload that cannot be printed is logged as such, never raised.
    """
    if not enabled:
        return
    try:
        if isinstance(payload, str):
            text = payload
        else:
            text = json.dumps(_shorten(payload), indent=2, default=str, ensure_ascii=False)
    except Exception as exc:
        text = f"(not printable: {exc.__class__.__name__})"
    log.info("[MV_DEBUG] %s:\n%s", title, text)
