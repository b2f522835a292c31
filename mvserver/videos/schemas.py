"""The request model of ``POST /api/mv/generate_video``.

Built once at start-up from the settings with ``pydantic.create_model``: YAML defaults become field defaults,
allowed-value lists become ``Literal`` types, and ``model_fields_set`` tells which fields the client sent.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, create_model

from mvserver.core.config import Config
from mvserver.core.fields import INTEGRAL, SEED, STRICT, UUID4_PATTERN, choice, text
from mvserver.jobs.options import option_fields

_text, _choice = text, choice


def video_request_model(config: Config) -> type[BaseModel]:
    s = config.videos
    d, a = s.defaults, s.allowed
    # base64 of the largest image, line-wrapped MIME-style (CRLF every 76 characters), plus a data: URI header
    base64_limit = (s.limits.reference_image_max_bytes + 2) // 3 * 4 * 78 // 76 + 256
    return create_model(
        "GenerateVideoRequest",
        __config__=STRICT,
        prompt=(_text(s.limits.text_max_chars), Field(description="The scene description.")),
        negative_prompt=(_text(s.limits.text_max_chars, blank=True), d.negative_prompt),
        aspect_ratio=(_choice(a.aspect_ratio), d.aspect_ratio),
        duration=(Annotated[_choice(a.duration), INTEGRAL], Field(d.duration, description="Seconds.")),  # type: ignore[arg-type]  # made at run time
        generate_audio=(bool, d.generate_audio),
        seed=(SEED, d.seed),
        reference_image_base64=(
            Annotated[str | None, StringConstraints(max_length=base64_limit)],
            Field(
                None,
                description="A reference image (PNG, JPEG or WebP), base64 or a data: URI. The standard or "
                "the URL-safe alphabet, padded or not; line breaks are ignored.",
            ),
        ),
        reference_image_id=(
            Annotated[str | None, StringConstraints(pattern=UUID4_PATTERN)],
            Field(None, description="image_id returned by generate_character_reference."),
        ),
        video_rules_template=(
            _text(s.limits.text_max_chars, blank=True) | None,
            Field(
                None,
                description="Rules appended to the prompt, as a template that may substitute only "
                "{{ prompt }}, {{ aspect_ratio }} and {{ duration }}; null uses the rules from "
                "settings, an empty string appends none.",
            ),
        ),
        backend=(_choice(["replicate", "gemini"]), s.default_backend),
        **option_fields(config),
    )
