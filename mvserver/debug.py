"""Debug mode (``MV_DEBUG_MODE=true``): print what came in, what was defaulted, what was loaded and sent."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("mvserver.debug")


def debug_print(enabled: bool, title: str, payload: Any) -> None:
    """Log ``payload`` under ``title`` when debug mode is on; strings are printed verbatim (prompts)."""
    if not enabled:
        return
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2, default=str, ensure_ascii=False)
    log.info("[MV_DEBUG] %s:\n%s", title, text)
