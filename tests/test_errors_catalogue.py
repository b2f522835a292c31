"""The one catalogue of error codes (``mvserver.core.errors.CODES``): every code the service answers with, and its
statuses, is listed there; an ApiError can only be made with a catalogued code and status."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import PROJECT

from mvserver.core import errors
from mvserver.core.errors import CODES, ApiError, UnknownErrorCode

SOURCES = sorted(p for p in (PROJECT / "mvserver").rglob("*.py") if "sandbox" not in p.parts)
# Answered to a provider (Replicate's webhook deliveries), to a client that is gone, or a deployment mistake: the
# client notes, written for client developers, leave them out.
NOT_FOR_CLIENTS = {"invalid_body", "webhook_unverified", "client_disconnected", "missing_api_key"}


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                found.append((path, node))
    return found


def literal(node: ast.expr) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def test_every_api_error_in_the_code_names_a_catalogued_code_and_status() -> None:
    made = calls("ApiError")
    assert len(made) > 150  # the scan sees them all
    wrong = []
    for path, call in made:
        status, code = (literal(arg) for arg in call.args[:2])
        if isinstance(code, str) and (
            code not in CODES or (isinstance(status, int) and status not in CODES[code].statuses)
        ):
            wrong.append(f"{path.relative_to(PROJECT)}:{call.lineno}: {status} {code}")
    assert not wrong, "\n".join(wrong)


def test_every_code_written_outside_api_error_is_catalogued() -> None:
    """Codes made without ApiError: job and parser errors (ErrorInfo), the 401 answers, the middleware's HTTP codes
    and the provider status map."""
    codes = {literal(call.args[0]) for _, call in calls("ErrorInfo") if call.args}
    codes |= {literal(call.args[0]) for _, call in calls("_unauthorized")}
    codes |= set(errors._HTTP_CODES.values()) | {"http_error", "internal_error", "rate_limited"}
    codes |= {"missing_field", "unknown_field", "invalid_field", "job_failed", "job_canceled", "video_not_ready"}
    codes |= {"analysis_failed", "analysis_timeout", "provider_unavailable", "provider_error"}
    codes |= {"provider_canceled", "provider_prediction_failed", "provider_content_filtered", "provider_auth_failed"}
    codes.discard(None)
    assert codes - set(CODES) == set()
    for status, (ours, code) in errors._PROVIDER_STATUS_CODES.items():
        assert ours in CODES[code].statuses, (status, code)
    for status, code in errors._HTTP_CODES.items():
        assert status in CODES[code].statuses, code


def test_every_catalogued_code_is_answered_somewhere() -> None:
    """No dead entries: each code appears in the code outside the catalogue."""
    text = "\n".join(path.read_text() for path in SOURCES if path.name != "errors.py")
    text += (PROJECT / "mvserver" / "core" / "errors.py").read_text().split("CODES: dict[str, ErrorCode] = {")[0]
    text += (PROJECT / "mvserver" / "core" / "errors.py").read_text().split("def check_code(")[1]
    assert [code for code in CODES if f'"{code}"' not in text] == []


def test_the_client_notes_list_every_code_a_client_can_get() -> None:
    notes = (PROJECT / ".devdocs" / "v1" / "client-impl-notes.md").read_text()
    section = notes[notes.index("## 6. Error codes") :]
    assert [code for code in CODES if f"`{code}`" not in section and code not in NOT_FOR_CLIENTS] == []


def test_an_api_error_takes_only_a_catalogued_code_with_one_of_its_statuses() -> None:
    assert ApiError(404, "not_found", "no such thing").status == 404
    # One code, two answers, both kept as the API always gave them: a request naming a missing clip (400), a lip-sync
    # job whose clip is gone when it starts (409).
    assert CODES["clip_not_found"].statuses == (400, 409)
    assert {ApiError(status, "clip_not_found", "gone").status for status in (400, 409)} == {400, 409}
    with pytest.raises(UnknownErrorCode, match="not in mvserver.core.errors.CODES"):
        ApiError(400, "no_such_code", "a typo")
    with pytest.raises(UnknownErrorCode, match=r"answered with \(404,\), not 400"):
        ApiError(400, "not_found", "the wrong status")
