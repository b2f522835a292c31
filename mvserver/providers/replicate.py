"""Replicate: ``google/imagen-4`` images and ``google/veo-3.1`` videos through the official async client.

We create predictions and poll them ourselves (``async_run`` returns ``None`` for a video that is still
processing), and fetch outputs with our own aiohttp session so the API token never reaches the file host; only from
the allowed output hosts, up to a size, and only when they are the expected media (:mod:`.outputs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import replicate
from httpx_aiohttp import AiohttpTransport
from replicate.client import RetryTransport
from replicate.exceptions import ReplicateError
from replicate.helpers import async_encode_json
from replicate.prediction import Prediction
from yarl import URL

from mvserver.core.artefacts import Artefacts
from mvserver.core.errors import ApiError, from_exception, prediction_failed, provider_http_error
from mvserver.providers.base import ProviderObserver, Snapshot, VideoRequest, observed_call
from mvserver.providers.outputs import Media, OutputHosts, checked_chunks, too_large

NAME = "replicate"
DOWNLOAD_CHUNK = 1 << 16
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
# Which webhooks a prediction gets: its start and its end. ``logs`` (at most one delivery every 500 ms while it runs,
# each an HTTP request, a signature check and a progress event here) only for a job that asked for the provider's
# log lines (``provider_logs``); without it, progress between the two comes from the ETA (``eta_seconds``).
WEBHOOK_EVENTS = ["start", "completed"]
WEBHOOK_EVENTS_WITH_LOGS = ["start", "logs", "completed"]
MAX_REDIRECTS = 5  # an output URL may redirect this often; each hop must be an allowed host too
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
ERROR_BODY_BYTES = 500  # of a failed download's body, kept for the error


def cancel_after_header(seconds: float) -> str:
    """A ``Cancel-After`` duration in Replicate's format (Go-style, e.g. ``90s``): whole seconds, rounded up, so
    the provider never stops a prediction before our own deadline does."""
    return f"{max(1, math.ceil(seconds))}s"


async def _raise_with_response(response: httpx.Response) -> None:
    """Raise Replicate's own error early so it keeps the response (its ``Retry-After`` header)."""
    if response.status_code >= 400:
        await response.aread()
        error = ReplicateError.from_response(response)
        error.response = response  # type: ignore[attr-defined]
        raise error


def _parsed(url: str) -> URL:
    """An output URL or redirect target as yarl parses it (the same object is checked and requested)."""
    try:
        return URL(url)
    except (ValueError, TypeError):
        raise ApiError(
            502,
            "provider_bad_output",
            f"{NAME} named an output that is not a URL",
            provider=NAME,
            provider_status="succeeded",
        ) from None


def make_client(token: str, base_url: str | None, timeout: float = 30.0) -> replicate.Client:
    """The official client; ``base_url`` points it at the simulator in sandbox mode and tests.

    Requests go through an aiohttp transport: httpcore's pool slows down with hundreds of polls in flight.
    The client's retry layer retries GETs on 429/503/504 up to ten times with its own waits; the job runner
    already retries with the configured attempts and delays, so that layer is told to try once.
    """
    aiohttp_transport = AiohttpTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=100))
    client = replicate.Client(
        api_token=token,
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        transport=aiohttp_transport,
        event_hooks={"response": [_raise_with_response]},
    )
    retry_layer = getattr(client._async_client, "_transport", None)  # the client wraps our transport in its retries
    if isinstance(retry_layer, RetryTransport):
        retry_layer.max_attempts = 1
    return client


def _model_path(model: str) -> str:
    """``/v1/models/{owner}/{name}`` of an official model named ``owner/name`` (a version is not one)."""
    owner, _, name = model.partition("/")
    if not owner or not name or "/" in name or ":" in name:
        raise ValueError(f"{model!r} is not a model name of the form owner/name")
    return f"/v1/models/{owner}/{name}"


def _is_file(value: Any) -> bool:
    """Whether an input holds a file the client library would upload (a path or an open file, or a list with
    one)."""
    if isinstance(value, (list, tuple)):
        return any(_is_file(item) for item in value)
    return isinstance(value, (io.IOBase, Path))


def _output_url(output: Any) -> str | None:
    """Replicate returns a URL, or a list of URLs, for file outputs."""
    if isinstance(output, list):
        output = output[0] if output else None
    return output if isinstance(output, str) else None


def prediction_from(data: dict[str, Any]) -> Prediction:
    """A prediction as the API sent it, ``aborted`` read as ``canceled`` (both end it unfinished)."""
    if data.get("status") == "aborted":
        data = {**data, "status": "canceled"}
    return Prediction(**data)


def snapshot(prediction: Prediction) -> Snapshot:
    """Our view of a Replicate prediction; progress is parsed from its logs by the client library."""
    progress = prediction.progress
    error = None
    if prediction.status in ("failed", "canceled"):
        error = prediction_failed(NAME, prediction.status, prediction.error).info
    return Snapshot(
        status=prediction.status,
        progress=progress.percentage if progress else None,
        logs=prediction.logs,
        output=_output_url(prediction.output),
        error=error,
        metrics=_metrics(getattr(prediction, "metrics", None)),  # absent from some webhook bodies
    )


def _metrics(metrics: Any) -> dict[str, Any] | None:
    """Replicate's numeric metrics (``predict_time``, ``total_time``, ...); None when it reported none."""
    if not isinstance(metrics, dict):
        return None
    kept = {
        k: v
        for k, v in metrics.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return kept or None


class ReplicateProvider:
    """Images and videos on Replicate, behind the :class:`~mvserver.providers.base.VideoBackend` interface."""

    name = NAME
    observe: ProviderObserver | None = None  # set by the app when metrics are on

    def __init__(
        self,
        client: replicate.Client,
        session: aiohttp.ClientSession,
        store: Artefacts,
        *,
        video_model: str,
        request_timeout: float,
        sandbox: bool,
        output_hosts: OutputHosts,
        video_max_bytes: int,
        image_max_bytes: int,
    ):
        self.client = client
        self.session = session
        self.store = store
        self.model = video_model
        self.request_timeout = request_timeout
        self.sandbox = sandbox
        self.output_hosts = output_hosts
        self.video_max_bytes = video_max_bytes
        self.image_max_bytes = image_max_bytes
        self._api_session: aiohttp.ClientSession | None = None  # creates and polls (see _api), opened at the first

    async def aclose(self) -> None:
        await self.client._async_client.aclose()
        if self._api_session is not None:
            await self._api_session.close()

    async def _call(self, coro: Any, operation: str = "call") -> Any:
        """Await one API call; map its failure to ApiError and report its time to ``observe`` (metrics)."""
        return await observed_call(NAME, self.observe, coro, operation)

    async def create(
        self,
        model: str,
        inputs: dict[str, Any],
        webhook: str | None = None,
        *,
        cancel_after: float | None = None,
        logs: bool = False,
    ) -> Prediction:
        """Create a prediction of an official model (``owner/name``); POSTs are never retried by the client.
        With ``webhook``, Replicate pushes its start and end there, and with ``logs`` its new logs too (at most every
        500 ms); with ``cancel_after`` (seconds), Replicate cancels the prediction itself at that deadline (its
        ``Cancel-After`` header)."""
        hook: dict[str, Any] = {}
        if webhook:
            hook = {"webhook": webhook, "webhook_events_filter": WEBHOOK_EVENTS_WITH_LOGS if logs else WEBHOOK_EVENTS}
        headers = {"Content-Type": "application/json"}
        if cancel_after is not None:
            headers["Cancel-After"] = cancel_after_header(cancel_after)
        return await self._call(self._create(model, inputs, hook, headers), "create")

    async def _create(
        self, model: str, inputs: dict[str, Any], hook: dict[str, Any], headers: dict[str, str]
    ) -> Prediction:
        """``POST /v1/models/{owner}/{name}/predictions`` (see :meth:`_api`). A file among the inputs (the reference
        image) is first uploaded through the files API by the client library and replaced by its URL, as the
        client's own create does."""
        if any(_is_file(value) for value in inputs.values()):
            inputs = await async_encode_json(inputs, client=self.client)
        body = json.dumps({"input": inputs, **hook}).encode()
        return await self._api("POST", f"{_model_path(model)}/predictions", body, headers)

    async def get(self, prediction_id: str) -> Prediction:
        return await self._call(self._api("GET", f"/v1/predictions/{prediction_id}"), "get")

    async def _api(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Prediction:
        """One prediction call (a create or a poll) sent with aiohttp directly, with the client's own base URL,
        token and user agent; ``aborted`` (a ``Cancel-After`` deadline reached before the prediction ran, a status
        the client library's model does not know) is read as ``canceled``.

        Through the client library (httpx, its retry and hook layers, then the same aiohttp transport) a call cost
        ~1 ms more of CPU, and every job creates one prediction and polls it at least once. As there, a create
        sends no ``Prefer: wait`` (the answer comes at once, the prediction still starting) and is never retried
        here. Failures are what the client would raise: a ``ReplicateError`` carrying the response (its
        ``Retry-After``), the transport's errors and timeouts as such; unlike the client's create, which waited
        without a limit, a create that gets no answer times out like a poll (``request_timeout``)."""
        api = self.client._async_client
        if self._api_session is None or self._api_session.closed:
            # httpx's TLS context (certifi), as the client's transport has it; no connection limit, as there
            tls = httpx.create_ssl_context()
            self._api_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=tls))
        timeout = aiohttp.ClientTimeout(sock_connect=min(self.request_timeout, 5.0), sock_read=self.request_timeout)
        url = f"{str(api.base_url).rstrip('/')}{path}"
        sent = {
            "Authorization": api.headers["Authorization"],
            "User-Agent": api.headers["User-Agent"],
            **(headers or {}),
        }
        async with self._api_session.request(
            method, url, data=body, headers=sent, timeout=timeout, allow_redirects=False
        ) as response:
            answer = await response.read()
            if response.status >= 400:
                failed = httpx.Response(
                    response.status,
                    headers=list(response.headers.items()),
                    content=answer,
                    request=httpx.Request(method, url),
                )
                error = ReplicateError.from_response(failed)
                error.response = failed  # type: ignore[attr-defined]
                raise error
        return prediction_from(json.loads(answer))

    async def cancel(self, prediction_id: str) -> Snapshot:
        """Cancel; the answer is the prediction as it ended (its metrics say how long it ran, which it costs)."""
        return snapshot(await self._call(self.client.predictions.async_cancel(prediction_id), "cancel"))

    async def webhook_secret(self) -> str:
        """The account's webhook signing secret (``whsec_...``)."""
        return (await self._call(self.client.webhooks.default.async_secret(), "webhook_secret")).key

    async def fetch(self, url: str, limit: int) -> aiohttp.ClientResponse:
        """Open an output URL for streaming: only an allowed host is asked (and each redirect is checked before it
        is followed), and a declared length over ``limit`` is refused; ApiError on an HTTP error."""
        target = _parsed(url)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout, sock_read=self.request_timeout)
        for _ in range(MAX_REDIRECTS + 1):
            self.output_hosts.check(target, NAME)
            try:
                response = await self.session.get(target, timeout=timeout, allow_redirects=False)
            except Exception as exc:
                raise from_exception(exc, NAME) from exc
            location = response.headers.get(aiohttp.hdrs.LOCATION) if response.status in _REDIRECTS else None
            if location is None:
                break
            response.release()
            target = target.join(_parsed(location))
        else:
            raise ApiError(
                502,
                "provider_bad_output",
                f"{NAME} output redirected more than {MAX_REDIRECTS} times",
                provider=NAME,
                provider_status="succeeded",
            )
        if response.status != 200:
            try:
                text = (await response.content.read(ERROR_BODY_BYTES)).decode(errors="replace")
            except Exception:
                text = ""
            response.release()
            raise provider_http_error(NAME, response.status, f"output download failed: {text}")
        if response.content_length is not None and response.content_length > limit:
            response.release()
            raise too_large(NAME, limit)
        return response

    async def _chunks(self, url: str, limit: int, media: Media) -> AsyncGenerator[bytes, None]:
        """The output's bytes, checked as they arrive (:func:`~.outputs.checked_chunks`); transport failures as
        ApiError."""
        response = await self.fetch(url, limit)
        try:
            async for chunk in checked_chunks(
                response.content.iter_chunked(DOWNLOAD_CHUNK), limit=limit, media=media, provider=NAME
            ):
                yield chunk
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise from_exception(exc, NAME) from exc
        finally:
            response.release()

    async def download_to(self, url: str, dest: str) -> int:
        """Stream an output video into the artefact ``dest`` atomically and create-only, chunk by chunk, never
        holding it whole; nothing is kept when it is too large or not an MP4."""
        async with contextlib.aclosing(self._chunks(url, self.video_max_bytes, "mp4")) as chunks:
            return await self.store.put_stream(dest, chunks, create_only=True)

    async def read(self, url: str) -> bytes:
        """An output image, whole (at most ``image_max_bytes``)."""
        async with contextlib.aclosing(self._chunks(url, self.image_max_bytes, "image")) as chunks:
            return b"".join([chunk async for chunk in chunks])

    # -- images -------------------------------------------------------------------------------------------

    async def generate_image(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        timeout: float,
        poll_interval: float,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> tuple[bytes, Prediction]:
        """Run an image prediction to the end within ``timeout`` seconds; cancel it if we stop waiting (timeout,
        cancellation, or ``abandoned()`` turning true because the client went away)."""
        prediction = await self.create(model, inputs)
        deadline = time.monotonic() + timeout
        try:
            while prediction.status not in ("succeeded", "failed", "canceled"):
                if time.monotonic() >= deadline:
                    raise ApiError(
                        504,
                        "provider_timeout",
                        f"{NAME} prediction {prediction.id} did not finish in {timeout:g} s",
                        provider=NAME,
                        provider_status=prediction.status,
                    )
                if abandoned():
                    raise ApiError(
                        499,
                        "client_disconnected",
                        "the client closed the connection; prediction canceled",
                        provider=NAME,
                        provider_status=prediction.status,
                    )
                await asyncio.sleep(poll_interval)
                prediction = await self.get(prediction.id)
        except BaseException:
            await self._cancel_quietly(prediction.id)
            raise
        if prediction.status != "succeeded":
            raise prediction_failed(NAME, prediction.status, prediction.error)
        url = _output_url(prediction.output)
        if not url:
            raise ApiError(
                502,
                "provider_bad_output",
                f"{NAME} prediction {prediction.id} succeeded without an output file",
                provider=NAME,
                provider_status=prediction.status,
            )
        return await self.read(url), prediction

    async def _cancel_quietly(self, prediction_id: str) -> None:
        try:
            await asyncio.shield(self.cancel(prediction_id))
        except (ApiError, asyncio.CancelledError):
            pass

    # -- videos (VideoBackend) ------------------------------------------------------------------------------

    def video_inputs(self, request: VideoRequest) -> dict[str, Any]:
        """The ``google/veo-3.1`` input object."""
        inputs: dict[str, Any] = {
            "prompt": request.prompt,
            "aspect_ratio": request.aspect_ratio,
            "duration": request.duration,
            "generate_audio": request.generate_audio,
        }
        if request.negative_prompt:
            inputs["negative_prompt"] = request.negative_prompt
        if request.seed is not None:
            inputs["seed"] = request.seed
        if request.reference_image is not None:
            image = io.BytesIO(request.reference_image)
            image.name = "reference" + _EXTENSIONS.get(request.reference_mime_type or "", ".png")
            inputs["reference_images"] = [image]  # uploaded through the files API by the client
        return inputs

    async def start(self, request: VideoRequest) -> str:
        prediction = await self.create(
            self.model,
            self.video_inputs(request),
            request.webhook,
            cancel_after=request.cancel_after,
            logs=request.logs,
        )
        return prediction.id

    async def poll(self, prediction_id: str) -> Snapshot:
        return snapshot(await self.get(prediction_id))

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: str) -> int:
        if not snapshot.output:
            raise ApiError(
                502,
                "provider_bad_output",
                f"{NAME} prediction {prediction_id} succeeded without a video",
                provider=NAME,
                provider_status=snapshot.status,
            )
        return await self.download_to(snapshot.output, dest)
