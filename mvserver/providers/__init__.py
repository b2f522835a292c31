"""Provider backends, one module per provider, and the set of them an app uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mvserver.core.errors import ApiError
from mvserver.providers.base import Snapshot, VideoBackend, VideoRequest

if TYPE_CHECKING:  # the SDKs load with the app that builds the providers, not with every importer of this package
    from mvserver.providers.gemini import GeminiProvider
    from mvserver.providers.replicate import ReplicateProvider

__all__ = ["Providers", "Snapshot", "VideoBackend", "VideoRequest"]


@dataclass
class Providers:
    """The provider clients of one app; ``sandboxed`` names the providers answered by the built-in simulator."""

    gemini: GeminiProvider
    replicate: ReplicateProvider
    sandboxed: frozenset[str]

    def video_backend(self, name: str) -> VideoBackend:
        backends: dict[str, VideoBackend] = {"replicate": self.replicate, "gemini": self.gemini}
        try:
            return backends[name]
        except KeyError:
            raise ApiError(
                400, "invalid_field", f"backend must be one of {sorted(backends)}", field="backend"
            ) from None

    def modes(self) -> dict[str, str]:
        """``live`` or ``sandbox`` for each provider service."""
        services = ("gemini_scenes", "replicate", "gemini_video")
        return {name: "sandbox" if name in self.sandboxed else "live" for name in services}
