"""Start-up failures of ``python -m mvserver``, run as real processes: one line naming the cause, exit 2, no traceback.

Also: a settings template naming a variable the code never passes stops the start-up (it would fail every request),
and the address given on the command line is the one reported.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT

from mvserver.app import create_app
from mvserver.core.config import ConfigError

PROVIDER_KEYS = ("GEMINI_API_KEY", "REPLICATE_API_TOKEN", "GOOGLE_VERTEX_API_KEY", "GOOGLE_CLOUD_PROJECT")


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without provider keys (blank, so a ``.env`` cannot supply them) or MV_* knobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "MV_")) and k not in PROVIDER_KEYS}
    env.update({key: "" for key in PROVIDER_KEYS})
    env.update(
        {
            "MV_OUTPUT_DIR": str(tmp_path / "outputs"),
            "MV_SETTINGS_DIR": str(PROJECT / "settings"),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mvserver", *args], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("mvserver: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def settings_copy(tmp_path: Path) -> Path:
    target = tmp_path / "settings"
    shutil.copytree(PROJECT / "settings", target)
    return target


def test_a_settings_file_that_is_not_utf8(tmp_path: Path) -> None:
    settings = settings_copy(tmp_path)
    (settings / "images.yaml").write_bytes((PROJECT / "settings" / "images.yaml").read_bytes() + b"# caf\xe9\n")
    assert_one_line_exit_2(run(server_env(tmp_path, MV_SETTINGS_DIR=str(settings))), "images.yaml", "UTF-8")


def test_a_directory_where_a_settings_file_should_be(tmp_path: Path) -> None:
    settings = settings_copy(tmp_path)
    (settings / "sandbox.yaml").unlink()
    (settings / "sandbox.yaml").mkdir()
    assert_one_line_exit_2(run(server_env(tmp_path, MV_SETTINGS_DIR=str(settings))), "sandbox.yaml")


def test_an_output_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_one_line_exit_2(run(server_env(tmp_path, MV_OUTPUT_DIR=str(blocker / "outputs"))), "MV_OUTPUT_DIR")


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range(tmp_path: Path, port: str) -> None:
    assert_one_line_exit_2(run(server_env(tmp_path), "--port", port), "--port")


def test_mv_port_out_of_range(tmp_path: Path) -> None:
    assert_one_line_exit_2(run(server_env(tmp_path, MV_PORT="70000")), "MV_PORT")


def test_a_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(server_env(tmp_path), "--host", "127.0.0.1", "--port", str(port))
    assert_one_line_exit_2(result, f"127.0.0.1:{port}")


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "-inf", "1e999"])
def test_sandbox_video_seconds_must_be_finite_and_not_negative(tmp_path: Path, value: str) -> None:
    assert_one_line_exit_2(run(server_env(tmp_path, MV_SANDBOX_VIDEO_SECONDS=value)), "MV_SANDBOX_VIDEO_SECONDS")


def test_max_body_mb_must_be_finite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MV_MAX_BODY_MB"):
        create_app({"MV_MAX_BODY_MB": "inf", "MV_OUTPUT_DIR": str(tmp_path / "outputs")})


@pytest.mark.parametrize(
    ("name", "key", "template"),
    [
        ("scenes", "prompt", "Write {{ number_of_scenes }} scenes in a {{ mood }} mood about {{ idea }}."),
        ("images", "prompt", "{{ character_description }} with {{ prompt }}"),
        ("videos", "video_rules_template", "Keep {{ aspect_ratio }}; {{ seconds }} seconds."),
        ("videos", "video_rules_template", "{{ duration.minutes }}"),
    ],
)
def test_a_template_with_an_unknown_variable_stops_the_start_up(
    tmp_path: Path, name: str, key: str, template: str
) -> None:
    settings = settings_copy(tmp_path)
    path = settings / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    data[key] = template
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as raised:
        create_app({"MV_SETTINGS_DIR": str(settings), "MV_OUTPUT_DIR": str(tmp_path / "outputs")})
    assert str(path) in str(raised.value) and f": {key}: " in str(raised.value)


def test_a_template_with_an_unknown_variable_exits_2(tmp_path: Path) -> None:
    settings = settings_copy(tmp_path)
    path = settings / "scenes.yaml"
    data = yaml.safe_load(path.read_text())
    data["prompt"] += "\nMood: {{ mood }}\n"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert_one_line_exit_2(run(server_env(tmp_path, MV_SETTINGS_DIR=str(settings))), "scenes.yaml", "prompt", "mood")


def test_debug_mode_reports_the_port_given_on_the_command_line(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = server_env(tmp_path, MV_DEBUG_MODE="true", MV_PORT="8080")
    process = subprocess.Popen(
        [sys.executable, "-m", "mvserver", "--port", str(port)],
        env=env,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = ""
        deadline = time.monotonic() + 60
        while "providers:" not in output and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output += line
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert f'"port": "{port}"' in output, output
    assert '"port": "8080"' not in output
