"""``POST /api/mv/generate_character_reference`` and ``GET /api/mv/get_image/{image_id}``.

A character description becomes a full-body reference image rendered by Replicate ``google/imagen-4``. The image is
saved as ``images/<id>.<ext>`` with a JSON sidecar ``images/<id>.json`` (mime type, prompt, parameters) and returned
base64-encoded as well.
"""

from __future__ import annotations

from aiohttp import web

from mvserver.appkeys import ARTEFACTS, CONFIG, REQUEST_MODELS
from mvserver.core.artefacts import check_id
from mvserver.images.service import generate_reference, saved_image
from mvserver.web.access.auth import key_id
from mvserver.web.access.quotas import charge
from mvserver.web.body import parse_body


async def generate_character_reference(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body, defaulted = await parse_body(request, request.app[REQUEST_MODELS].image, config.debug)
    await charge(request, "blocking")

    def abandoned() -> bool:
        return request.transport is None or request.transport.is_closing()

    return web.json_response(
        await generate_reference(request.app, body.model_dump(), defaulted, abandoned, owner=key_id(request))
    )


async def get_image(request: web.Request) -> web.StreamResponse:
    image_id = check_id(request.match_info["image_id"], "image_id")
    key, mime_type = await saved_image(request.app[ARTEFACTS], image_id, "image_id", key_id(request))
    return await request.app[ARTEFACTS].response(key, noun="image", headers={"Content-Type": mime_type})
