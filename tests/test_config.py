"""Settings: YAML files and environment variables are validated at start-up, and every error names file and key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mvserver.core.config import DEFAULT_OUTPUT_DIR, DEFAULT_SETTINGS_DIR, ConfigError, EnvSettings, load_config

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped settings, free to break."""
    target = tmp_path / "settings"
    shutil.copytree(PROJECT / "settings", target)
    return target


def edit(directory: Path, name: str, change: Callable[[dict[str, Any]], None]) -> Path:
    """Load ``<name>.yaml``, apply ``change`` to it, write it back; return its path."""
    path = directory / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(directory: Path) -> Any:
    return load_config(EnvSettings(settings_dir=directory))


def test_shipped_settings_load_and_match_the_reference_defaults() -> None:
    config = load(DEFAULT_SETTINGS_DIR)
    scenes = config.scenes.defaults
    assert config.scenes.model == "gemini-2.5-pro"
    assert scenes.character_characteristics == "sarcastic, dramatic, emotional, and lovable"
    assert scenes.number_of_scenes == 4
    assert scenes.video_type == "video"
    assert scenes.video_characteristics == "vlogging, realistic, 4k, cinematic"
    assert scenes.camera_angle == "front"
    assert config.images.model == "google/imagen-4"
    assert config.videos.default_backend == "replicate"
    assert config.videos.backends.replicate.model == "google/veo-3.1"
    prompt = config.render(
        "scenes.prompt",
        idea="I",
        character_description="C",
        character_characteristics="P",
        number_of_scenes=3,
        video_type="T",
        video_characteristics="S",
        camera_angle="A",
    )
    assert "{{" not in prompt and "exactly 3" in prompt


def test_render_with_a_missing_variable_names_the_template() -> None:
    config = load(DEFAULT_SETTINGS_DIR)
    with pytest.raises(ConfigError, match=r"scenes\.prompt"):
        config.render("scenes.prompt", idea="only this")


def test_a_settings_template_is_rendered_once_per_value_of_the_variables_it_names(
    settings_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(settings_copy)
    template = config.templates["videos.video_rules_template"]
    renders: list[dict[str, Any]] = []
    real = template.render

    def counted(**variables: Any) -> str:
        renders.append(variables)
        return str(real(**variables))

    monkeypatch.setattr(template, "render", counted)
    first = config.render("videos.video_rules_template", prompt="a fox", aspect_ratio="16:9", duration=8)
    again = config.render("videos.video_rules_template", prompt="a heron", aspect_ratio="16:9", duration=8)
    assert first == again and "16:9" in first and "8 seconds" in first
    assert len(renders) == 1  # the shipped rules name aspect_ratio and duration, not the prompt
    tall = config.render("videos.video_rules_template", prompt="a fox", aspect_ratio="9:16", duration=4)
    assert "9:16" in tall and "4 seconds" in tall and len(renders) == 2

    # a template that names the prompt renders each prompt; a missing variable still names the template
    edit(settings_copy, "videos", _set(["video_rules_template"], "About {{ prompt }} in {{ aspect_ratio }}."))
    config = load(settings_copy)
    assert config.render("videos.video_rules_template", prompt="a fox", aspect_ratio="1:1", duration=4) == (
        "About a fox in 1:1."
    )
    assert config.render("videos.video_rules_template", prompt="a heron", aspect_ratio="1:1", duration=4) == (
        "About a heron in 1:1."
    )
    with pytest.raises(ConfigError, match=r"video_rules_template"):
        config.render("videos.video_rules_template", prompt="a fox", duration=4)


def _set(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _delete(path: list[str]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return change


@pytest.mark.parametrize(
    ("name", "change", "key"),
    [
        pytest.param("scenes", _set(["defaults", "colour"], "red"), "defaults.colour", id="unknown-key"),
        pytest.param("scenes", _set(["colour"], "red"), "colour", id="unknown-top-level-key"),
        pytest.param(
            "scenes", _set(["defaults", "number_of_scenes"], "four"), "defaults.number_of_scenes", id="wrong-type"
        ),
        pytest.param("scenes", _delete(["defaults", "camera_angle"]), "defaults.camera_angle", id="missing-key"),
        pytest.param("scenes", _set(["temperature"], 3.5), "temperature", id="temperature-out-of-range"),
        pytest.param(
            "scenes",
            _set(["defaults", "number_of_scenes"], 20),
            "defaults.number_of_scenes",
            id="default-outside-range",
        ),
        pytest.param(
            "scenes",
            _set(["limits", "number_of_scenes"], {"min": 5, "max": 2}),
            "limits.number_of_scenes",
            id="range-reversed",
        ),
        pytest.param("scenes", _set(["prompt"], "Write {{ idea "), "prompt", id="template-does-not-compile"),
        pytest.param("scenes", _set(["prompt"], "{% for x in %}{% endfor %}"), "prompt", id="template-bad-tag"),
        pytest.param(
            "images", _set(["defaults", "aspect_ratio"], "2:1"), "defaults.aspect_ratio", id="image-default-not-allowed"
        ),
        pytest.param(
            "images",
            _set(["allowed", "output_format"], ["png", "gif"]),
            "allowed.output_format",
            id="image-format-unsupported",
        ),
        pytest.param("images", _set(["prompt"], "{{ character_description }"), "prompt", id="image-template"),
        pytest.param("videos", _set(["defaults", "duration"], 5), "defaults.duration", id="video-default-not-allowed"),
        pytest.param("videos", _set(["default_backend"], "runway"), "default_backend", id="video-unknown-backend"),
        pytest.param(
            "videos", _set(["video_rules_template"], "{{ aspect_ratio"), "video_rules_template", id="rules-template"
        ),
        pytest.param("sandbox", _set(["video_latency_seconds"], -1), "video_latency_seconds", id="negative-latency"),
    ],
)
def test_invalid_setting_names_file_and_key(settings_copy: Path, name: str, change: Callable, key: str) -> None:
    path = edit(settings_copy, name, change)
    with pytest.raises(ConfigError) as caught:
        load(settings_copy)
    message = str(caught.value)
    assert str(path) in message
    assert key in message


@pytest.mark.parametrize("name", ["scenes", "images", "videos", "sandbox"])
def test_missing_file_is_named(settings_copy: Path, name: str) -> None:
    (settings_copy / f"{name}.yaml").unlink()
    with pytest.raises(ConfigError, match="missing") as caught:
        load(settings_copy)
    assert str(settings_copy / f"{name}.yaml") in str(caught.value)


def test_malformed_yaml_is_named_with_its_line(settings_copy: Path) -> None:
    path = settings_copy / "scenes.yaml"
    path.write_text("model: gemini-2.5-pro\ndefaults: [unclosed\n  camera_angle: front\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load(settings_copy)
    assert str(path) in str(caught.value)
    assert "line" in str(caught.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_yaml_that_is_not_a_mapping_is_rejected(settings_copy: Path, text: str) -> None:
    path = settings_copy / "videos.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping") as caught:
        load(settings_copy)
    assert str(path) in str(caught.value)


def test_every_problem_in_a_file_is_listed(settings_copy: Path) -> None:
    def change(data: dict[str, Any]) -> None:
        data["defaults"]["colour"] = "red"
        data["defaults"]["number_of_scenes"] = "four"

    edit(settings_copy, "scenes", change)
    with pytest.raises(ConfigError) as caught:
        load(settings_copy)
    assert "defaults.colour: unknown key" in str(caught.value)
    assert "defaults.number_of_scenes" in str(caught.value)


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_", "REPLICATE_", "MV_"))}
    env.update(
        {
            "PYTHONPATH": str(PROJECT),
            "GEMINI_API_KEY": "",
            "REPLICATE_API_TOKEN": "",
            "GOOGLE_VERTEX_API_KEY": "",
            "GOOGLE_CLOUD_PROJECT": "",
        }
    )
    env.update(extra)
    return env


def test_server_refuses_to_start_with_broken_settings(settings_copy: Path, tmp_path: Path) -> None:
    path = edit(settings_copy, "scenes", _set(["defaults", "colour"], "red"))
    result = subprocess.run(
        [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", "0"],
        env=_server_env(MV_SETTINGS_DIR=str(settings_copy), MV_OUTPUT_DIR=str(tmp_path / "out")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    assert "defaults.colour" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_refuses_to_start_with_a_bad_env_value(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mvserver", "--port", "0"],
        env=_server_env(MV_DEBUG_MODE="maybe", MV_OUTPUT_DIR=str(tmp_path / "out")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "MV_DEBUG_MODE" in result.stderr and "maybe" in result.stderr


# -- environment -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MV_DEBUG_MODE", "maybe"),
        ("MV_SANDBOX", "2"),
        ("MV_PORT", "eighty"),
        ("MV_PORT", "-1"),
        ("MV_MAX_BODY_MB", "lots"),
        ("MV_MAX_CONCURRENT_JOBS", "1.5"),
        ("MV_SANDBOX_VIDEO_SECONDS", "-3"),
    ],
)
def test_invalid_env_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        EnvSettings.from_env({name: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("No", False),
        ("off", False),
        ("", False),
        ("   ", False),
    ],
)
def test_debug_mode_values(value: str, expected: bool) -> None:
    assert EnvSettings.from_env({"MV_DEBUG_MODE": value}).debug is expected


def test_blank_values_count_as_unset() -> None:
    blank = {
        name: "  "
        for name in (
            "GEMINI_API_KEY",
            "REPLICATE_API_TOKEN",
            "GOOGLE_VERTEX_API_KEY",
            "GOOGLE_CLOUD_PROJECT",
            "GOOGLE_CLOUD_LOCATION",
            "MV_DEBUG_MODE",
            "MV_SANDBOX",
            "MV_HOST",
            "MV_PORT",
            "MV_OUTPUT_DIR",
            "MV_SETTINGS_DIR",
            "MV_MAX_BODY_MB",
            "MV_MAX_CONCURRENT_JOBS",
            "MV_SANDBOX_VIDEO_SECONDS",
            "MV_GEMINI_BASE_URL",
            "MV_VERTEX_BASE_URL",
            "MV_REPLICATE_BASE_URL",
        )
    }
    assert EnvSettings.from_env(blank) == EnvSettings.from_env({}) == EnvSettings()
    env = EnvSettings()
    assert env.gemini_api_key is None and env.replicate_api_token is None
    assert env.output_dir == DEFAULT_OUTPUT_DIR and env.settings_dir == DEFAULT_SETTINGS_DIR
    assert env.port == 8080 and env.max_body_bytes == 16 * 1024 * 1024
    assert not env.gemini_video_configured


def test_env_values_are_read_and_trimmed(tmp_path: Path) -> None:
    env = EnvSettings.from_env(
        {
            "GEMINI_API_KEY": " g-key ",
            "MV_PORT": "9000",
            "MV_DEBUG_MODE": "true",
            "MV_MAX_BODY_MB": "2",
            "MV_OUTPUT_DIR": str(tmp_path),
            "MV_MAX_CONCURRENT_JOBS": "3",
            "MV_SANDBOX_VIDEO_SECONDS": "0.5",
            "GOOGLE_CLOUD_PROJECT": "proj",
        }
    )
    assert env.gemini_api_key == "g-key"
    assert env.port == 9000 and env.debug is True
    assert env.max_body_bytes == 2 * 1024 * 1024
    assert env.output_dir == tmp_path
    assert env.max_concurrent_jobs == 3 and env.sandbox_video_latency == 0.5
    assert env.gemini_video_configured


def test_env_overrides_settings_for_jobs_and_latency() -> None:
    config = load_config(EnvSettings(max_concurrent_jobs=7, sandbox_video_latency=0.0))
    assert config.max_concurrent_jobs == 7
    assert config.sandbox_video_latency == 0.0
    default = load_config(EnvSettings())
    assert default.max_concurrent_jobs == default.videos.jobs.max_concurrent
    assert default.sandbox_video_latency == default.sandbox.video_latency_seconds


def test_summary_never_shows_secrets() -> None:
    config = load_config(
        EnvSettings(gemini_api_key="secret-1", replicate_api_token="secret-2", vertex_api_key="secret-3")
    )
    summary = config.summary()
    assert "secret" not in repr(summary)
    assert summary["env"]["gemini_api_key"] == "set"
    assert summary["env"]["vertex_api_key"] == "set"
    assert load_config(EnvSettings()).summary()["env"]["replicate_api_token"] == "unset"


# -- the price table (settings/pricing.yaml) ----------------------------------------------------------------------


def _pricing_settings(tmp_path: Path, pricing: dict[str, Any]) -> EnvSettings:
    target = tmp_path / "settings"
    shutil.copytree(PROJECT / "settings", target)
    (target / "pricing.yaml").write_text(yaml.safe_dump(pricing))
    return EnvSettings.from_env({"MV_SETTINGS_DIR": str(target)})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["models"].pop("google/veo-3.1"), "no price for google/veo-3.1"),
        (lambda p: p["models"]["sync/lipsync-2-pro"].update(per_output_second=-1), "greater than or equal to 0"),
        (lambda p: p["models"]["sync/lipsync-2-pro"].update(currency="EUR"), "one currency"),
        (lambda p: p["models"]["sync/lipsync-2-pro"].update(as_of="last week"), "as_of"),
        (lambda p: p["models"]["sync/lipsync-2-pro"].update(per_second=1), "unknown key"),
    ],
)
def test_a_bad_price_table_stops_the_start_up(tmp_path: Path, change: Any, message: str) -> None:
    pricing = yaml.safe_load((PROJECT / "settings" / "pricing.yaml").read_text())
    change(pricing)
    with pytest.raises(ConfigError) as error:
        load_config(_pricing_settings(tmp_path, pricing))
    assert "pricing.yaml" in str(error.value) and message in str(error.value)


def test_server_exits_2_with_a_bad_price_table(settings_copy: Path, tmp_path: Path) -> None:
    pricing = yaml.safe_load((settings_copy / "pricing.yaml").read_text())
    del pricing["models"]["google/veo-3.1"]["as_of"]
    (settings_copy / "pricing.yaml").write_text(yaml.safe_dump(pricing))
    result = subprocess.run(
        [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", "0"],
        env=_server_env(MV_SETTINGS_DIR=str(settings_copy), MV_OUTPUT_DIR=str(tmp_path / "out")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "pricing.yaml" in result.stderr and "models.google/veo-3.1.as_of" in result.stderr
    assert "Traceback" not in result.stderr
