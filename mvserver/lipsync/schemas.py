"""The request model of ``POST /api/mv/lipsync``.

Built once at start-up from the settings with ``pydantic.create_model``: YAML defaults become field defaults,
allowed-value lists become ``Literal`` types, and ``model_fields_set`` tells which fields the client sent.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, create_model

from mvserver.core.config import Config
from mvserver.core.fields import STRICT, UUID4_PATTERN, choice, text
from mvserver.jobs.options import option_fields

_text, _choice = text, choice


UUID4_ID = Annotated[str, StringConstraints(pattern=UUID4_PATTERN)]
SECONDS = Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)]


def lipsync_request_model(config: Config) -> type[BaseModel]:
    s = config.lipsync
    d, a = s.defaults, s.allowed
    return create_model(
        "LipsyncRequest",
        __config__=STRICT,
        video_job_id=(UUID4_ID, Field(description="A finished clip: the id of a succeeded video (or lip-sync) job.")),
        audio_id=(UUID4_ID, Field(description="The song: audio_id returned by upload_audio.")),
        audio_start=(SECONDS, Field(0.0, description="Where the window starts in the song, in seconds.")),
        audio_end=(
            SECONDS | None,
            Field(
                None,
                description="Where the window ends; null: audio_start plus the "
                "clip's length. A shorter window is padded with silence.",
            ),
        ),
        sync_mode=(_choice(a.sync_mode), d.sync_mode),
        temperature=(
            float,
            Field(
                d.temperature,
                ge=a.temperature.min,
                le=a.temperature.max,
                allow_inf_nan=False,
                description="How expressive the mouth movements may be.",
            ),
        ),
        active_speaker=(bool, Field(d.active_speaker, description="Follow whoever is speaking in the clip.")),
        project_id=(
            UUID4_ID | None,
            Field(None, description="A project this job belongs to (kept in the job's request, unchanged)."),
        ),
        scene_id=(UUID4_ID | None, Field(None, description="The project's scene this job is for (kept unchanged).")),
        **option_fields(config),
    )
