"""The demo page at ``/``: one HTML page (plus a script and a stylesheet) that drives the whole API."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from aiohttp import web

from mvserver import __version__
from mvserver.appkeys import ARTEFACTS, CONFIG, TEMPLATES
from mvserver.core.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_NAME = re.compile(r"[A-Za-z0-9_-]+\.(?:js|css)")
# Everything the page loads comes from this origin (images are data: URIs), but what an artefact route redirects
# to: with artefacts in object storage, a <video> or <img> follows the 302 to the bucket, which must be allowed too.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "img-src 'self' data:",
        "media-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


def content_security_policy(link_origin: str | None) -> str:
    """The page's policy, with ``link_origin`` (where artefact routes redirect) allowed for media and images."""
    if link_origin is None:
        return CONTENT_SECURITY_POLICY
    return CONTENT_SECURITY_POLICY.replace("img-src 'self'", f"img-src 'self' {link_origin}").replace(
        "media-src 'self'", f"media-src 'self' {link_origin}"
    )


EXAMPLE = {
    "idea": "A synth-pop song about missing the last train home and walking across the rainy city at night",
    "character_description": "a woman in her late twenties with short silver hair, round glasses, a yellow raincoat "
    "over a black hoodie, dark jeans and white sneakers",
}


async def index(request: web.Request) -> web.Response:
    """The music-video project page: song, project and scenes, character, clips, assembly."""
    return await _page(request, "index.html.j2")


async def single(request: web.Request) -> web.Response:
    """The single-clip page: scenes, one character image and independent video jobs, without a project."""
    return await _page(request, "single.html.j2")


async def _page(request: web.Request, template: str) -> web.Response:
    """A page prefilled with example text and the configured defaults and limits."""
    config = request.app[CONFIG]
    page = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            version=__version__,
            example=EXAMPLE,
            scenes=config.scenes,
            default_backend=config.videos.default_backend,
            backends=list(type(config.videos.backends).model_fields),
        )
    )
    return web.Response(
        text=page,
        content_type="text/html",
        headers={
            "Content-Security-Policy": content_security_policy(await request.app[ARTEFACTS].link_origin()),
            "Cache-Control": "no-store",
        },
    )


async def static_file(request: web.Request) -> web.FileResponse:
    """The page's script and stylesheet; anything else is a JSON 404 like every other unknown path."""
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if not STATIC_NAME.fullmatch(name) or not await asyncio.to_thread(path.is_file):
        raise ApiError(404, "not_found", f"no static file {name}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
