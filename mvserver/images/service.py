"""Character reference images: rendering them with Imagen and reading saved ones (the image formats, the sidecar
reader); the routes in :mod:`mvserver.images.routes` and other features call it."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from mvserver.appkeys import ARTEFACTS, CONFIG, PROVIDERS
from mvserver.core.artefacts import Artefacts, artefact_key, check_id, new_id
from mvserver.core.config import Config
from mvserver.core.debug import debug_print
from mvserver.core.errors import ApiError
from mvserver.web.access.auth import owned_sidecar

PROVIDER = "replicate"


@dataclass(frozen=True)
class ImageFormat:
    pillow: str
    mime_type: str
    suffix: str


FORMATS = {
    "png": ImageFormat("PNG", "image/png", ".png"),
    "jpg": ImageFormat("JPEG", "image/jpeg", ".jpg"),
    "webp": ImageFormat("WEBP", "image/webp", ".webp"),
}
_BY_MIME = {fmt.mime_type: fmt for fmt in FORMATS.values()}


def imagen_inputs(prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """The ``google/imagen-4`` input object; the negative prompt and seed are sent only when given."""
    inputs = {
        "prompt": prompt,
        "aspect_ratio": params["aspect_ratio"],
        "safety_filter_level": params["safety_filter_level"],
        "person_generation": params["person_generation"],
        "output_format": params["output_format"],
    }
    if params["negative_prompt"]:
        inputs["negative_prompt"] = params["negative_prompt"]
    if params["seed"] is not None:
        inputs["seed"] = params["seed"]
    return inputs


def checked_base64(data: bytes, output_format: str) -> str:
    """Base64 of ``data`` after checking it decodes as an image in ``output_format`` (CPU work: run in a thread)."""
    expected = FORMATS[output_format].pillow
    try:
        with Image.open(io.BytesIO(data)) as image:
            actual = image.format
            image.verify()
    except Exception as exc:  # Pillow raises many kinds of errors for a broken file
        raise ApiError(
            502,
            "provider_bad_output",
            f"{PROVIDER} returned an output that is not a readable image: {exc}",
            provider=PROVIDER,
            provider_status="succeeded",
        ) from None
    if actual != expected:
        raise ApiError(
            502,
            "provider_bad_output",
            f"{PROVIDER} returned a {actual} image, expected {output_format}",
            provider=PROVIDER,
            provider_status="succeeded",
        )
    return base64.b64encode(data).decode("ascii")


async def _predict_all(
    app: web.Application, prompt: str, params: dict[str, Any], abandoned: Callable[[], bool]
) -> list[tuple[bytes, Any, int | None]]:
    """Run ``number_of_images`` Imagen predictions at once; if one fails or the client leaves, cancel them all."""
    config: Config = app[CONFIG]
    settings = config.images
    replicate = app[PROVIDERS].replicate
    seeds = [None if params["seed"] is None else params["seed"] + i for i in range(params["number_of_images"])]

    async def one(seed: int | None) -> tuple[bytes, Any, int | None]:
        inputs = imagen_inputs(prompt, {**params, "seed": seed})
        debug_print(config.debug, f"generate_character_reference input for {settings.model}", inputs)
        data, prediction = await replicate.generate_image(
            settings.model,
            inputs,
            timeout=settings.timeout_seconds,
            poll_interval=settings.poll_interval_seconds,
            abandoned=abandoned,
        )
        return data, prediction, seed

    tasks = [asyncio.ensure_future(one(seed)) for seed in seeds]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:  # each cancelled task cancels its own prediction on the way out
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def generate_reference(
    app: web.Application,
    params: dict[str, Any],
    defaulted: list[str],
    abandoned: Callable[[], bool] = lambda: False,
    owner: str | None = None,
) -> dict[str, Any]:
    """Render the prompt, run Imagen N times in parallel (all canceled if ``abandoned()``), check and save the
    images only once every one has succeeded; return the body (the first image at the top level, all in ``images``).

    ``owner`` (the caller's key id, with keys on) is recorded in each sidecar; only that key may read or use them."""
    config: Config = app[CONFIG]
    settings = config.images
    providers = app[PROVIDERS]
    prompt = config.render(
        "images.prompt", character_description=params["character_description"], aspect_ratio=params["aspect_ratio"]
    )
    debug_print(config.debug, "generate_character_reference prompt sent to Replicate", prompt)
    started = time.monotonic()
    results = await _predict_all(app, prompt, params, abandoned)
    encoded = await asyncio.gather(
        *(asyncio.to_thread(checked_base64, data, params["output_format"]) for data, _, _ in results)
    )
    elapsed = round(time.monotonic() - started, 3)
    fmt = FORMATS[params["output_format"]]
    sandbox = PROVIDER in providers.sandboxed
    metadata = {
        "model": settings.model,
        "prompt": prompt,
        "parameters": params,
        "defaults_applied": defaulted,
        "prediction_id": results[0][1].id,
        "prediction_ids": [prediction.id for _, prediction, _ in results],
        "elapsed_seconds": elapsed,
    }
    store = app[ARTEFACTS]
    images = []
    for data, prediction, seed in results:
        image_id = new_id()
        await store.put_bytes(artefact_key("images", image_id, fmt.suffix), data, create_only=True)
        # The sidecar is written last: an image counts as saved once its sidecar exists.
        sidecar = {
            "image_id": image_id,
            "mime_type": fmt.mime_type,
            "sandbox": sandbox,
            **metadata,
            "prediction_id": prediction.id,
            "seed": seed,
        }
        if owner is not None:
            sidecar["owner_key_id"] = owner
        await store.put_json(artefact_key("images", image_id, ".json"), sidecar, create_only=True)
        images.append(
            {
                "image_id": image_id,
                "mime_type": fmt.mime_type,  # never the server path of the file
                "image_url": f"/api/mv/get_image/{image_id}",
                "prediction_id": prediction.id,
                "seed": seed,
            }
        )
    first = images[0]
    body = {
        "image_id": first["image_id"],
        "image_base64": encoded[0],
        "mime_type": fmt.mime_type,
        "image_url": first["image_url"],
        "sandbox": sandbox,
        "metadata": metadata,
        "images": images,
    }
    return body


async def saved_image(store: Artefacts, image_id: str, field: str, caller: str | None = None) -> tuple[str, str]:
    """The key and mime type of a saved image; ``image_id`` must already be checked. Another key's image is 404."""
    sidecar = await owned_sidecar(store, artefact_key("images", image_id, ".json"), caller)
    fmt = _BY_MIME.get(str(sidecar.get("mime_type"))) if sidecar is not None else None
    if fmt is None or await store.stat(artefact_key("images", image_id, fmt.suffix)) is None:
        raise ApiError(404, "not_found", f"no image with id {image_id}", field=field)
    return artefact_key("images", image_id, fmt.suffix), fmt.mime_type


async def load_image(app: web.Application, image_id: str, caller: str | None = None) -> tuple[bytes, str]:
    """The bytes and mime type of a saved image, for ``reference_image_id`` (ApiError 400 if malformed, 404 if missing
    or another key's)."""
    field = "reference_image_id"
    key, mime_type = await saved_image(app[ARTEFACTS], check_id(image_id, field), field, caller)
    try:
        return await app[ARTEFACTS].get_bytes(key), mime_type
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"no image with id {image_id}", field=field) from None
