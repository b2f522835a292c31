"""Scene lists written by Gemini: the prompt rendered from the settings, the reply checked (asked again once when
malformed), JSON and Markdown copies saved. Every scene writer comes through :func:`write_scenes`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jinja2
from pydantic import BaseModel

from mvserver.core.artefacts import Artefacts, artefact_key, new_id
from mvserver.core.config import Config
from mvserver.core.debug import debug_print
from mvserver.core.errors import ApiError
from mvserver.providers import Providers


@dataclass(frozen=True)
class SceneDeps:
    """What the scene writer needs: the settings, the providers (Gemini, and whether it is the simulator), where the
    scene lists are saved and the templates their Markdown copy is rendered with."""

    config: Config
    providers: Providers
    artefacts: Artefacts
    templates: jinja2.Environment


class Scene(BaseModel):
    description: str
    negative_description: str


class SceneList(BaseModel):
    """The response schema Gemini is asked to fill."""

    scenes: list[Scene]


@dataclass(frozen=True)
class SongBrief:
    """What a project's scene writer sends Gemini after the prompt: the song's timeline (sections, each scene's
    window) as text, and the song itself (a small compressed copy, inline; None if there is none)."""

    text: str
    audio: bytes | None = None
    mime_type: str = "audio/mp3"
    audio_id: str | None = None


def style_variables(config: Config, name: str | None) -> dict[str, str] | None:
    """The preset a request named, as template variables (the request model only lets known names through)."""
    if name is None:
        return None
    return {"name": name, **config.styles[name].model_dump()}


def _valid_reply(parsed: BaseModel | None, count: int) -> list[Scene] | None:
    if not isinstance(parsed, SceneList) or len(parsed.scenes) != count:
        return None
    if any(not s.description.strip() for s in parsed.scenes):
        return None
    return parsed.scenes


async def write_scenes(
    deps: SceneDeps,
    params: dict[str, Any],
    defaulted: list[str],
    caller: str = "create_scenes",
    song: SongBrief | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """Render the prompt, ask Gemini (again once if the reply is malformed), save JSON and Markdown copies.

    Every scene writer (``create_scenes``, a project's ``write_scenes``: ``caller`` in the debug records) comes
    through here, so a style preset is rendered the same way for all of them. ``song``: the project's song, sent
    after the prompt (its timeline as text, the audio inline); ``owner``: the caller's key, which owns the list."""
    config = deps.config
    settings = config.scenes
    gemini = deps.providers.gemini
    prompt = config.render("scenes.prompt", **{**params, "style": style_variables(config, params.get("style"))})
    debug_print(config.debug, f"{caller} prompt sent to Gemini", prompt)
    if song is not None:
        debug_print(
            config.debug,
            f"{caller} song sent to Gemini ({len(song.audio or b'')} bytes of {song.mime_type})",
            song.text,
        )
    started = time.monotonic()
    attempts = settings.malformed_reply_retries + 1
    scenes: list[Scene] | None = None
    for attempt in range(1, attempts + 1):
        parsed, raw = await gemini.generate_json(
            settings.model,
            prompt,
            SceneList,
            temperature=settings.temperature,
            timeout=settings.timeout_seconds,
            context=song.text if song else None,
            audio=(song.audio, song.mime_type) if song and song.audio else None,
        )
        debug_print(config.debug, f"{caller} raw reply from Gemini (attempt {attempt})", raw)
        scenes = _valid_reply(parsed, params["number_of_scenes"])
        if scenes is not None:
            break
    if scenes is None:
        raise ApiError(
            502,
            "provider_malformed_output",
            f"Gemini did not return {params['number_of_scenes']} valid scenes as JSON after {attempts} attempts",
            provider="gemini",
        )
    elapsed = round(time.monotonic() - started, 3)
    return await _save(deps, params, defaulted, [s.model_dump() for s in scenes], elapsed, attempt, song, owner)


async def _save(
    deps: SceneDeps,
    params: dict[str, Any],
    defaulted: list[str],
    scenes: list[dict[str, Any]],
    elapsed: float,
    attempts: int,
    song: SongBrief | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    config = deps.config
    store = deps.artefacts
    sandbox = "gemini_scenes" in deps.providers.sandboxed
    scenes_id = new_id()
    metadata = {
        "model": config.scenes.model,
        "parameters": params,
        "defaults_applied": defaulted,
        "elapsed_seconds": elapsed,
        "attempts": attempts,
        "sandbox": sandbox,
    }
    if song is not None:  # what Gemini got with the prompt
        metadata["song"] = {
            "audio_id": song.audio_id,
            "audio_bytes": len(song.audio or b""),
            "audio_mime_type": song.mime_type if song.audio else None,
            "timeline": song.text,
        }
    record = {"scenes_id": scenes_id, "scenes": scenes, "metadata": metadata}
    if owner is not None:
        record["owner_key_id"] = owner
    await store.put_json(artefact_key("scenes", scenes_id, ".json"), record, create_only=True)
    markdown = deps.templates.get_template("scenes.md.j2").render(scenes_id=scenes_id, scenes=scenes, metadata=metadata)
    await store.put_bytes(artefact_key("scenes", scenes_id, ".md"), markdown.encode(), create_only=True)
    body = {
        "scenes_id": scenes_id,
        "scenes": scenes,
        "sandbox": sandbox,
        "urls": {"json": f"/api/mv/get_scenes/{scenes_id}.json", "markdown": f"/api/mv/get_scenes/{scenes_id}.md"},
        "metadata": metadata,
    }
    return body
