"""The shared test helpers themselves, where a mistake would silently change what other tests check."""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import FAST_JOBS, PROJECT, fast_settings


def test_fast_settings_are_the_projects_with_fast_polling_and_each_copy_is_its_own(tmp_path: Path) -> None:
    first, second = fast_settings(tmp_path / "one"), fast_settings(tmp_path / "two")
    for copy in (first, second):
        assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in (PROJECT / "settings").iterdir())
        videos = yaml.safe_load((copy / "videos.yaml").read_text())
        assert {key: videos["jobs"][key] for key in FAST_JOBS} == FAST_JOBS
        assert yaml.safe_load((copy / "images.yaml").read_text())["poll_interval_seconds"] == 0.05
    project = yaml.safe_load((PROJECT / "settings" / "videos.yaml").read_text())
    videos = yaml.safe_load((first / "videos.yaml").read_text())
    assert {**project["jobs"], **FAST_JOBS} == videos["jobs"]  # nothing else changed
    (first / "videos.yaml").write_text("changed by a test")
    assert yaml.safe_load((second / "videos.yaml").read_text()) == videos  # a test's edit stays in its copy
    assert yaml.safe_load((fast_settings(tmp_path / "three") / "videos.yaml").read_text()) == videos
