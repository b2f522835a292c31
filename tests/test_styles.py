"""Style presets: loaded and checked at start-up, offered in OpenAPI and health, rendered into the scenes prompt."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import PROJECT, AppClient

from mvserver.core.config import DEFAULT_SETTINGS_DIR, ConfigError, EnvSettings, load_config
from mvserver.sandbox.app import Simulator

URL = "/api/mv/create_scenes"
BODY = {
    "idea": "a lighthouse keeper who learns to dance",
    "character_description": "an old man in a yellow slicker",
    "number_of_scenes": 2,
}
PRESETS = {
    path.stem: yaml.safe_load(path.read_text()) for path in sorted((DEFAULT_SETTINGS_DIR / "styles").glob("*.yaml"))
}


def test_the_shipped_presets_load() -> None:
    config = load_config(EnvSettings())
    assert len(config.styles) >= 4 and sorted(config.styles) == sorted(PRESETS)
    for name, preset in config.styles.items():
        assert preset.model_dump() == PRESETS[name]


async def test_style_words_reach_the_prompt_gemini_receives(client: TestClient, sim: Simulator) -> None:
    response = await client.post(URL, json={**BODY, "style": "noir"})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["metadata"]["parameters"]["style"] == "noir"
    prompt = sim.prompts[-1]
    for key in ("label", "camera", "palette", "pacing"):
        assert PRESETS["noir"][key] in prompt, key
    assert BODY["idea"] in prompt

    plain = await client.post(URL, json=BODY)
    assert plain.status == 200
    assert (await plain.json())["metadata"]["parameters"]["style"] is None
    assert "Director's look" not in sim.prompts[-1] and PRESETS["noir"]["camera"] not in sim.prompts[-1]


async def test_an_unknown_style_is_400_listing_the_allowed_ones(client: TestClient, sim: Simulator) -> None:
    response = await client.post(URL, json={**BODY, "style": "vaporwave"})
    error = (await response.json())["error"]
    assert response.status == 400 and error["code"] == "invalid_field" and error["field"] == "style"
    for name in PRESETS:
        assert name in error["message"]
    assert not sim.prompts


async def test_health_and_openapi_list_the_styles(client: TestClient) -> None:
    health = await (await client.get("/api/mv/health")).json()
    assert [s["name"] for s in health["styles"]] == sorted(PRESETS)
    assert all(s["label"] == PRESETS[s["name"]]["label"] for s in health["styles"])
    doc = await (await client.get("/api/mv/openapi.json")).json()
    style = doc["components"]["schemas"]["CreateScenesRequest"]["properties"]["style"]
    enums = [option.get("enum") for option in style["anyOf"] if "enum" in option]
    assert enums == [sorted(PRESETS)] and style["default"] is None


def settings_with(tmp_path: Path, **styles: Any) -> Path:
    """A copy of the settings whose styles/ holds ``styles`` (name -> YAML data or raw text) besides the shipped ones."""
    target = tmp_path / "settings"
    shutil.copytree(PROJECT / "settings", target)
    for name, data in styles.items():
        text = data if isinstance(data, str) else yaml.safe_dump(data)
        (target / "styles" / f"{name}.yaml").write_text(text)
    return target


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("bad", {**PRESETS["noir"], "colour": "red"}, "colour: unknown key"),
        ("bad", {k: v for k, v in PRESETS["noir"].items() if k != "palette"}, "palette: Field required"),
        ("bad", {**PRESETS["noir"], "pacing": ""}, "pacing:"),
        ("bad", "- just\n- a list\n", "mapping"),
        ("Bad Name", PRESETS["noir"], "file name"),
    ],
)
def test_a_broken_preset_names_file_and_key(tmp_path: Path, name: str, data: Any, expected: str) -> None:
    settings = settings_with(tmp_path, **{name: data})
    with pytest.raises(ConfigError) as caught:
        load_config(EnvSettings(settings_dir=settings))
    assert str(settings / "styles" / f"{name}.yaml") in str(caught.value) and expected in str(caught.value)


def test_the_default_style_must_exist(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    scenes = yaml.safe_load((settings / "scenes.yaml").read_text())
    scenes["defaults"]["style"] = "missing"
    (settings / "scenes.yaml").write_text(yaml.safe_dump(scenes))
    with pytest.raises(ConfigError, match=r"scenes\.yaml: defaults\.style: 'missing'"):
        load_config(EnvSettings(settings_dir=settings))
    scenes["defaults"]["style"] = "dreamy"
    (settings / "scenes.yaml").write_text(yaml.safe_dump(scenes))
    assert load_config(EnvSettings(settings_dir=settings)).scenes.defaults.style == "dreamy"


async def test_without_a_styles_directory_style_must_be_null(
    make_client: AppClient, settings_dir: Path, sim: Simulator
) -> None:
    shutil.rmtree(settings_dir / "styles")
    client = await make_client()
    response = await client.post(URL, json={**BODY, "style": "noir"})
    assert response.status == 400 and (await response.json())["error"]["field"] == "style"
    assert (await client.post(URL, json={**BODY, "style": None})).status == 200
    assert (await (await client.get("/api/mv/health")).json())["styles"] == []


def test_the_server_refuses_to_start_with_a_broken_preset(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, broken={**PRESETS["noir"], "tempo": "fast"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_", "REPLICATE_", "MV_"))}
    env.update({"PYTHONPATH": str(PROJECT), "MV_SETTINGS_DIR": str(settings), "MV_OUTPUT_DIR": str(tmp_path / "out")})
    result = subprocess.run(
        [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert str(settings / "styles" / "broken.yaml") in result.stderr and "tempo" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_projects_preset_is_rendered_exactly_as_create_scenes_renders_it(
    make_client: AppClient, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mvserver.debug")
    client = await make_client(MV_DEBUG_MODE="true")
    response = await client.post(
        "/api/mv/projects",
        json={"idea": BODY["idea"], "style": "synthwave", "character_description": BODY["character_description"]},
    )
    assert response.status == 201, await response.text()
    project_id = (await response.json())["project_id"]
    response = await client.post(f"/api/mv/projects/{project_id}/write_scenes", json={"number_of_scenes": 2})
    assert response.status == 200, await response.text()
    project_prompt = sim.prompts[-1]
    for key in ("label", "description", "camera", "palette", "pacing"):
        assert PRESETS["synthwave"][key] in project_prompt, key
    assert "Style: synthwave" not in project_prompt  # the preset's name is not mistaken for style words

    debug = [
        r.getMessage()
        for r in caplog.records
        if r.name == "mvserver.debug" and "write_scenes prompt sent to Gemini" in r.getMessage().split("\n", 1)[0]
    ]
    assert len(debug) == 1 and debug[0].split("\n", 1)[1] == project_prompt

    response = await client.post(URL, json={**BODY, "style": "synthwave"})
    assert response.status == 200, await response.text()
    assert sim.prompts[-1] == project_prompt  # one code path: the very same prompt
