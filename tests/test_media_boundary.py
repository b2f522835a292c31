"""mvserver.media stands alone: it imports nothing else from mvserver (read from the sources)."""

from __future__ import annotations

import ast

from conftest import PROJECT


def test_media_imports_nothing_else_from_mvserver() -> None:
    """Limits come in as plain values, errors go out as media's own exceptions: no config, errors or storage."""
    crossing = []
    for path in sorted((PROJECT / "mvserver" / "media").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for module in names:
                if (module == "mvserver" or module.startswith("mvserver.")) and not module.startswith("mvserver.media"):
                    crossing.append(f"{path.relative_to(PROJECT)}:{node.lineno}: {module}")
    assert crossing == []
