"""Job kinds the engine knows by name, and the driver of each. Video jobs run on a provider backend."""

from __future__ import annotations

from mvserver.core.artefacts import Artefacts, artefact_key
from mvserver.jobs.model import Job
from mvserver.jobs.runner import DriverFactory
from mvserver.providers import Providers, Snapshot, VideoBackend, VideoRequest

VIDEO_REQUEST_FIELDS = ("negative_prompt", "aspect_ratio", "duration", "generate_audio", "seed")


class VideoDriver:
    """A video job on its provider backend (Replicate or Vertex Veo)."""

    def __init__(self, backend: VideoBackend, outputs: Artefacts):
        self.backend = backend
        self.outputs = outputs

    async def start(self, job: Job, webhook: str | None) -> str:
        reference = None
        if job.reference_mime_type:
            reference = await self.outputs.get_bytes(artefact_key("jobs", job.id, ".ref"))
        fields = {name: job.request[name] for name in VIDEO_REQUEST_FIELDS}
        request = VideoRequest(
            prompt=job.request["full_prompt"],
            reference_image=reference,
            reference_mime_type=job.reference_mime_type,
            webhook=webhook,
            cancel_after=job.seconds_left(),
            logs=job.provider_logs,
            **fields,
        )
        return await self.backend.start(request)

    async def poll(self, prediction_id: str) -> Snapshot:
        return await self.backend.poll(prediction_id)

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: str) -> int:
        return await self.backend.download(snapshot, prediction_id, dest)

    async def cancel(self, prediction_id: str) -> Snapshot | None:
        return await self.backend.cancel(prediction_id)


def video_kind(providers: Providers, outputs: Artefacts) -> DriverFactory:
    """The driver factory for ``video`` jobs."""
    return lambda job: VideoDriver(providers.video_backend(job.backend), outputs)
