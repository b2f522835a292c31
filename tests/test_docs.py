"""The README and the client notes agree with the code and with themselves: each setting documented once, no
paragraph repeated, examples on the server's default port, and every error code a client can meet explained."""

from __future__ import annotations

import re
from pathlib import Path

from mvserver.core.config import EnvSettings

PROJECT = Path(__file__).resolve().parent.parent
README = (PROJECT / "README.md").read_text()
CLIENT_NOTES = (PROJECT / ".devdocs" / "v1" / "client-impl-notes.md").read_text()
# Codes no client of the API meets: Replicate's own webhook deliveries, a request whose client is already gone, and
# a provider called live without its key (the server runs a provider without a key in sandbox mode instead).
NOT_FOR_CLIENTS = {"webhook_unverified", "invalid_body", "client_disconnected", "missing_api_key"}


def prose(markdown: str) -> list[str]:
    """The paragraphs of ``markdown`` outside code blocks and tables, each on one line."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    blocks = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", text)]
    return [block for block in blocks if block and not block.startswith(("|", "#"))]


def settings_rows() -> list[str]:
    """The variable names in the first column of the README's environment table, row by row."""
    start = README.index("| Variable | Meaning |")
    table = README[start:].split("\n\n", 1)[0].splitlines()[2:]
    assert all(line.startswith("|") for line in table)
    return [name for line in table for name in re.findall(r"`(MV_[A-Z_]+)`", line.split("|")[1])]


def test_the_readme_documents_every_setting_once() -> None:
    rows = settings_rows()
    assert len(rows) == len(set(rows)), sorted(name for name in rows if rows.count(name) > 1)
    read = set(re.findall(r'"(MV_[A-Z_]+)"', (PROJECT / "mvserver" / "core" / "config.py").read_text()))
    assert read <= set(rows), sorted(read - set(rows))


def test_no_paragraph_is_repeated() -> None:
    for name, markdown in (("README.md", README), ("client-impl-notes.md", CLIENT_NOTES)):
        paragraphs = [p for p in prose(markdown) if len(p) > 60]
        repeated = {p[:80] for p in paragraphs if paragraphs.count(p) > 1}
        assert not repeated, (name, repeated)


def test_examples_call_the_server_on_its_default_port() -> None:
    port = str(EnvSettings().port)
    for markdown in (README, CLIENT_NOTES):
        used = re.findall(r"B=http://127\.0\.0\.1:(\d+)|http://127\.0\.0\.1:(\d+)/(?:api/mv|single)", markdown)
        assert used and {a or b for a, b in used} == {port}


def test_every_error_code_a_client_can_meet_is_in_the_client_notes() -> None:
    source = "\n".join(path.read_text() for path in (PROJECT / "mvserver").rglob("*.py") if "sandbox" not in path.parts)
    codes = set(
        re.findall(r'(?:ApiError\(\s*\d{3},|ErrorInfo\(|_refuse\(bucket,|_unauthorized\()\s*"([a-z_]+)"', source)
    )
    codes |= set(re.findall(r'(?:"code": |\d{3}: |\d{3}: \(\d{3}, )"([a-z_]+)"', source))  # also the status maps
    for line in re.findall(r"^.*\bcode = .*$", source, flags=re.M):  # code = "a" if ... else "b", or a mapping
        codes |= set(re.findall(r'"([a-z]+_[a-z_]+)"', line))
    assert {
        "invalid_field",
        "quota_exceeded",
        "auth_required",
        "range_not_satisfiable",
        "internal_error",
        "method_not_allowed",
        "provider_rate_limited",
    } <= codes  # the patterns above still find them
    tables = "\n".join(line for line in CLIENT_NOTES.splitlines() if line.startswith("|"))
    missing = sorted(code for code in codes - NOT_FOR_CLIENTS if f"`{code}`" not in tables)
    assert not missing, missing
