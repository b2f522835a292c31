"""``POST /api/mv/create_scenes``: idea + character -> N scene prompts written by Gemini as structured JSON."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from mvserver.appkeys import CONFIG, PROVIDERS, REQUEST_MODELS, STORE, TEMPLATES
from mvserver.core.errors import ApiError
from mvserver.core.storage import check_id
from mvserver.scenes.service import SceneDeps, write_scenes
from mvserver.web.access.auth import key_id, visible_to
from mvserver.web.access.quotas import charge
from mvserver.web.body import parse_body
from mvserver.web.files import SavedFileResponse


def scene_deps(app: web.Application) -> SceneDeps:
    """The scene writer's dependencies, from the app."""
    return SceneDeps(app[CONFIG], app[PROVIDERS], app[STORE], app[TEMPLATES])


async def create_scenes(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body, defaulted = await parse_body(request, request.app[REQUEST_MODELS].scenes, config.debug)
    await charge(request, "blocking")
    scenes = await write_scenes(scene_deps(request.app), body.model_dump(), defaulted, owner=key_id(request))
    return web.json_response(scenes)


async def _visible(json_path: Path, caller: str | None) -> bool:
    """With keys on, only the key that wrote the scenes (or anyone, for scenes written without keys) may read them."""
    if caller is None:
        return True
    try:
        record = json.loads(await asyncio.to_thread(json_path.read_bytes))
        return visible_to(record.get("owner_key_id"), caller)
    except (OSError, ValueError, AttributeError):
        return False


async def get_scenes(request: web.Request) -> web.FileResponse:
    scenes_id = check_id(request.match_info["scenes_id"], "scenes_id")
    store = request.app[STORE]
    path = store.path("scenes", scenes_id, "." + request.match_info["ext"])
    if not path.is_file() or not await _visible(store.path("scenes", scenes_id, ".json"), key_id(request)):
        raise ApiError(404, "not_found", f"no scenes with id {scenes_id}")
    content_type = "application/json" if path.suffix == ".json" else "text/markdown"
    return SavedFileResponse(path, noun="scene list", headers={"Content-Type": f"{content_type}; charset=utf-8"})
