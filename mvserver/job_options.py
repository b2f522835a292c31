"""Options every job-creating request takes, whatever the kind of job: ``deadline_seconds`` (and, later, where to
send the job's news). The request models add these fields; the submit functions copy them onto the job."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from .config import Config

DEADLINE_MIN_SECONDS = 1.0
DEADLINE_DESCRIPTION = ("Seconds from submission (queue time included) within which the job must be over: at the "
                        "deadline the provider prediction is canceled (Replicate is also given it as its own "
                        "Cancel-After deadline) and the job fails with deadline_exceeded; nothing is downloaded "
                        "after it. At most jobs.max_deadline_seconds; null: only jobs.timeout_seconds applies.")


def deadline_type(max_seconds: float) -> Any:
    """The ``deadline_seconds`` field's type: a number from 1 to ``max_seconds``, or null."""
    return Annotated[float, Field(ge=DEADLINE_MIN_SECONDS, le=max_seconds, allow_inf_nan=False)] | None


def option_fields(config: Config) -> dict[str, Any]:
    """The job options as ``create_model`` fields, bounded by this server's settings."""
    return {"deadline_seconds": (deadline_type(config.videos.jobs.max_deadline_seconds),
                                 Field(None, description=DEADLINE_DESCRIPTION))}


def job_fields(body: Any) -> dict[str, Any]:
    """The :class:`~mvserver.jobs.Job` keyword arguments of the options in a validated request (model or dict)."""
    get = body.get if isinstance(body, dict) else lambda name: getattr(body, name, None)
    return {"deadline_seconds": get("deadline_seconds")}
