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
import replicate.exceptions
from aiohttp import http_exceptions, web
from google.genai import errors as genai_errors
from pydantic import BaseModel, ValidationError

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


class ApiError(Exception):
    """An error answered to the client: an HTTP status plus an :class:`ErrorInfo`."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None, **extra: Any):
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
    try:
        return float(headers.get("retry-after") or headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def from_exception(exc: BaseException, provider: str) -> ApiError:
    """Turn anything a provider SDK raised into an :class:`ApiError` that keeps the provider's status and text."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, httpx.HTTPError) and isinstance(exc.__cause__, aiohttp.ClientError):
        exc = exc.__cause__  # the aiohttp transport reports every dropped connection as a connect timeout
    if isinstance(exc, replicate.exceptions.ReplicateError):
        detail = {k: v for k, v in {"title": exc.title, "detail": exc.detail, "type": exc.type}.items() if v}
        message = exc.detail or exc.title or "error"
        return provider_http_error(
            provider, exc.status or 502, message, detail or None, _retry_after(getattr(exc, "response", None))
        )
    if isinstance(exc, replicate.exceptions.ModelError):
        prediction = exc.prediction
        return prediction_failed(provider, prediction.status, prediction.error)
    if isinstance(exc, genai_errors.APIError):
        detail = exc.details if exc.details else exc.message
        message = f"{exc.status}: {exc.message}" if exc.status else str(exc.message)
        error = provider_http_error(provider, exc.code, message, detail, _retry_after(exc.response))
        if "API_KEY_INVALID" in json.dumps(detail, default=str):  # Google answers a bad key with 400
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


def validate(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> tuple[Any, list[str]]:
    """``data`` as ``model`` (400 naming the first bad field, under ``prefix`` if given) and the names of the fields
    left to their defaults (filled from settings): the one validator of request bodies and of the requests that
    project actions build from a project."""
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        error = validation_error(exc)
        if prefix and error.info.field:
            error.info.field = f"{prefix}.{error.info.field}"
        raise error from None
    return parsed, [name for name in model.model_fields if name not in parsed.model_fields_set]


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


class ServerLog(logging.LoggerAdapter):
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
