"""Serving the app: ``web.run_app``'s loop, with a runner whose connections answer every request aiohttp's HTTP
parser refuses (a malformed header or request line) with the JSON error shape instead of aiohttp's plain text, and
close a connection whose request headers do not arrive in time.

aiohttp answers such a request from ``RequestHandler.handle_error``, before any route or middleware runs, and offers
no hook for its body; the only seam is the class of the connection handler, which ``web.Server`` builds.

aiohttp's only timeout before a request's headers are complete is ``keepalive_timeout`` (75 s here), counted from
the connection's start or its last response, so a client trickling header bytes held a connection (and its memory)
that long. :class:`JsonErrorRequestHandler` adds a header timeout (``MV_HEADER_TIMEOUT_SECONDS``): from a new
connection, or from the first byte of the next request on a kept-alive one, the headers must be complete within it;
otherwise the connection gets ``408 request_timeout`` (or, if it sent nothing, is just closed). An idle kept-alive
connection is still governed by ``keepalive_timeout`` alone. Request bodies have their own limits in the handlers
that read them (``upload_audio``).
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
from contextlib import suppress
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from mvserver.core.errors import ErrorInfo, one_line

# llhttp's messages read ``<what>:\n\n  <the offending line as a bytes repr>\n  <caret>``.
_PARSER_MESSAGE = re.compile(r"(?P<what>[^\n]*?):\n\n  (?P<line>b(?P<q>['\"]).*(?P=q))\n")
_DUPLICATE = re.compile(r"Duplicate '(?P<name>[^']{1,100})' header found\.")
_HEADER_WORDS = ("header", "content-length", "transfer-encoding")


def parser_error(exc: HttpProcessingError) -> ErrorInfo:
    """What a request the HTTP parser refused did wrong: ``malformed_header`` naming the header (``field``) when the
    parser shows it, ``malformed_request`` for the request line, the framing of the body or a line over the size
    limit (the parser does not say whether that line was the request line or a header)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        return ErrorInfo("malformed_request", f"a request line or header is longer than {limit} bytes")
    message = str(exc.message)
    match = _PARSER_MESSAGE.match(message)
    if match is None:
        duplicate = _DUPLICATE.fullmatch(message)
        if duplicate:
            return ErrorInfo("malformed_header", f"header '{duplicate['name']}' is sent twice", field=duplicate["name"])
        code = "malformed_header" if any(word in message.lower() for word in _HEADER_WORDS) else "malformed_request"
        return ErrorInfo(code, one_line(message) or "malformed request")
    what = match["what"]
    if not any(word in what.lower() for word in _HEADER_WORDS):
        return ErrorInfo("malformed_request", one_line(f"{what}: {match['line']}"))
    try:
        line = ast.literal_eval(match["line"]).decode("latin-1")
    except (ValueError, SyntaxError, AttributeError):
        line = ""
    name = line.split(":", 1)[0]
    if not name or name[0] in " \t":  # a continuation line: the parser does not show which header it continued
        return ErrorInfo("malformed_header", one_line(f"{what}: {match['line']}"))
    name = one_line(name.encode("latin-1").decode("ascii", "backslashreplace"))
    return ErrorInfo("malformed_header", f"malformed header '{name}': {what[:1].lower()}{what[1:]}", field=name)


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering the errors it handles itself with the JSON error shape. It still logs
    them through the server logger (one line for a parser error, see :class:`~mvserver.core.errors.ServerLog`) and closes
    the connection; no traceback reaches the body, debug mode or not. With ``header_timeout``, a request's headers
    must arrive within that many seconds (see the module docstring)."""

    __slots__ = ("_header_timeout", "_header_timer", "_header_bytes")

    def __init__(self, manager: web.Server, *, header_timeout: float | None = None, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = False  # some bytes of the awaited request arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()  # a new connection must send its first request in time

    def data_received(self, data: bytes) -> None:
        if data and not self._request_in_progress and not self._messages:
            self._header_bytes = True
            if self._header_timer is None:
                self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self._messages:  # a whole request line and header block arrived (or a parser error to answer)
            self._cancel_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timeout is not None and self._header_timeout > 0:
            self._header_timer = self._loop.call_later(self._header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        self._header_bytes = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport is None or self._force_close or self._request_in_progress or self._messages:
            return
        if self._waiter is None:  # still finishing the last request (draining its unread body): look again later
            self._arm_header_timer()
            return
        if self._header_bytes:
            info = ErrorInfo(
                "request_timeout",
                f"the request headers did not arrive within {self._header_timeout:g} s (MV_HEADER_TIMEOUT_SECONDS)",
            )
            body = json.dumps({"error": info.to_dict()}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        self.force_close()  # the transport sends what is buffered, then closes

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if part of a response went out already
        if status == HTTPStatus.BAD_REQUEST and isinstance(exc, HttpProcessingError):
            info = parser_error(exc)
        elif status >= 500:
            info = ErrorInfo("internal_error" if status == 500 else "http_error", HTTPStatus(status).phrase.lower())
        else:
            info = ErrorInfo("http_error", one_line(message or HTTPStatus(status).phrase))
        response = web.json_response({"error": info.to_dict()}, status=status)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """``web.Server`` whose connections are :class:`JsonErrorRequestHandler` (with ``header_timeout``)."""

    def __init__(self, *args: Any, header_timeout: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` (app start-up, shutdown and clean-up as usual) serving through :class:`JsonErrorServer`;
    ``header_timeout`` (seconds, None for none) bounds how long a request's headers may take to arrive."""

    def __init__(self, app: web.Application, *, header_timeout: float | None = None, **kwargs: Any):
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            header_timeout=self.header_timeout,
            **server._kwargs,
        )


async def _serve(app: web.Application, host: str, port: int, **runner_args: Any) -> None:
    runner = AppRunner(app, handle_signals=True, **runner_args)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)", flush=True)
        await asyncio.Event().wait()  # until SIGINT or SIGTERM raises GracefulExit
    finally:
        await runner.cleanup()


def run_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    access_log_class: type[AbstractAccessLogger],
    header_timeout: float | None = None,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, as ``web.run_app`` does (same keep-alive and shutdown timeouts, tasks
    left over canceled, the loop closed), with a ``header_timeout`` on every request's headers; start-up errors (an
    address in use, a store down) propagate."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(
        _serve(
            app,
            host,
            port,
            access_log_class=access_log_class,
            header_timeout=header_timeout,
            keepalive_timeout=75.0,
            shutdown_timeout=60.0,
        )
    )
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {"message": "unhandled exception during shutdown", "exception": task.exception(), "task": task}
            )
