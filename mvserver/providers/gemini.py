"""Google: Gemini scene writing (Gemini API key) and Veo videos (Vertex mode) through the async google-genai client.

google-genai 3.x serves Veo only in Vertex mode, so videos use a second client built from the Vertex settings
(an express-mode API key, or a project with application-default credentials).
"""

from __future__ import annotations

from typing import Any

from google import genai
from google.genai import types
from pydantic import BaseModel

from mvserver.core.artefacts import Artefacts
from mvserver.core.errors import ApiError, ErrorInfo, prediction_failed
from mvserver.providers.base import ProviderObserver, Snapshot, VideoRequest, observed_call
from mvserver.providers.outputs import check_media, too_large

NAME = "gemini"


# google-genai sleeps 1-10 s and retries a failed connection unless retry options are given; our callers decide
# about retries themselves (the job runner retries transient errors, scene requests fail fast).
NO_SDK_RETRY = types.HttpRetryOptions(attempts=1)


def make_api_client(api_key: str | None, base_url: str | None) -> genai.Client:
    """Client for the Gemini Developer API (scene writing)."""
    options = types.HttpOptions(base_url=base_url, retry_options=NO_SDK_RETRY)
    return genai.Client(api_key=api_key, http_options=options)


def make_vertex_client(
    *, api_key: str | None, project: str | None, location: str, base_url: str | None, timeout: float = 30.0
) -> genai.Client:
    """Client for Vertex AI (Veo): an express-mode API key, or project + location with default credentials."""
    options = types.HttpOptions(base_url=base_url, timeout=int(timeout * 1000), retry_options=NO_SDK_RETRY)
    if api_key:
        return genai.Client(vertexai=True, api_key=api_key, http_options=options)
    return genai.Client(vertexai=True, project=project, location=location, http_options=options)


def _operation_error(error: dict[str, Any]) -> ErrorInfo:
    status = error.get("status") or error.get("code") or "failed"
    info = prediction_failed(NAME, "failed", error).info
    info.provider_status = status
    info.message = f"{NAME} operation failed: {error.get('message') or status}"
    return info


class GeminiProvider:
    """Scene writing and Veo video operations; each client is optional (a missing key means not configured)."""

    name = NAME
    observe: ProviderObserver | None = None  # set by the app when metrics are on

    def __init__(
        self,
        api_client: genai.Client | None,
        vertex_client: genai.Client | None,
        store: Artefacts,
        *,
        video_model: str,
        person_generation: str,
        resolution: str,
        sandbox: bool,
        video_sandbox: bool,
        video_max_bytes: int,
    ):
        self.api_client = api_client
        self.vertex_client = vertex_client
        self.store = store
        self.model = video_model
        self.person_generation = person_generation
        self.resolution = resolution
        self.scenes_sandbox = sandbox
        self.sandbox = video_sandbox
        self.video_max_bytes = video_max_bytes

    async def aclose(self) -> None:
        for client in (self.api_client, self.vertex_client):
            if client is not None:
                await client.aio.aclose()

    async def _call(self, coro: Any, operation: str = "call") -> Any:
        """Await one API call; map its failure to ApiError and report its time to ``observe`` (metrics)."""
        return await observed_call(NAME, self.observe, coro, operation)

    # -- text ------------------------------------------------------------------------------------------------

    async def generate_json(
        self,
        model: str,
        prompt: str,
        schema: type[BaseModel],
        *,
        temperature: float,
        timeout: float,
        context: str | None = None,
        audio: tuple[bytes, str] | None = None,
    ) -> tuple[BaseModel | None, str]:
        """Ask for JSON matching ``schema``; return the parsed reply (None if it does not validate) and its raw text.

        ``context`` is a second text part after the prompt; ``audio`` (bytes, MIME type) an inline audio part
        (``Part.from_bytes``: inline data works on the Gemini API and on Vertex alike, while the Files API exists
        only on the Gemini API), so a request must stay under the inline limit (20 MB in all)."""
        if self.api_client is None:
            raise ApiError(503, "missing_api_key", "GEMINI_API_KEY is not set", provider=NAME)
        config = types.GenerateContentConfig(
            response_mime_type="application/json",
            response_schema=schema,
            temperature=temperature,
            http_options=types.HttpOptions(timeout=int(timeout * 1000)),
        )
        contents: Any = prompt
        if context is not None or audio is not None:
            parts = [types.Part.from_text(text=prompt)]
            if context is not None:
                parts.append(types.Part.from_text(text=context))
            if audio is not None:
                parts.append(types.Part.from_bytes(data=audio[0], mime_type=audio[1]))
            contents = [types.Content(role="user", parts=parts)]
        response = await self._call(
            self.api_client.aio.models.generate_content(model=model, contents=contents, config=config),
            "generate_content",
        )
        parsed = response.parsed if isinstance(response.parsed, schema) else None
        return parsed, response.text or ""

    # -- videos (VideoBackend) --------------------------------------------------------------------------------

    def _video_client(self) -> genai.Client:
        if self.vertex_client is None:
            raise ApiError(
                503, "missing_api_key", "Veo needs GOOGLE_VERTEX_API_KEY or GOOGLE_CLOUD_PROJECT", provider=NAME
            )
        return self.vertex_client

    async def start(self, request: VideoRequest) -> str:
        image = None
        if request.reference_image is not None:
            image = types.Image(
                image_bytes=request.reference_image, mime_type=request.reference_mime_type or "image/png"
            )
        config = types.GenerateVideosConfig(
            number_of_videos=1,
            duration_seconds=request.duration,
            aspect_ratio=request.aspect_ratio,
            resolution=self.resolution,
            generate_audio=request.generate_audio,
            person_generation=self.person_generation,
            negative_prompt=request.negative_prompt or None,
            seed=request.seed,
        )
        operation = await self._call(
            self._video_client().aio.models.generate_videos(
                model=self.model, source=types.GenerateVideosSource(prompt=request.prompt, image=image), config=config
            ),
            "generate_videos",
        )
        return operation.name

    async def _operation(self, name: str) -> types.GenerateVideosOperation:
        return await self._call(
            # google-genai declares ``name`` on its Operation mixin, which pydantic's typing does not see as a field
            self._video_client().aio.operations.get(types.GenerateVideosOperation(name=name)),  # type: ignore[call-arg]
            "get_operation",
        )

    async def poll(self, prediction_id: str) -> Snapshot:
        operation = await self._operation(prediction_id)
        if not operation.done:
            return Snapshot(status="processing")
        if operation.error:
            return Snapshot(status="failed", error=_operation_error(operation.error))
        response = operation.response
        videos = response.generated_videos if response else None
        if not videos or videos[0].video is None:
            reasons = response.rai_media_filtered_reasons if response else None
            info = prediction_failed(NAME, "filtered", reasons or "no video in the response").info
            info.code = "provider_content_filtered" if reasons else "provider_bad_output"
            return Snapshot(status="failed", error=info)
        return Snapshot(status="succeeded", output=videos[0].video.uri or "inline")

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: str) -> int:
        """Vertex returns the video inline (base64 in the operation); write it atomically, unless it is over the size
        cap or not an MP4."""
        operation = await self._operation(prediction_id)
        videos = operation.response.generated_videos if operation.response else None
        video = videos[0].video if videos else None
        if video is None or not video.video_bytes:
            where = video.uri if video else None
            raise ApiError(
                502,
                "provider_bad_output",
                f"{NAME} operation has no inline video (uri: {where}); set no output_gcs_uri",
                provider=NAME,
                provider_status="succeeded",
            )
        if len(video.video_bytes) > self.video_max_bytes:
            raise too_large(NAME, self.video_max_bytes)
        check_media(video.video_bytes[:16], "mp4", NAME)
        await self.store.put_bytes(dest, video.video_bytes, create_only=True)
        return len(video.video_bytes)

    async def cancel(self, prediction_id: str) -> None:
        """google-genai has no cancel for Veo operations: the job stops polling and the operation runs out."""
        return None
