"""A simulated prediction's clock: its phase follows from when it was created, its latency and its ``Cancel-After``
deadline, so a prediction outlives a restart as a remote one would. Read by the Replicate API and its webhooks."""

from __future__ import annotations

import time
from typing import Any

STARTING_SHARE = 0.1  # the first tenth of a prediction's latency is spent "starting"
TERMINAL = ("succeeded", "failed", "canceled", "aborted")


def deadline_end(record: dict[str, Any]) -> float | None:
    """When the prediction's ``Cancel-After`` deadline ends it, if it would not be done by then."""
    cancel_after = record.get("cancel_after")
    if cancel_after is None or cancel_after >= record["latency"]:
        return None
    return record["created_at"] + cancel_after


def phase(record: dict[str, Any], now: float | None = None) -> str:
    """``starting``, ``processing``, ``ended`` (due to finish, maybe not rendered yet) or a final status, persisted
    or reached by the ``Cancel-After`` deadline (``aborted`` before it ran, ``canceled`` while it ran)."""
    if record["status"] in TERMINAL:
        return record["status"]
    now = time.time() if now is None else now
    deadline = deadline_end(record)
    if deadline is not None and now >= deadline:
        return "aborted" if record["cancel_after"] < record["latency"] * STARTING_SHARE else "canceled"
    elapsed = now - record["created_at"]
    if elapsed >= record["latency"]:
        return "ended"
    return "starting" if elapsed < record["latency"] * STARTING_SHARE else "processing"
