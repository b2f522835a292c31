"""``POST /api/mv/generate_video``, the job endpoints (JSON, SSE, cancel) and ``GET /api/mv/get_video/{video_id}``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from typing import Any

import jinja2
import jinja2.nodes
import jinja2.sandbox
from aiohttp import web
from PIL import Image, UnidentifiedImageError

from .backends import PROVIDERS
from .config import CONFIG, Config
from .debug import debug_print
from .errors import ApiError
from .images import FORMATS, load_image
from .jobs import JOBS, Job, job_urls, stream_events
from .schemas import REQUEST_MODELS, parse_body
from .storage import STORE, check_id, new_id

routes = web.RouteTableDef()

IMAGE_TYPES = {fmt.pillow: fmt.mime_type for fmt in FORMATS.values()}  # Pillow format name -> MIME type
RULES_VARIABLES = ("prompt", "aspect_ratio", "duration")
_client_templates = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def sniff_image(data: bytes, field: str) -> str:
    """The MIME type of a PNG, JPEG or WebP image; 400 naming ``field`` for anything else (runs in a thread)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        kind = None
    if kind not in IMAGE_TYPES:
        raise ApiError(400, "invalid_field", f"{field}: not a PNG, JPEG or WebP image", field=field)
    return IMAGE_TYPES[kind]


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """Decode plain base64 or a ``data:image/...;base64,`` URI."""
    field = "reference_image_base64"
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "invalid_field", f"{field}: a data: URI must be base64-encoded", field=field)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_field", f"{field}: not valid base64", field=field) from None
    if not data or len(data) > max_bytes:
        raise ApiError(400, "invalid_field", f"{field}: the image must be 1 to {max_bytes} bytes", field=field)
    return data


def check_reference_shape(config: Config, body: Any) -> None:
    """Replicate's Veo takes reference images only for some shapes; refuse the others before spending money."""
    if body.backend != "replicate":
        return
    rules = config.videos.backends.replicate
    for field, allowed in (("aspect_ratio", rules.reference_image_aspect_ratios),
                           ("duration", rules.reference_image_durations)):
        if getattr(body, field) not in allowed:
            raise ApiError(400, "invalid_field", f"{field}: with a reference image the replicate backend accepts only "
                                                 f"{allowed}", field=field)


async def reference_image(request: web.Request, body: Any) -> tuple[bytes | None, str | None]:
    """The reference image sent inline or by ``image_id``, validated; (None, None) when there is none."""
    if body.reference_image_base64 and body.reference_image_id:
        raise ApiError(400, "invalid_field", "send reference_image_base64 or reference_image_id, not both",
                       field="reference_image_base64")
    if body.reference_image_id:
        return await load_image(request.app, body.reference_image_id)
    if not body.reference_image_base64:
        return None, None
    limit = request.app[CONFIG].videos.limits.reference_image_max_bytes
    data = decode_base64_image(body.reference_image_base64, limit)
    return data, await asyncio.to_thread(sniff_image, data, "reference_image_base64")


def render_client_rules(source: str, variables: dict[str, Any]) -> str:
    """Render a client's rules template, which may only substitute the known variables.

    Statements, expressions and filters are refused: a loop or arithmetic in an untrusted template could spend
    unbounded CPU or memory, and substitution is all rules need.
    """
    field = "video_rules_template"
    allowed = ", ".join(f"{{{{ {name} }}}}" for name in RULES_VARIABLES)
    try:
        tree = _client_templates.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ApiError(400, "invalid_field", f"{field}: {exc.message}", field=field) from None
    for node in tree.body:
        parts = node.nodes if isinstance(node, jinja2.nodes.Output) else [node]
        for part in parts:
            plain = isinstance(part, jinja2.nodes.TemplateData)
            if not plain and not (isinstance(part, jinja2.nodes.Name) and part.name in RULES_VARIABLES):
                raise ApiError(400, "invalid_field", f"{field}: only {allowed} may be used", field=field)
    return _client_templates.from_string(source).render(**variables).strip()


def full_prompt(config: Config, body: Any) -> str:
    """The scene prompt with the video rules appended (the client's own rules template, or the configured one)."""
    variables = {"prompt": body.prompt, "aspect_ratio": body.aspect_ratio, "duration": body.duration}
    if body.video_rules_template is None:
        rules = config.render("videos.video_rules_template", **variables)
    else:
        rules = render_client_rules(body.video_rules_template, variables)
    return f"{body.prompt}\n\n{rules}" if rules else body.prompt


@routes.post("/api/mv/generate_video")
async def generate_video(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body, defaulted = await parse_body(request, request.app[REQUEST_MODELS].video, config.debug)
    image, mime_type = await reference_image(request, body)
    if image is not None:
        check_reference_shape(config, body)
    prompt = full_prompt(config, body)
    debug_print(config.debug, f"generate_video prompt sent to {body.backend}", prompt)
    summary = body.model_dump(exclude={"reference_image_base64"})
    summary.update(full_prompt=prompt, defaults_applied=defaulted, has_reference_image=image is not None)
    backend = request.app[PROVIDERS].video_backend(body.backend)
    job = Job(id=new_id(), backend=body.backend, model=backend.model, sandbox=backend.sandbox, request=summary,
              reference_mime_type=mime_type)
    if image is not None:
        store = request.app[STORE]
        await store.write_bytes(store.path("jobs", job.id, ".ref"), image)
    await request.app[JOBS].submit(job)
    payload = {"job_id": job.id, "status": job.status, "backend": job.backend, "sandbox": job.sandbox, **job_urls(job.id)}
    return web.json_response(payload, status=202, headers={"Location": payload["status_url"]})


async def _job(request: web.Request) -> Job:
    job_id = check_id(request.match_info["job_id"], "job_id")
    job = await request.app[JOBS].get(job_id)
    if job is None:
        await _not_expired(request, job_id)
        raise ApiError(404, "not_found", f"no job with id {job_id}")
    return job


async def _not_expired(request: web.Request, job_id: str) -> None:
    if await request.app[JOBS].expired(job_id):
        raise ApiError(410, "expired", f"job {job_id} finished long ago and was removed (jobs.retention_hours)")


@routes.get("/api/mv/jobs/{job_id}")
async def job_status(request: web.Request) -> web.Response:
    return web.json_response((await _job(request)).public())


@routes.delete("/api/mv/jobs/{job_id}")
@routes.post("/api/mv/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    job = await request.app[JOBS].cancel((await _job(request)).id)
    assert job is not None
    return web.json_response(job.public())


@routes.get("/api/mv/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    jobs = request.app[JOBS]
    settings = request.app[CONFIG].videos.jobs
    return await stream_events(request, jobs, (await _job(request)).id, ping_interval=settings.sse_ping_interval_seconds,
                               retry_ms=settings.sse_retry_ms)


@routes.get("/api/mv/get_video/{video_id}")
async def get_video(request: web.Request) -> web.StreamResponse:
    video_id = check_id(request.match_info["video_id"], "video_id")
    path = request.app[STORE].path("videos", video_id, ".mp4")
    job = await request.app[JOBS].get(video_id)
    if job is not None and job.status != "succeeded":
        code = {"failed": "job_failed", "canceled": "job_canceled"}.get(job.status, "video_not_ready")
        cause = job.error or {}
        message = f"job {video_id} is {job.status}" + (f": {cause['message']}" if cause else f" ({job.stage})")
        raise ApiError(409, code, message, provider=cause.get("provider"),
                       provider_status=cause.get("provider_status"), provider_error=cause.get("provider_error"))
    if not await asyncio.to_thread(path.is_file):
        await _not_expired(request, video_id)
        raise ApiError(404, "not_found", f"no video with id {video_id}")
    return web.FileResponse(path, headers={"Content-Type": "video/mp4", "Cache-Control": "private, max-age=3600"})
