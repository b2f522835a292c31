"""Debug mode (``MV_DEBUG_MODE=true``): print what came in, what was defaulted, what was loaded and sent."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("mvserver.debug")


MAX_FIELD_CHARS = 2000


def _shorten(value: Any) -> Any:
    """Cut long strings inside structured payloads (e.g. base64 images) so the log stays readable."""
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return f"{value[:80]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return {key: _shorten(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shorten(item) for item in value]
    return value


def debug_print(enabled: bool, title: str, payload: Any) -> None:
    """Log ``payload`` under ``title`` when debug mode is on; a string (a prompt, a reply) is printed whole."""
    if not enabled:
        return
    if isinstance(payload, str):
        text = payload
    else:
        text = json.dumps(_shorten(payload), indent=2, default=str, ensure_ascii=False)
    log.info("[MV_DEBUG] %s:\n%s", title, text)
