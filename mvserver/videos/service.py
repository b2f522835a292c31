"""Video jobs from a prompt, an optional reference image and the client's rules: the checks, the full prompt and
the submission; :mod:`mvserver.videos.routes` and the projects service call it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Awaitable, Callable
from typing import Any

import jinja2
import jinja2.nodes
import jinja2.sandbox
from aiohttp import web
from PIL import Image, UnidentifiedImageError

from mvserver.appkeys import ARTEFACTS, CONFIG, JOBS, PROVIDERS
from mvserver.core.artefacts import artefact_key, new_id
from mvserver.core.config import Config
from mvserver.core.debug import debug_print
from mvserver.core.errors import ApiError
from mvserver.images.service import FORMATS, load_image
from mvserver.jobs import Job
from mvserver.jobs.options import job_fields

IMAGE_TYPES = {fmt.pillow: fmt.mime_type for fmt in FORMATS.values()}  # Pillow format name -> MIME type
RULES_VARIABLES = ("prompt", "aspect_ratio", "duration")
_client_templates = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def sniff_image(data: bytes, field: str, max_pixels: int) -> str:
    """The MIME type of a PNG, JPEG or WebP image of at most ``max_pixels``; 400 naming ``field`` otherwise.

    Only the header is read (``Image.open`` is lazy and ``verify`` does not decode pixels), so an image of huge
    dimensions is refused before anything allocates its pixels. Runs in a thread.
    """
    too_large = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            width, height = image.size
            if width * height > max_pixels:
                too_large = f"{width}x{height} pixels"
            else:
                image.verify()
    except Image.DecompressionBombError:  # Pillow's own header check, far above ours
        kind, too_large = None, f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        kind = None
    if too_large:
        raise ApiError(
            400,
            "invalid_field",
            f"{field}: the image is {too_large}; at most {max_pixels} pixels are accepted",
            field=field,
        )
    if kind not in IMAGE_TYPES:
        raise ApiError(400, "invalid_field", f"{field}: not a PNG, JPEG or WebP image", field=field)
    return IMAGE_TYPES[kind]


_BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n")
_URL_SAFE = str.maketrans("-_", "+/")


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """Decode base64 or a ``data:image/...;base64,`` URI.

    Accepted: the standard or the URL-safe alphabet (not both in one value), with or without ``=`` padding, with
    line breaks and spaces anywhere (MIME-style wrapping). Anything else is refused rather than guessed at.
    """
    field = "reference_image_base64"
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "invalid_field", f"{field}: a data: URI must be base64-encoded", field=field)
    text = text.translate(_BASE64_WHITESPACE)
    if ("-" in text or "_" in text) and ("+" in text or "/" in text):
        raise ApiError(400, "invalid_field", f"{field}: mixes the standard and URL-safe base64 alphabets", field=field)
    text = text.translate(_URL_SAFE)
    if len(text) % 4 and "=" not in text:
        text += "=" * (-len(text) % 4)
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
    for field, allowed in (
        ("aspect_ratio", rules.reference_image_aspect_ratios),
        ("duration", rules.reference_image_durations),
    ):
        if getattr(body, field) not in allowed:
            raise ApiError(
                400,
                "invalid_field",
                f"{field}: with a reference image the replicate backend accepts only {allowed}",
                field=field,
            )


async def reference_image(app: web.Application, body: Any, owner: str | None = None) -> tuple[bytes | None, str | None]:
    """The reference image sent inline or by ``image_id`` (which ``owner`` must be allowed to use), validated;
    (None, None) when there is none."""
    if body.reference_image_base64 and body.reference_image_id:
        raise ApiError(
            400,
            "invalid_field",
            "send reference_image_base64 or reference_image_id, not both",
            field="reference_image_base64",
        )
    limits = app[CONFIG].videos.limits
    if body.reference_image_id:
        data, mime_type = await load_image(app, body.reference_image_id, owner)
        await asyncio.to_thread(sniff_image, data, "reference_image_id", limits.reference_image_max_pixels)
        return data, mime_type
    if not body.reference_image_base64:
        return None, None
    data = decode_base64_image(body.reference_image_base64, limits.reference_image_max_bytes)
    return data, await asyncio.to_thread(sniff_image, data, "reference_image_base64", limits.reference_image_max_pixels)


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


def whole_prompt(config: Config, body: Any) -> str:
    """The scene prompt with the video rules appended (the client's own rules template, or the configured one);
    ``body`` needs ``prompt``, ``aspect_ratio``, ``duration`` and ``video_rules_template``."""
    variables = {"prompt": body.prompt, "aspect_ratio": body.aspect_ratio, "duration": body.duration}
    if body.video_rules_template is None:
        rules = config.render("videos.video_rules_template", **variables)
    else:
        rules = render_client_rules(body.video_rules_template, variables)
    return f"{body.prompt}\n\n{rules}" if rules else body.prompt


def full_prompt(config: Config, body: Any) -> str:
    """The :func:`whole_prompt`, capped at ``limits.full_prompt_max_chars``: a rules template may repeat
    ``{{ prompt }}``, and the whole prompt is what the provider takes (and what the job record keeps). 400 names
    ``video_rules_template`` when the client's template made it too long, ``prompt`` otherwise.
    """
    prompt = whole_prompt(config, body)
    limit = config.videos.limits.full_prompt_max_chars
    if len(prompt) > limit:
        field = "video_rules_template" if body.video_rules_template and len(body.prompt) <= limit else "prompt"
        raise ApiError(
            400,
            "invalid_field",
            f"{field}: the full prompt (scene prompt + video rules) would be "
            f"{len(prompt)} characters; at most {limit} are accepted",
            field=field,
        )
    return prompt


async def submit_video_job(
    app: web.Application,
    body: Any,
    defaulted: list[str],
    links: dict[str, Any] | None = None,
    owner: str | None = None,
    charge: Callable[[], Awaitable[list[str]]] | None = None,
    job_id: str | None = None,
) -> Job:
    """Validate the reference image, render the full prompt and submit a video job (the body is a video request
    model). ``links`` (e.g. ``project_id``/``scene_id``) are kept in ``Job.request``; ``owner`` is the caller's key
    id; ``charge`` takes the caller's quota once the request is known to be valid and answers the job's id (else
    ``job_id``, e.g. one a caller charged for already, or a new one)."""
    config = app[CONFIG]
    image, mime_type = await reference_image(app, body, owner)
    if image is not None:
        check_reference_shape(config, body)
    prompt = full_prompt(config, body)
    debug_print(config.debug, f"generate_video prompt sent to {body.backend}", prompt)
    summary = body.model_dump(exclude={"reference_image_base64"})
    summary.update(full_prompt=prompt, defaults_applied=defaulted, has_reference_image=image is not None)
    summary.update(links or {})
    if charge is not None:
        [job_id] = await charge()  # only a request that got this far costs a token
    backend = app[PROVIDERS].video_backend(body.backend)
    job = Job(
        id=job_id or new_id(),
        backend=body.backend,
        model=backend.model,
        sandbox=backend.sandbox,
        request=summary,
        reference_mime_type=mime_type,
        owner=owner,
        **job_fields(body),
    )
    if image is not None:
        await app[ARTEFACTS].put_bytes(artefact_key("jobs", job.id, ".ref"), image)
    return await app[JOBS].submit(job)
