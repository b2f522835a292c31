"""The small interface every video backend implements, and the values that cross it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..errors import ErrorInfo

ProviderStatus = Literal["starting", "processing", "succeeded", "failed", "canceled"]


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


@dataclass(frozen=True)
class Snapshot:
    """One look at a provider's prediction or operation."""

    status: ProviderStatus
    progress: float | None = None  # 0..1 when the provider reports it
    logs: str | None = None
    output: str | None = None  # where the finished video can be fetched (URL or provider file reference)
    error: ErrorInfo | None = None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "canceled")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, to carry a pushed update to the node that owns the job."""
        return {**asdict(self), "error": self.error.to_dict() if self.error else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Snapshot":
        error = data.get("error")
        return cls(status=data["status"], progress=data.get("progress"), logs=data.get("logs"),
                   output=data.get("output"), error=ErrorInfo(**error) if error else None)


class VideoBackend(Protocol):
    """A provider that turns a :class:`VideoRequest` into an MP4 through a long-running prediction."""

    name: str
    model: str
    sandbox: bool

    async def start(self, request: VideoRequest) -> str:
        """Create the prediction; return the provider's id for it (persisted, so polling survives a restart)."""

    async def poll(self, prediction_id: str) -> Snapshot:
        """Look at the prediction once."""

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: Path) -> int:
        """Stream the finished video to ``dest`` atomically; return its size in bytes."""

    async def cancel(self, prediction_id: str) -> None:
        """Ask the provider to stop the prediction (best effort)."""
