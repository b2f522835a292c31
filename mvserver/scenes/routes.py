"""``POST /api/mv/create_scenes``: idea + character -> N scene prompts written by Gemini as structured JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from mvserver.core.artefacts import ARTEFACTS, artefact_key, check_id, new_id
from mvserver.core.config import CONFIG, TEMPLATES, Config
from mvserver.core.debug import debug_print
from mvserver.core.errors import ApiError
from mvserver.openapi.schemas import REQUEST_MODELS, parse_body
from mvserver.providers import PROVIDERS
from mvserver.web.access.auth import key_id, owned_sidecar
from mvserver.web.access.quotas import charge

routes = web.RouteTableDef()


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
    request: web.Request,
    params: dict[str, Any],
    defaulted: list[str],
    caller: str = "create_scenes",
    song: SongBrief | None = None,
) -> dict[str, Any]:
    """Render the prompt, ask Gemini (again once if the reply is malformed), save JSON and Markdown copies.

    Every scene writer (``create_scenes``, a project's ``write_scenes``: ``caller`` in the debug records) comes
    through here, so a style preset is rendered the same way for all of them. ``song``: the project's song, sent
    after the prompt (its timeline as text, the audio inline)."""
    config: Config = request.app[CONFIG]
    settings = config.scenes
    gemini = request.app[PROVIDERS].gemini
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
    return await _save(request, params, defaulted, [s.model_dump() for s in scenes], elapsed, attempt, song)


async def _save(
    request: web.Request,
    params: dict[str, Any],
    defaulted: list[str],
    scenes: list[dict[str, Any]],
    elapsed: float,
    attempts: int,
    song: SongBrief | None = None,
) -> dict[str, Any]:
    config: Config = request.app[CONFIG]
    store = request.app[ARTEFACTS]
    sandbox = "gemini_scenes" in request.app[PROVIDERS].sandboxed
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
    owner = key_id(request)
    record = {"scenes_id": scenes_id, "scenes": scenes, "metadata": metadata}
    if owner is not None:
        record["owner_key_id"] = owner
    await store.put_json(artefact_key("scenes", scenes_id, ".json"), record, create_only=True)
    markdown = (
        request.app[TEMPLATES]
        .get_template("scenes.md.j2")
        .render(scenes_id=scenes_id, scenes=scenes, metadata=metadata)
    )
    await store.put_bytes(artefact_key("scenes", scenes_id, ".md"), markdown.encode(), create_only=True)
    body = {
        "scenes_id": scenes_id,
        "scenes": scenes,
        "sandbox": sandbox,
        "urls": {"json": f"/api/mv/get_scenes/{scenes_id}.json", "markdown": f"/api/mv/get_scenes/{scenes_id}.md"},
        "metadata": metadata,
    }
    return body


@routes.post("/api/mv/create_scenes")
async def create_scenes(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body, defaulted = await parse_body(request, request.app[REQUEST_MODELS].scenes, config.debug)
    await charge(request, "blocking")
    return web.json_response(await write_scenes(request, body.model_dump(), defaulted))


@routes.get(r"/api/mv/get_scenes/{scenes_id}.{ext:json|md}")
async def get_scenes(request: web.Request) -> web.StreamResponse:
    """The scene list as JSON or Markdown; with keys on, only the key that wrote it (or anyone, for scenes written
    without keys) may read it."""
    scenes_id = check_id(request.match_info["scenes_id"], "scenes_id")
    store = request.app[ARTEFACTS]
    ext = request.match_info["ext"]
    key = artefact_key("scenes", scenes_id, "." + ext)
    if await store.stat(key) is None or (
        key_id(request) is not None
        and await owned_sidecar(store, artefact_key("scenes", scenes_id, ".json"), key_id(request)) is None
    ):
        raise ApiError(404, "not_found", f"no scenes with id {scenes_id}")
    content_type = "application/json" if ext == "json" else "text/markdown"
    return await store.response(key, noun="scene list", headers={"Content-Type": f"{content_type}; charset=utf-8"})
