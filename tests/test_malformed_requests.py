"""Requests aiohttp's HTTP parser refuses (a malformed header or request line) are answered with the JSON error shape,
status 400, naming the header when the parser shows it, and logged as one line without a traceback: on the runner
``python -m mvserver`` uses, in this process and as a real process."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from helpers import PROJECT, module_loop, running_server

from mvserver.app import create_app
from mvserver.web.serving import AppRunner

HEAD = b"GET /api/mv/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
# (raw request, code, field); field None: the answer names no header
MALFORMED = {
    "no colon": (HEAD + b"NoColonHere\r\n\r\n", "malformed_header", "NoColonHere"),
    "space in the name": (HEAD + b"Bad Header: v\r\n\r\n", "malformed_header", "Bad Header"),
    "space before the colon": (HEAD + b"X-Mood : calm\r\n\r\n", "malformed_header", "X-Mood"),
    "byte 0xff in the name": (HEAD + b"Bad\xffName: v\r\n\r\n", "malformed_header", "Bad\\xffName"),
    "control byte in a value": (HEAD + b"X-Mood: a\x01b\r\n\r\n", "malformed_header", "X-Mood"),
    "NUL in a value": (HEAD + b"X-Mood: a\x00b\r\n\r\n", "malformed_header", "X-Mood"),
    "bad Content-Length": (
        b"POST /api/mv/create_scenes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        "malformed_header",
        "Content-Length",
    ),
    "two Content-Types": (HEAD + b"Content-Type: a/b\r\nContent-Type: c/d\r\n\r\n", "malformed_header", "Content-Type"),
    "folded header": (HEAD + b"X-Mood: a\r\n b\r\n\r\n", "malformed_header", None),
    "too many headers": (HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n", "malformed_header", None),
    "over-long header": (HEAD + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n", "malformed_request", None),
    "over-long name": (HEAD + b"X" * 9000 + b": v\r\n\r\n", "malformed_request", None),
    "over-long URL": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "malformed_request", None),
    "bad method": (b"G@T / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "malformed_request", None),
    "bad chunk size": (
        b"POST /api/mv/create_scenes HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "malformed_request",
        None,
    ),
}


def split_answer(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def assert_json_error(answer: bytes, code: str, field: str | None) -> None:
    status, headers, body = split_answer(answer)
    assert status == 400, answer
    assert headers["content-type"].split(";")[0] == "application/json", headers
    error = body["error"]
    assert set(body) == {"error"} and error["code"] == code, body
    assert isinstance(error["message"], str) and 0 < len(error["message"]) <= 200 and "\n" not in error["message"]
    assert set(error) == ({"code", "message", "field"} if field else {"code", "message"}), body
    assert error.get("field") == field, body


async def send_raw(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), 10)  # the server closes the connection after the answer
    finally:
        writer.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[int]:
    """The app behind the runner ``python -m mvserver`` uses, on a free port of 127.0.0.1 (one for the module: each
    test sends its request on a connection of its own)."""
    outputs = tmp_path_factory.mktemp("served") / "outputs"
    env = {"MV_SANDBOX": "true", "MV_OUTPUT_DIR": str(outputs), "MV_SETTINGS_DIR": str(PROJECT / "settings")}
    runner = AppRunner(create_app(env))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("case", list(MALFORMED))
@module_loop
async def test_a_malformed_request_gets_the_json_error_shape(
    served: int, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw, code, field = MALFORMED[case]
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        assert_json_error(await send_raw(served, raw), code, field)
    server_lines = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.WARNING]
    assert len(server_lines) <= 1, server_lines  # a bad method on a first request is logged at debug level only
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records), caplog.text
    assert "Traceback" not in caplog.text


@module_loop
async def test_a_well_formed_request_still_reaches_the_app(served: int) -> None:
    answer = await send_raw(served, HEAD + b"Connection: close\r\n\r\n")
    status, headers, body = split_answer(answer)
    assert status == 200 and body["status"] == "ok" and "x-request-id" in headers


async def serve_once(runner: web.BaseRunner, raw: bytes) -> bytes:
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return await send_raw(runner.addresses[0][1], raw)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("debug", [False, True])
async def test_a_failure_outside_the_middlewares_is_json_without_a_traceback(
    debug: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The runner's own 500 (a failure no middleware caught: here an app without them) is the JSON shape too, and
    aiohttp's debug mode (the event loop's), which puts the traceback in aiohttp's own answer, does not here."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail")

    def broken_app() -> web.Application:
        app = web.Application()
        app.router.add_get("/", broken)
        return app

    raw = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    loop = asyncio.get_running_loop()
    loop.set_debug(debug)
    try:
        with caplog.at_level(logging.ERROR, logger="aiohttp.server"):
            answer = await serve_once(AppRunner(broken_app()), raw)
            plain = await serve_once(web.AppRunner(broken_app()), raw)
    finally:
        loop.set_debug(False)
    assert (b"secret detail" in plain) is debug, plain
    status, headers, body = split_answer(answer)
    assert status == 500 and headers["content-type"].startswith("application/json")
    assert body == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert "secret detail" in caplog.text  # the log keeps the traceback of a real server fault


def test_a_real_server_answers_malformed_headers_with_json_and_one_log_line(tmp_path: Path) -> None:
    cases = ("no colon", "space in the name", "over-long header")
    with running_server(tmp_path, signal.SIGINT) as (port, log, exit_code):
        for case in cases:
            raw, code, field = MALFORMED[case]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(raw)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            assert_json_error(answer, code, field)
    output = log.read_text()
    assert exit_code == [0], output
    assert "Traceback" not in output, output
    server_lines = [line for line in output.splitlines() if " aiohttp.server: " in line]
    assert len(server_lines) == len(cases) and all(" WARNING " in line for line in server_lines), server_lines
