"""Connections that trickle their request headers are closed after ``MV_HEADER_TIMEOUT_SECONDS``, tried with raw
sockets against a real ``python -m mvserver``; a kept-alive idle connection is not."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

from helpers import running_server

TIMEOUT = 1.0
SLACK = 4.0  # a loaded machine: the server answers within TIMEOUT + SLACK, far below the 75 s keep-alive timeout
REQUEST = b"GET /api/mv/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def read_until_closed(conn: socket.socket, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``limit`` seconds)."""
    conn.settimeout(limit)
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_trickled_headers_get_408_and_the_connection_closes(tmp_path: Path) -> None:
    with running_server(tmp_path, signal.SIGTERM, MV_HEADER_TIMEOUT_SECONDS=str(TIMEOUT)) as (port, log, _):
        # A slowloris client: a header line every 0.3 s, never the blank line that ends them.
        with socket.create_connection(("127.0.0.1", port)) as slow:
            started = time.monotonic()
            slow.sendall(REQUEST)
            answer = b""
            slow.settimeout(0.3)
            for n in range(int((TIMEOUT + SLACK) / 0.3)):
                try:
                    slow.sendall(b"X-Trickle-%d: x\r\n" % n)
                    answer = slow.recv(65536)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                break
            answer += read_until_closed(slow, SLACK)
            elapsed = time.monotonic() - started
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "MV_HEADER_TIMEOUT_SECONDS" in error["message"], error
        assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK, elapsed

        # A connection that sends nothing at all is closed too, without an answer.
        with socket.create_connection(("127.0.0.1", port)) as silent:
            started = time.monotonic()
            assert read_until_closed(silent, TIMEOUT + SLACK) == b""
            assert time.monotonic() - started < TIMEOUT + SLACK

        # Whole requests on a kept-alive connection, idle longer than the header timeout in between, are served.
        with socket.create_connection(("127.0.0.1", port)) as kept:
            kept.settimeout(10)
            for _ in range(2):
                kept.sendall(REQUEST + b"\r\n")
                first = kept.recv(65536)
                assert first.startswith(b"HTTP/1.1 200 "), first
                time.sleep(TIMEOUT * 2)  # idle, between requests: only the keep-alive timeout applies
        assert "Traceback" not in log.read_text()
