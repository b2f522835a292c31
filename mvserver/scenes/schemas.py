"""The request model of ``POST /api/mv/create_scenes``.

Built once at start-up from the settings with ``pydantic.create_model``: YAML defaults become field defaults,
allowed-value lists become ``Literal`` types, and ``model_fields_set`` tells which fields the client sent.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, create_model

from mvserver.core.config import Config
from mvserver.core.fields import INTEGRAL, STRICT, choice, text

_text, _choice = text, choice


def scenes_request_model(config: Config) -> type[BaseModel]:
    s = config.scenes
    text, d, n = _text(s.limits.text_max_chars), s.defaults, s.limits.number_of_scenes
    return create_model(
        "CreateScenesRequest",
        __config__=STRICT,
        idea=(text, Field(description="The concept or topic of the music video.")),
        character_description=(text, Field(description="Visual description of the main character.")),
        character_characteristics=(text, Field(d.character_characteristics, description="Personality.")),
        number_of_scenes=(
            Annotated[int, INTEGRAL],
            Field(d.number_of_scenes, ge=n.min, le=n.max, description="How many scenes."),
        ),
        video_type=(text, Field(d.video_type)),
        video_characteristics=(text, Field(d.video_characteristics, description="Style words.")),
        camera_angle=(text, Field(d.camera_angle, description="Primary camera angle.")),
        style=(
            _choice(sorted(config.styles)) | None if config.styles else None,
            Field(
                d.style,
                description="A director/style preset from settings/styles/ (its camera language, "
                "palette and pacing words go into the prompt); null for none.",
            ),
        ),
    )
