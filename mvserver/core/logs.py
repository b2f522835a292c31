"""Request ids (``X-Request-Id`` in and out) and the log format (``MV_LOG_FORMAT=text|json``).

Every request gets an id: the client's ``X-Request-Id`` when it is short and plain, a fresh one otherwise. It is
echoed in the response and carried by every log line written while the request runs (JSON lines: ``request_id``).
A job's task is bound to its job id (:func:`bind_job`), so every line it writes carries ``job_id`` as well; a log
call may also pass ``extra={"job_id": ...}``. Signed-link signatures are cut from logged URLs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

REQUEST_ID = web.RequestKey("request_id", str)
_current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SIGNATURE = re.compile(r"(?<=[?&]sig=)[^&\s]+")
EXTRA_FIELDS = ("job_id", "key_id")


def redact(text: str) -> str:
    return _SIGNATURE.sub("REDACTED", text)


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if incoming and _CLIENT_ID.fullmatch(incoming) else secrets.token_hex(16)
    request[REQUEST_ID] = request_id
    token = _current_request_id.set(request_id)
    try:
        return await handler(request)
    finally:
        _current_request_id.reset(token)


def bind_job(job_id: str) -> None:
    """Mark the running task (and the tasks it starts) as working for ``job_id``: its log lines carry the id.
    Call it at the top of the job's own task; each task runs in its own copy of the context."""
    _current_job_id.set(job_id)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs before the headers go out, so streamed answers (SSE, files) carry it too."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (None outside a request) and job id (None outside a job) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _current_request_id.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = _current_job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any known extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in ("request_id", *EXTRA_FIELDS, "method", "path", "status", "bytes", "seconds"):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class AccessLogger(AbstractAccessLogger):
    """One line per request, as ``%r %s %b %Tfs`` did, without signatures; structured fields for JSON lines."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        line = redact(f"{request.method} {request.path_qs} HTTP/{request.version.major}.{request.version.minor}")
        self.logger.info(
            "%s %s %s %06fs",
            line,
            response.status,
            response.body_length,
            time,
            extra={
                "request_id": request.get(REQUEST_ID),
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "bytes": response.body_length,
                "seconds": round(time, 6),
            },
        )


def configure_logging(log_format: str) -> None:
    """Root logging for ``python -m mvserver``: text lines as before, or JSON lines."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
