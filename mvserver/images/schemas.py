"""The request model of ``POST /api/mv/generate_character_reference``.

Built once at start-up from the settings with ``pydantic.create_model``: YAML defaults become field defaults,
allowed-value lists become ``Literal`` types, and ``model_fields_set`` tells which fields the client sent.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, create_model

from mvserver.core.config import Config
from mvserver.core.fields import INTEGRAL, SEED, STRICT, choice, text

_text, _choice = text, choice


def image_request_model(config: Config) -> type[BaseModel]:
    s = config.images
    d, a, n = s.defaults, s.allowed, s.limits.number_of_images
    return create_model(
        "CharacterReferenceRequest",
        __config__=STRICT,
        character_description=(
            _text(s.limits.text_max_chars),
            Field(description="Visual description of the character."),
        ),
        number_of_images=(
            Annotated[int, INTEGRAL],
            Field(
                d.number_of_images,
                ge=n.min,
                le=n.max,
                description="Candidate images rendered in parallel, each saved with its own "
                "image_id (listed in `images`); with a seed, image i uses seed + i.",
            ),
        ),
        aspect_ratio=(_choice(a.aspect_ratio), d.aspect_ratio),
        safety_filter_level=(_choice(a.safety_filter_level), d.safety_filter_level),
        person_generation=(_choice(a.person_generation), d.person_generation),
        output_format=(_choice(a.output_format), d.output_format),
        negative_prompt=(_text(s.limits.text_max_chars, blank=True), d.negative_prompt),
        seed=(SEED, d.seed),
    )
