"""Serving the app: ``web.run_app``'s loop, with a runner whose connections answer every request aiohttp's HTTP
parser refuses (a malformed header or request line) with the JSON error shape instead of aiohttp's plain text.

aiohttp answers such a request from ``RequestHandler.handle_error``, before any route or middleware runs, and offers
no hook for its body; the only seam is the class of the connection handler, which ``web.Server`` builds.
"""

from __future__ import annotations

import ast
import asyncio
import re
from contextlib import suppress
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .errors import ErrorInfo, one_line

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
    them through the server logger (one line for a parser error, see :class:`~mvserver.errors.ServerLog`) and closes
    the connection; no traceback reaches the body, debug mode or not."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
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
    """``web.Server`` whose connections are :class:`JsonErrorRequestHandler`."""

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` (app start-up, shutdown and clean-up as usual) serving through :class:`JsonErrorServer`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(server.request_handler, request_factory=server.request_factory,
                               handler_cancellation=server.handler_cancellation, **server._kwargs)


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


def run_app(app: web.Application, *, host: str, port: int, access_log_class: type[AbstractAccessLogger]) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, as ``web.run_app`` does (same keep-alive and shutdown timeouts, tasks
    left over canceled, the loop closed); start-up errors (an address in use, a store down) propagate."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, host, port, access_log_class=access_log_class,
                                   keepalive_timeout=75.0, shutdown_timeout=60.0))
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
            loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                         "exception": task.exception(), "task": task})
