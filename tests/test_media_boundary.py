"""ffmpeg is started in one place, mvserver.media, and media stands alone: it imports nothing else from mvserver.

Both are read from the sources, as tests/test_temporaries.py does for temporaries: a new module that ran ffmpeg
its own way would escape the runner's limits (memory, threads, time, death with the server) and its clean-up.
"""

from __future__ import annotations

import ast
import re

from helpers import PROJECT

# Calls that start a process, and the bundled ffmpeg's own locator.
STARTS = re.compile(
    r"\b(create_subprocess_(?:exec|shell)|subprocess\.(?:run|Popen|call|check_call|check_output)|"
    r"os\.(?:exec|spawn|posix_spawn)\w*|imageio_ffmpeg|get_ffmpeg_exe)\b"
)
# Modules outside media that start a process, and why that is not an ffmpeg of the service's.
ALLOWED = {
    "mvserver/analysis/pool.py": "starts the analysis worker, a Python process",
    "mvserver/analysis/worker.py": "the worker decodes a song straight into its own bounded array (ffmpeg's stdout "
    "as data); it caps its own memory and dies with the pool",
}


def test_no_module_outside_media_starts_ffmpeg_itself() -> None:
    found = []
    for path in sorted((PROJECT / "mvserver").rglob("*.py")):
        name = path.relative_to(PROJECT).as_posix()
        if name.startswith("mvserver/media/") or name in ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if STARTS.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == [], "start ffmpeg through mvserver.media.run (run_ffmpeg) and probe through mvserver.media.probe"


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
