"""One error shape for HTTP responses and job failures, and the mapping of provider failures onto it.

Every error body is ``{"error": {"code", "message", "field"?, "provider"?, "provider_status"?, "provider_error"?}}``.
A provider failure keeps the provider's own status (its HTTP code, or a prediction status such as ``failed``) in
``provider_status`` and its own words in ``provider_error``; ``code`` says what kind of failure it was.

No error shows a server path: a message built from an exception or from ffmpeg's output can name a file
(``/srv/mv/outputs/videos/<id>.mp4: Invalid data…``), so :class:`ErrorInfo` cuts every path under a directory of
this server (the output and settings directories, the checkout, the Python installation, the temporary and home
directories; :func:`hide_paths_under`) to its file name as it is made, for HTTP answers and job errors alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis.exceptions
from aiohttp import http_exceptions, web
from pydantic import ValidationError

log = logging.getLogger("mvserver")


_HIDDEN_DIRS: set[str] = set()
_HIDDEN: re.Pattern[str] | None = None
_PATH_TAIL = r"(?:/[^\s'\"`:,;()\[\]<>]*)*"  # the rest of a path, up to white space, quotes or punctuation


def hide_paths_under(*directories: Path | str) -> None:
    """Never show a path under these directories (as given and resolved) to a client: error texts name only the
    file. The app adds its output and settings directories."""
    global _HIDDEN
    for directory in directories:
        for form in {os.path.abspath(directory), os.path.realpath(directory)}:
            if form.rstrip("/"):
                _HIDDEN_DIRS.add(form.rstrip("/"))
    names = "|".join(re.escape(d) for d in sorted(_HIDDEN_DIRS, key=len, reverse=True))
    # Not inside a URL or a longer name (``host:8080/srv/…``): the path starts the text or follows a space, a quote,
    # a bracket, ``=`` or ``:``, and its directory ends where the name ends.
    _HIDDEN = re.compile(rf"(?<![\w.~%/-])(?:{names})(?![^/\s'\"`:,;()\[\]<>]){_PATH_TAIL}")


def without_paths(value: Any) -> Any:
    """``value`` (a text, or the strings inside a list or dict) with every server path cut to its last part."""
    if isinstance(value, str):
        if _HIDDEN is None or "/" not in value:
            return value
        return _HIDDEN.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or "/", value)
    if isinstance(value, dict):
        return {key: without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_paths(item) for item in value]
    return value


hide_paths_under(
    Path(__file__).resolve().parents[2],
    sys.prefix,
    sys.base_prefix,
    sys.exec_prefix,
    tempfile.gettempdir(),
    Path.home(),
)


@dataclass
class ErrorInfo:
    """What went wrong, in the shape clients see (HTTP body and failed-job event alike); its texts never carry a
    server path (:func:`without_paths`)."""

    code: str
    message: str
    field: str | None = None
    provider: str | None = None
    provider_status: int | str | None = None
    provider_error: Any = None
    budget: dict[str, Any] | None = None  # 402 budget_exceeded: the key's monthly limit, what is spent and left

    def __post_init__(self) -> None:
        self.message = without_paths(self.message)
        self.provider_error = without_paths(self.provider_error)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# -- the catalogue of error codes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCode:
    """One error code the service answers with: the HTTP statuses it comes with and what it means.

    ``statuses`` lists every status the code is answered with (the usual one first). Most codes have one; a code with
    two keeps both answers as the API always gave them (see its ``meaning``). No status: the code appears only inside
    an answer (a failed job's ``error``, a song's ``analysis_error``), never as an HTTP error itself."""

    statuses: tuple[int, ...]
    meaning: str


def _code(*statuses: int, meaning: str) -> ErrorCode:
    return ErrorCode(statuses, meaning)


# Every error code of the service. An ApiError must name a code from here with one of its statuses (checked when
# it is made, and for every ApiError written in the code by tests/test_errors_catalogue.py).
CODES: dict[str, ErrorCode] = {
    # -- requests: bodies, fields, ids, media types ---------------------------------------------------------------------
    "invalid_json": _code(400, meaning="the body is not a JSON object"),
    "invalid_field": _code(400, meaning="a field of the body, query or path is wrong (field names it)"),
    "missing_field": _code(400, meaning="a required field is missing"),
    "unknown_field": _code(400, meaning="the body has a field the route does not know"),
    "invalid_id": _code(400, meaning="an id in the path or body is not a UUID4"),
    "invalid_body": _code(400, meaning="a webhook body is not a prediction"),
    "incomplete_body": _code(400, meaning="the upload ended before its Content-Length"),
    "invalid_multipart": _code(400, meaning="a multipart upload is malformed"),
    "malformed_header": _code(400, meaning="the HTTP parser refused a header (field names it)"),
    "malformed_request": _code(400, meaning="the HTTP parser refused the request line or the body's framing"),
    "request_timeout": _code(408, meaning="the headers or the body did not arrive in time"),
    "request_too_large": _code(413, meaning="the body is larger than the route takes"),
    "unsupported_media_type": _code(415, meaning="the body's Content-Type is not one the route takes"),
    "range_not_satisfiable": _code(416, meaning="the Range header asks for bytes the file does not have"),
    "not_found": _code(404, meaning="no such resource (or another key's: never 403, so ids do not leak)"),
    "method_not_allowed": _code(405, meaning="the path does not take this method"),
    "expired": _code(410, meaning="the job finished long ago and was removed (jobs.retention_hours)"),
    "http_error": _code(meaning="any other status aiohttp answered (the status is aiohttp's)"),
    "internal_error": _code(500, meaning="an unexpected failure (logged); also a job that failed that way"),
    # -- access: keys, signed links, quotas, cross-site checks, idempotency ---------------------------------------------
    "auth_required": _code(401, meaning="the route needs Authorization: Bearer <API key>"),
    "invalid_api_key": _code(401, meaning="the API key is not valid (or has been revoked)"),
    "invalid_signature": _code(403, meaning="a signed link is tampered, malformed, not a GET, or its key is revoked"),
    "signature_expired": _code(403, meaning="a signed link has expired"),
    "forbidden_origin": _code(403, meaning="the Origin is neither this server nor in MV_CORS_ORIGINS"),
    "misdirected_request": _code(421, meaning="the Host is not in MV_ALLOWED_HOSTS"),
    "rate_limited": _code(429, meaning="the key's bucket for this route is empty (Retry-After)"),
    "quota_exceeded": _code(429, meaning="the key runs as many uploads as it may (max_concurrent_uploads)"),
    "budget_exceeded": _code(402, meaning="the key's monthly_budget is spent"),
    "busy": _code(503, meaning="this server runs as many uploads as it may (Retry-After)"),
    "idempotency_in_progress": _code(409, meaning="a request with this Idempotency-Key is still being answered"),
    "idempotency_key_reused": _code(422, meaning="this Idempotency-Key was used with another request"),
    "store_unavailable": _code(503, meaning="the job and project store (Redis) is unreachable (Retry-After)"),
    # -- jobs -----------------------------------------------------------------------------------------------------------
    "video_not_ready": _code(409, meaning="the job of this video is not finished"),
    "job_failed": _code(409, meaning="the job of this video failed (its error's words follow)"),
    "job_canceled": _code(409, meaning="the job of this video was canceled; also a canceled job's error"),
    "job_timeout": _code(meaning="a job's error: it was not done after jobs.timeout_seconds"),
    "deadline_exceeded": _code(meaning="a job's error: it was not done within its deadline_seconds"),
    "webhooks_not_configured": _code(400, meaning="a webhook_url, but no signing secret for this key's webhooks"),
    "nothing_to_redeliver": _code(409, meaning="the job has no webhook event to send again"),
    "webhook_unverified": _code(401, meaning="a Replicate webhook without a valid signature"),
    # -- projects -------------------------------------------------------------------------------------------------------
    "conflict": _code(409, meaning="the project changed meanwhile (a scene removed, kept changing); try again"),
    "precondition_required": _code(428, meaning="the change needs If-Match with the project's ETag"),
    "precondition_failed": _code(412, meaning="If-Match does not name the project's current ETag"),
    "too_many_scenes": _code(400, meaning="the project would have more scenes than projects.limits allows"),
    "too_many_versions": _code(409, meaning="the scene has as many clip versions running or chosen as it may"),
    "no_scenes": _code(400, meaning="the project has no scenes to assemble"),
    # -- songs ----------------------------------------------------------------------------------------------------------
    "invalid_audio": _code(400, meaning="the upload is not a song this server can decode"),
    "audio_too_long": _code(400, meaning="the song is longer than MV_MAX_AUDIO_SECONDS"),
    "audio_not_found": _code(400, meaning="the assembly names a song that does not exist"),
    "analysis_failed": _code(meaning="a song's analysis_error: it could not be analysed"),
    "analysis_timeout": _code(meaning="a song's analysis_error: its analysis took too long"),
    # -- lip sync and assembly ------------------------------------------------------------------------------------------
    "clip_not_found": _code(
        400,
        409,
        meaning="the body names a clip whose file does not exist: 400 when a request names it (assembly, lip sync); "
        "409 when a lip-sync job starts and the clip it was made for is gone (the job's error)",
    ),
    "clip_not_ready": _code(400, meaning="the body names a clip whose job has not succeeded"),
    "invalid_clip": _code(400, meaning="a clip cannot be read or holds no video"),
    "clip_too_large": _code(400, meaning="the clip is larger than lip sync takes"),
    "clip_too_long": _code(400, meaning="the clip is longer than lip sync takes"),
    "song_too_short": _code(400, meaning="the song ends before the window starts (or the clips need)"),
    "window_too_long": _code(400, meaning="the lip-sync window is longer than the limit"),
    "window_too_short": _code(400, meaning="the lip-sync window is shorter than the limit"),
    "aspect_mismatch": _code(400, meaning="the clips do not share one aspect ratio"),
    "assembly_too_long": _code(400, meaning="the music video would be longer than assembly.limits allows"),
    "graph_too_large": _code(400, meaning="the assembly's ffmpeg graph would be too large"),
    "invalid_trim": _code(400, meaning="a clip's trim is outside the clip"),
    "too_many_clips": _code(400, meaning="more clips than assembly.limits allows"),
    "invalid_assembly": _code(400, meaning="the assembly's inputs cannot be assembled (field names the part)"),
    "assembly_failed": _code(500, meaning="ffmpeg failed to assemble (the job's error)"),
    "assembly_timeout": _code(500, meaning="ffmpeg did not finish the assembly in time (the job's error)"),
    "assembly_too_large": _code(500, meaning="the assembled file is larger than allowed (the job's error)"),
    "audio_cut_failed": _code(500, meaning="ffmpeg failed to cut the song's window (the job's error)"),
    # -- providers ------------------------------------------------------------------------------------------------------
    "missing_api_key": _code(503, meaning="the provider's credentials are not set"),
    "client_disconnected": _code(499, meaning="the client went away while a provider call ran"),
    "provider_rejected_input": _code(422, meaning="the provider answered 400 or 422: it refused the input"),
    "provider_auth_failed": _code(502, meaning="the provider refused our credentials (401, 403, a bad key)"),
    "provider_payment_required": _code(502, meaning="the provider answered 402"),
    "provider_not_found": _code(502, meaning="the provider answered 404"),
    "provider_conflict": _code(409, meaning="the provider answered 409"),
    "provider_rate_limited": _code(429, meaning="the provider answered 429 (transient)"),
    "provider_timeout": _code(504, meaning="the provider did not answer in time, or answered 408 or 504 (transient)"),
    "provider_unavailable": _code(502, meaning="the provider answered 5xx (transient)"),
    "provider_unreachable": _code(502, meaning="the provider could not be reached (transient)"),
    "provider_bad_response": _code(502, meaning="the provider answered invalid JSON (transient)"),
    "provider_error": _code(502, meaning="another provider failure (another 4xx, an unexpected exception)"),
    "provider_prediction_failed": _code(502, meaning="the provider's prediction or operation failed"),
    "provider_canceled": _code(502, meaning="the provider canceled the prediction"),
    "provider_content_filtered": _code(502, meaning="the provider filtered the output (its reasons follow)"),
    "provider_bad_output": _code(502, meaning="the provider's output is not what was asked for"),
    "provider_malformed_output": _code(502, meaning="the provider's text output does not parse"),
    "provider_output_refused": _code(502, meaning="the provider's output is on a host not allowed"),
    "provider_output_too_large": _code(502, meaning="the provider's output is larger than allowed"),
}


class UnknownErrorCode(ValueError):
    """An ApiError made with a code, or a status for it, that :data:`CODES` does not list: a programming error."""


def check_code(status: int, code: str) -> None:
    """Raise :class:`UnknownErrorCode` unless ``code`` is catalogued with ``status``."""
    entry = CODES.get(code)
    if entry is None:
        raise UnknownErrorCode(f"error code {code!r} is not in mvserver.core.errors.CODES")
    if status not in entry.statuses:
        raise UnknownErrorCode(f"error code {code!r} is answered with {entry.statuses}, not {status}")


class StoreUnavailable(Exception):
    """The store cannot be reached at start-up (e.g. Redis is down): the server exits with one clear line."""


class ApiError(Exception):
    """An error answered to the client: an HTTP status plus an :class:`ErrorInfo`; the code and its status come from
    the catalogue, :data:`CODES`."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None, **extra: Any):
        check_code(status, code)  # every code, and its status, from the catalogue (CODES)
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(code=code, message=message, **extra)
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Worth retrying later: rate limits, provider outages, timeouts and dropped connections."""
        return self.info.code in TRANSIENT_CODES

    def response(self) -> web.Response:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else None
        return web.json_response({"error": self.info.to_dict()}, status=self.status, headers=headers)


TRANSIENT_CODES = {
    "provider_rate_limited",
    "provider_unavailable",
    "provider_unreachable",
    "provider_timeout",
    "provider_bad_response",
}

# Provider HTTP status -> (our HTTP status, our code). Anything else 4xx is a rejection, anything 5xx an outage.
_PROVIDER_STATUS_CODES = {
    400: (422, "provider_rejected_input"),
    401: (502, "provider_auth_failed"),
    402: (502, "provider_payment_required"),
    403: (502, "provider_auth_failed"),
    404: (502, "provider_not_found"),
    408: (504, "provider_timeout"),
    409: (409, "provider_conflict"),
    422: (422, "provider_rejected_input"),
    429: (429, "provider_rate_limited"),
}


def provider_http_error(
    provider: str, status: int, message: str, detail: Any = None, retry_after: float | None = None
) -> ApiError:
    """Map an HTTP error answered by a provider, keeping its status and words."""
    ours, code = _PROVIDER_STATUS_CODES.get(
        status, (502, "provider_unavailable" if status >= 500 else "provider_error")
    )
    if status == 504:
        ours, code = 504, "provider_timeout"
    return ApiError(
        ours,
        code,
        f"{provider} answered {status}: {message}",
        provider=provider,
        provider_status=status,
        provider_error=detail if detail is not None else message,
        retry_after=retry_after,
    )


def prediction_failed(provider: str, status: str, error: Any) -> ApiError:
    """A prediction or operation the provider accepted but then failed or canceled."""
    code = "provider_canceled" if status == "canceled" else "provider_prediction_failed"
    text = error if isinstance(error, str) else json.dumps(error) if error else status
    return ApiError(
        502,
        code,
        f"{provider} prediction {status}: {text}",
        provider=provider,
        provider_status=status,
        provider_error=error,
    )


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def from_exception(exc: BaseException, provider: str) -> ApiError:
    """Turn anything a provider SDK raised into an :class:`ApiError` that keeps the provider's status and text."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, httpx.HTTPError) and isinstance(exc.__cause__, aiohttp.ClientError):
        exc = exc.__cause__  # the aiohttp transport reports every dropped connection as a connect timeout
    # The provider SDKs are looked up, not imported: an exception of an SDK that no module has imported cannot be
    # raised, and importing them here would cost every process (the keys CLI, the simulator) about a second.
    replicate_errors = sys.modules.get("replicate.exceptions")
    genai_errors = sys.modules.get("google.genai.errors")
    if replicate_errors is not None and isinstance(exc, replicate_errors.ReplicateError):
        detail = {k: v for k, v in {"title": exc.title, "detail": exc.detail, "type": exc.type}.items() if v}
        message = exc.detail or exc.title or "error"
        return provider_http_error(
            provider, exc.status or 502, message, detail or None, _retry_after(getattr(exc, "response", None))
        )
    if replicate_errors is not None and isinstance(exc, replicate_errors.ModelError):
        prediction = exc.prediction
        return prediction_failed(provider, prediction.status, prediction.error)
    if genai_errors is not None and isinstance(exc, genai_errors.APIError):
        reported = exc.details if exc.details else exc.message
        message = f"{exc.status}: {exc.message}" if exc.status else str(exc.message)
        error = provider_http_error(provider, exc.code, message, reported, _retry_after(exc.response))
        if "API_KEY_INVALID" in json.dumps(reported, default=str):  # Google answers a bad key with 400
            error.status, error.info.code = 502, "provider_auth_failed"
        return error
    if isinstance(exc, json.JSONDecodeError):
        return ApiError(
            502, "provider_bad_response", f"{provider} answered with invalid JSON: {exc}", provider=provider
        )
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException)):
        return ApiError(504, "provider_timeout", f"{provider} did not answer in time", provider=provider)
    if isinstance(exc, (aiohttp.ClientError, ConnectionError, OSError, httpx.TransportError)):
        return ApiError(
            502,
            "provider_unreachable",
            f"could not reach {provider}: {exc.__class__.__name__}: {exc}",
            provider=provider,
        )
    log.exception("unexpected %s failure", provider, exc_info=exc)
    return ApiError(502, "provider_error", f"{provider} call failed: {exc.__class__.__name__}", provider=provider)


STORE_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""What a Redis client raises while Redis is down or restarting (loading its data included)."""


def store_unavailable(exc: BaseException) -> ApiError:
    """503 ``store_unavailable``: a request needed Redis (jobs, projects, quota buckets) and could not reach it.
    The detail (which may name the host) goes to the log, not to the client."""
    log.warning("store unavailable: %s: %s", exc.__class__.__name__, one_line(str(exc)))
    return ApiError(
        503, "store_unavailable", "the job and project store (Redis) is unreachable; try again shortly", retry_after=1
    )


def validation_error(exc: ValidationError) -> ApiError:
    """A request body that does not fit its schema: 400 naming the first bad field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    kind = first["type"]
    if kind == "missing":
        code, message = "missing_field", f"{field} is required"
    elif kind == "extra_forbidden":
        code, message = "unknown_field", f"{field} is not a known field"
    else:
        code, message = "invalid_field", f"{field}: {first['msg']}"
    return ApiError(400, code, message, field=field)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer every failure with the JSON error shape; never leak a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.text if exc.status == 413 and exc.text else exc.reason
        return web.json_response(
            {"error": {"code": code, "message": message}},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except asyncio.CancelledError:
        raise
    except STORE_UNAVAILABLE as exc:  # wherever on the request's path Redis was needed
        return store_unavailable(exc).response()
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response({"error": {"code": "internal_error", "message": "internal server error"}}, status=500)


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, except that a request its HTTP parser refuses (a malformed header or request line)
    is logged as one line rather than a traceback: it is the client's mistake, answered with 400. aiohttp logs it as
    an exception (here a warning), or at debug level for a bad method in a connection's first request."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, http_exceptions.HttpProcessingError):
            self.warning(f"{msg}: %s %s", *args, exc.code, one_line(str(exc.message)))
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        if isinstance(exc_info, http_exceptions.HttpProcessingError):
            super().debug(f"{msg}: %s %s", *args, exc_info.code, one_line(str(exc_info.message)), **kwargs)
        else:
            super().debug(msg, *args, exc_info=exc_info, **kwargs)


def one_line(text: str, limit: int = 200) -> str:
    """``text`` with its white space folded to single spaces, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def server_log() -> ServerLog:
    return ServerLog(logging.getLogger("aiohttp.server"), {})
