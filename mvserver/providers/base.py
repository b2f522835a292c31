"""The small interface every video backend implements, and the values that cross it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from mvserver.core.errors import ApiError, ErrorInfo, from_exception

# Where a provider sends a job's updates (``?job=<id>``): Replicate's webhooks, received by
# :mod:`mvserver.providers.replicate_webhooks` and handed to the job engine's inbox (:mod:`mvserver.jobs.updates`).
WEBHOOK_PATH = "/api/mv/webhooks/replicate"

# (provider, operation, seconds, our error code or None): called after each provider API call (metrics).
ProviderObserver = Callable[[str, str, float, "str | None"], None]
ProviderStatus = Literal["starting", "processing", "succeeded", "failed", "canceled"]
T = TypeVar("T")


async def observed_call(provider: str, observe: ProviderObserver | None, call: Awaitable[T], operation: str) -> T:
    """Await one provider API call; map its failure to ApiError and report its time and outcome to ``observe``
    (metrics). A canceled call is not reported: it says nothing about the provider."""
    started = time.perf_counter()
    code: str | None = None
    try:
        return await call
    except asyncio.CancelledError:
        code = "canceled"
        raise
    except ApiError as exc:
        code = exc.info.code
        raise
    except Exception as exc:
        error = from_exception(exc, provider)
        code = error.info.code
        raise error from exc
    finally:
        if observe is not None and code != "canceled":
            observe(provider, operation, time.perf_counter() - started, code)


@dataclass(frozen=True)
class VideoRequest:
    """A fully resolved video request: defaults applied, rules appended, reference image decoded."""

    prompt: str
    negative_prompt: str
    aspect_ratio: str
    duration: int
    generate_audio: bool
    seed: int | None = None
    reference_image: bytes | None = field(default=None, repr=False)
    reference_mime_type: str | None = None
    webhook: str | None = None  # where the provider should push updates (Replicate only; others poll)
    cancel_after: float | None = None  # seconds left of the client's deadline (the provider's own, where it has one)
    logs: bool = False  # the client wants the provider's log lines: pushed as they grow (Replicate webhooks)


@dataclass(frozen=True)
class Snapshot:
    """One look at a provider's prediction or operation."""

    status: ProviderStatus
    progress: float | None = None  # 0..1 when the provider reports it
    logs: str | None = None
    output: str | None = None  # where the finished video can be fetched (URL or provider file reference)
    error: ErrorInfo | None = None
    metrics: dict[str, Any] | None = None  # the provider's own measures of its run (Replicate: predict_time, ...)

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "canceled")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, to carry a pushed update to the node that owns the job (field by field: ``asdict`` copies
        recursively, a tenth of a millisecond per webhook)."""
        return {
            "status": self.status,
            "progress": self.progress,
            "logs": self.logs,
            "output": self.output,
            "error": self.error.to_dict() if self.error else None,
            "metrics": dict(self.metrics) if self.metrics is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        error = data.get("error")
        return cls(
            status=data["status"],
            progress=data.get("progress"),
            logs=data.get("logs"),
            output=data.get("output"),
            error=ErrorInfo(**error) if error else None,
            metrics=data.get("metrics"),
        )


class VideoBackend(Protocol):
    """A provider that turns a :class:`VideoRequest` into an MP4 through a long-running prediction."""

    name: str
    model: str
    sandbox: bool

    async def start(self, request: VideoRequest) -> str:
        """Create the prediction; return the provider's id for it (persisted, so polling survives a restart)."""

    async def poll(self, prediction_id: str) -> Snapshot:
        """Look at the prediction once."""

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: str) -> int:
        """Stream the finished video into the artefact ``dest`` (a key), atomically and create-only
        (:class:`~mvserver.core.artefacts.ArtefactExists` if it is there); return its size in bytes."""

    async def cancel(self, prediction_id: str) -> Snapshot | None:
        """Ask the provider to stop the prediction (best effort); the ended prediction when the provider answers
        with it (Replicate, whose metrics then say how long it ran)."""
