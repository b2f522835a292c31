"""Temporaries in a shared output directory: named by the node writing them, removed only when provably abandoned."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
from helpers import PROJECT, dead_pid, heartbeat

from mvserver.core import artefacts as storage
from mvserver.core.artefacts import NODE_ID, OutputStore, start_node, temp_owner, temp_path, write_bytes_atomic

STALE = 60.0


def leftover(outputs: OutputStore, kind: str, name: str, *, age: float = 0.0) -> Path:
    path = outputs.root / kind / name
    path.write_bytes(b"half a file")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_every_temporary_carries_its_node_id() -> None:
    out = Path("/srv/outputs/videos/3f0c.mp4")
    first, second, tagged = temp_path(out), temp_path(out), temp_path(out, "seg12")
    assert first != second and first.parent == out.parent
    assert re.fullmatch(rf"\.3f0c\.mp4\.{NODE_ID}-[0-9a-f]{{8}}\.part", first.name)
    assert tagged.name.endswith(".seg12.part")
    assert temp_owner(first.name) == temp_owner(tagged.name) == NODE_ID
    assert temp_owner(".3f0c.mp4.0123abcd.part") is None  # the names older versions wrote


def test_writers_name_their_temporaries_through_the_one_helper() -> None:
    """No module spells a temporary's name itself: a new writer that did would be invisible to the clean-up rules.
    The scratch directory is no output directory: one process owns it and removes its own unfinished downloads
    (``core/scratch.py``, with its own rule)."""
    spelled = []
    for path in sorted((PROJECT / "mvserver").rglob("*.py")):
        if path.name in ("artefacts.py", "scratch.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""\.part["'}]|mkstemp\(|NamedTemporaryFile\(""", line):
                spelled.append(f"{path.relative_to(PROJECT)}:{number}: {line.strip()}")
    assert spelled == []


def test_atomic_writes_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "record.json"
    write_bytes_atomic(target, b"{}")
    assert target.read_bytes() == b"{}" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_only_provably_abandoned_temporaries_are_removed(tmp_path: Path) -> None:
    outputs = OutputStore(tmp_path / "outputs", stale_temp_seconds=STALE)
    live, silent, gone, elsewhere = "a1" * 6, "b2" * 6, "c3" * 6, "d4" * 6
    heartbeat(outputs, live, os.getppid())  # a live process on this host (the test runner's parent)
    heartbeat(outputs, silent, os.getppid(), age=2 * STALE)  # alive by its pid, but silent for too long
    gone_beat = heartbeat(outputs, gone, dead_pid())  # its process has exited: dead at once
    heartbeat(outputs, elsewhere, 1, host="another-host", age=2 * STALE)  # another machine, silent
    old = 2 * STALE
    kept = [
        leftover(outputs, "videos", f".x.mp4.{live}-00000001.part", age=old),  # its node beats: still written
        leftover(outputs, "videos", f".x.mp4.{silent}-00000002.part"),  # fresh, though its node is silent
        leftover(outputs, "audio", f".y.{NODE_ID}-00000003.upload.part", age=old),  # this node's own
        leftover(outputs, "jobs", ".z.json.0123abcd.part"),  # an old-style name, fresh
        leftover(outputs, "videos", f".x.mp4.{elsewhere}-00000004.part"),  # another host, fresh
    ]
    removed = [
        leftover(outputs, "videos", f".x.mp4.{silent}-00000005.part", age=old),
        leftover(outputs, "videos", f".x.mp4.{gone}-00000006.part"),  # fresh, but its process is gone
        leftover(outputs, "jobs", ".z.json.89abcdef.part", age=old),
        leftover(outputs, "audio", f".y.{elsewhere}-00000007.upload.part", age=old),
        leftover(outputs, "images", f".i.png.{'e5' * 6}-00000008.part", age=old),  # no heartbeat at all
    ]
    assert start_node(outputs) == len(removed)
    assert [p.exists() for p in kept] == [True] * len(kept)
    assert [p.exists() for p in removed] == [False] * len(removed)
    # this node announced itself; the dead nodes' heartbeats are gone, the live one's stays
    beats = sorted(p.stem for p in (outputs.root / "nodes").iterdir())
    assert beats == sorted([live, NODE_ID])
    assert not gone_beat.exists()
    assert json.loads(outputs.heartbeat_path.read_text())["pid"] == os.getpid()


async def test_the_heartbeat_runs_with_the_app_and_goes_at_a_clean_exit(tmp_path: Path) -> None:
    outputs = OutputStore(tmp_path / "outputs", stale_temp_seconds=1.0)
    start_node(outputs)
    before = outputs.heartbeat_path.stat().st_mtime_ns
    abandoned = leftover(outputs, "videos", f".x.mp4.{'f6' * 6}-00000009.part", age=5.0)
    beating = asyncio.get_running_loop().create_task(outputs.keep_beating())
    try:
        deadline = time.monotonic() + 20
        while outputs.heartbeat_path.stat().st_mtime_ns == before or abandoned.exists():
            assert time.monotonic() < deadline, "no beat, or no periodic clean-up"
            await asyncio.sleep(0.05)
    finally:
        beating.cancel()
    outputs.stop_beating()
    assert not outputs.heartbeat_path.exists()


def test_the_stale_age_is_a_setting(tmp_path: Path) -> None:
    from mvserver.core.config import ConfigError, EnvSettings

    assert EnvSettings.from_env({}).stale_temp_seconds == storage.STALE_TEMP_SECONDS == 900
    assert EnvSettings.from_env({"MV_STALE_TEMP_SECONDS": "30"}).stale_temp_seconds == 30
    with pytest.raises(ConfigError, match="MV_STALE_TEMP_SECONDS"):
        EnvSettings.from_env({"MV_STALE_TEMP_SECONDS": "0"})
