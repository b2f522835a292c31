"""``POST /api/mv/create_scenes``: idea + character -> N scene prompts written by Gemini as structured JSON."""

from __future__ import annotations

from aiohttp import web

from mvserver.appkeys import ARTEFACTS, CONFIG, REQUEST_MODELS, SCENE_DEPS
from mvserver.core.artefacts import artefact_key, check_id
from mvserver.core.errors import ApiError
from mvserver.scenes.service import write_scenes
from mvserver.web.access.auth import key_id, owned_sidecar
from mvserver.web.access.quotas import charge
from mvserver.web.body import parse_body


async def create_scenes(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body, defaulted = await parse_body(request, request.app[REQUEST_MODELS].scenes, config.debug)
    await charge(request, "blocking")
    scenes = await write_scenes(request.app[SCENE_DEPS], body.model_dump(), defaulted, owner=key_id(request))
    return web.json_response(scenes)


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
