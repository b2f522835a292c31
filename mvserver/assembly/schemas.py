"""Request models of the assembly endpoints, built once from the settings (the clip limit comes from YAML)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from mvserver.core.config import Config
from mvserver.jobs.options import option_fields
from mvserver.projects.schemas import Id, Seconds

STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
CROSSFADE_MAX_SECONDS = 5.0

Transition = Literal["cut", "crossfade"]
ClipAudio = Literal["drop", "keep", "mix"]
Fit = Literal["letterbox", "crop"]
CrossfadeSeconds = Annotated[float, Field(gt=0, le=CROSSFADE_MAX_SECONDS, allow_inf_nan=False)]


class AssemblyClip(BaseModel):
    """One clip of the edit: a succeeded video or lip-sync job and the part of it to keep (seconds)."""

    model_config = STRICT
    job_id: Id
    trim_in: Seconds | None = Field(
        None,
        description="Seconds cut from the start; null: none. The trims must keep "
        "at least one frame at the output's frame rate (400 otherwise).",
    )
    trim_out: Seconds | None = Field(None, description="Where the kept part ends; null: the clip's end.")


class AssemblyOptions(BaseModel):
    """How clips are joined: the options a project's assemble takes (the clips and song come from the project)."""

    model_config = STRICT
    transition: Transition = Field(
        "cut",
        description="cut: clips follow each other (stream-copied where they "
        "can be); crossfade: each clip fades into the next.",
    )
    crossfade_seconds: CrossfadeSeconds = Field(
        0.5,
        description="Length of each crossfade (transition crossfade): "
        "at least one frame at the output's frame rate and "
        "shorter than the shortest kept clip (400 otherwise).",
    )
    clip_audio: ClipAudio = Field(
        "drop", description="The clips' own audio: drop it, keep it (without a song), or mix it under the song."
    )
    fit: Fit | None = Field(
        None,
        description="Clips of another aspect ratio than the first are letterboxed or "
        "cropped; null: such clips are refused (400).",
    )


def assembly_options_model(config: Config) -> type[AssemblyOptions]:
    """The assembly options with the job options every job-creating request takes (bounded by the settings)."""
    return create_model("AssemblyOptions", __base__=AssemblyOptions, **option_fields(config))


def assemble_request_model(config: Config) -> type[BaseModel]:
    """``POST /api/mv/assemble``: at least one clip, at most ``projects.limits.assembly_clips_max``."""
    limit = config.projects.limits.assembly_clips_max
    return create_model(
        "AssembleRequest",
        __base__=assembly_options_model(config),
        clips=(
            list[AssemblyClip],
            Field(min_length=1, max_length=limit, description=f"The clips in playing order (1 to {limit})."),
        ),
        audio_id=(
            Id | None,
            Field(
                None,
                description="The song laid under the video (upload_audio); it is cut to "
                "the video's length with a short fade-out.",
            ),
        ),
        audio_offset=(Seconds, Field(0.0, description="Where in the song the video starts, in seconds.")),
    )
