"""Options every job-creating request takes, whatever the kind of job: ``deadline_seconds``, ``webhook_url`` with
``webhook_events`` (where the job's news is sent, :mod:`mvserver.jobs.webhooks_out`) and ``provider_logs`` (whether
progress events carry the provider's log lines). The request models add these fields; the submit functions copy
them onto the job."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints

from mvserver.core.config import Config

DEADLINE_MIN_SECONDS = 1.0
WEBHOOK_URL_MAX_CHARS = 2048
DEADLINE_DESCRIPTION = (
    "Seconds from submission (queue time included) within which the job must be over: at the "
    "deadline the provider prediction is canceled (Replicate is also given it as its own "
    "Cancel-After deadline) and the job fails with deadline_exceeded; nothing is downloaded "
    "after it. At most jobs.max_deadline_seconds; null: only jobs.timeout_seconds applies."
)


def deadline_type(max_seconds: float) -> Any:
    """The ``deadline_seconds`` field's type: a number from 1 to ``max_seconds``, or null."""
    return Annotated[float, Field(ge=DEADLINE_MIN_SECONDS, le=max_seconds, allow_inf_nan=False)] | None


WEBHOOK_DESCRIPTION = (
    "Where the job's status changes are POSTed, signed per Standard Webhooks (webhook-id, "
    "webhook-timestamp, webhook-signature) and retried for a day; an http(s) URL whose host is "
    "not a loopback, private or link-local address. null: the key's default webhook, if any."
)
EVENTS_DESCRIPTION = (
    "Which changes are sent: completed (the final event: succeeded, failed or canceled) or all "
    "(every status change: queued, running and the final one). null: the key's default, else "
    "completed."
)
PROVIDER_LOGS_DESCRIPTION = (
    "true: progress events carry the provider's last log lines (logs) as they change; with Replicate "
    "webhooks this asks Replicate for a logs delivery up to every 0.5 s while the prediction runs. "
    "false (the default): progress events carry no logs; between them, interpolate progress from "
    "eta_seconds and event_time."
)
OPTION_NAMES = ("deadline_seconds", "webhook_url", "webhook_events", "provider_logs")


def webhook_url_type(config: Config) -> Any:
    """An http(s) URL that webhooks may reach (checked again at every connection)."""
    from mvserver.jobs.webhooks_out import (  # the sender imports the job engine: load it late
        allowed_networks,
        check_url,
    )

    allowed = allowed_networks(config.env)
    return (
        Annotated[
            str,
            StringConstraints(min_length=1, max_length=WEBHOOK_URL_MAX_CHARS, pattern=r"^https?://"),
            AfterValidator(lambda url: check_url(url, allowed)),
        ]
        | None
    )


def option_fields(config: Config) -> dict[str, Any]:
    """The job options as ``create_model`` fields, bounded by this server's settings."""
    return {
        "deadline_seconds": (
            deadline_type(config.videos.jobs.max_deadline_seconds),
            Field(None, description=DEADLINE_DESCRIPTION),
        ),
        "webhook_url": (webhook_url_type(config), Field(None, description=WEBHOOK_DESCRIPTION)),
        "webhook_events": (Literal["completed", "all"] | None, Field(None, description=EVENTS_DESCRIPTION)),
        "provider_logs": (bool, Field(False, description=PROVIDER_LOGS_DESCRIPTION)),
    }


def job_fields(body: Any) -> dict[str, Any]:
    """The :class:`~mvserver.jobs.Job` keyword arguments of the options in a validated request (model or dict)."""
    get = body.get if isinstance(body, dict) else lambda name: getattr(body, name, None)
    fields = {name: get(name) for name in OPTION_NAMES}
    fields["provider_logs"] = bool(fields["provider_logs"])  # absent (a project action's options): false
    return fields
