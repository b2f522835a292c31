"""Request models of the project endpoints, built once from the settings (limits and allowed values from YAML)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from mvserver.core.config import Config
from mvserver.core.fields import INTEGRAL, UUID4_PATTERN, choice, text

STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
Id = Annotated[str, StringConstraints(pattern=UUID4_PATTERN)]
Seconds = Annotated[float, Field(ge=0, le=86400)]
SnapMode = Literal["beat", "bar", "none"]


_text, _choice = text, choice


class ProjectModels(BaseModel):
    """The project request models of one app."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    create: type[BaseModel]
    patch: type[BaseModel]
    write_scenes: type[BaseModel]

    @classmethod
    def build(cls, config: Config) -> ProjectModels:
        limits = config.projects.limits
        text, blank = _text(limits.text_max_chars), _text(limits.text_max_chars, blank=True)
        style = _text(limits.style_max_chars) | None
        duration = _choice(config.videos.allowed.duration)
        n = limits.scenes_max
        create = create_model(
            "CreateProjectRequest",
            __config__=STRICT,
            idea=(text, Field(description="The concept or topic of the music video.")),
            character_description=(text, Field(description="Visual description of the main character.")),
            style=(
                style,
                Field(
                    None,
                    description="A style preset's name from GET /api/mv/health `styles` (its "
                    "camera, palette and pacing lines go into the scene prompt, as "
                    "with create_scenes), or free style words woven into the "
                    "scenes.",
                ),
            ),
            aspect_ratio=(_choice(config.videos.allowed.aspect_ratio), config.videos.defaults.aspect_ratio),
            audio_id=(
                Id | None,
                Field(None, description="An uploaded song; sizes the scenes to it unless number_of_scenes is given."),
            ),
            audio_offset=(Seconds, Field(0.0, description="Where in the song the video starts, in seconds.")),
            number_of_scenes=(
                Annotated[int, Field(ge=0, le=n), INTEGRAL] | None,
                Field(None, description="Empty scenes to start with."),
            ),
        )
        scene_patch = create_model(
            "ScenePatch",
            __config__=STRICT,
            id=(Id, Field(description="The scene to change.")),
            prompt=(blank, None),
            negative_prompt=(blank, None),
            duration=(duration, None),
            trim_in=(Seconds, Field(None, description="Seconds cut from the start of the clip.")),
            trim_out=(Seconds, Field(None, description="Where the kept part of the clip ends, in clip seconds.")),
            chosen_job_id=(Id | None, Field(None, description="A succeeded version of this scene; null: none.")),
            snap=(
                SnapMode,
                Field(
                    None,
                    description="Move the scene's cut (where its kept part "
                    "ends in the song) to the nearest beat or "
                    "bar line its clip can reach, by setting "
                    "trim_out; none or without a beat grid: "
                    "the trims as sent.",
                ),
            ),
        )
        new_scene = create_model(
            "NewScene",
            __config__=STRICT,
            prompt=(blank, ""),
            negative_prompt=(blank, ""),
            duration=(duration, config.projects.default_scene_seconds),
        )
        patch = create_model(
            "PatchProjectRequest",
            __config__=STRICT,
            idea=(text, None),
            character_description=(text, None),
            style=(style, None),
            character_image_id=(Id | None, None),
            audio_id=(Id | None, Field(None, description="Set or (null) remove the song.")),
            audio_offset=(Seconds, None),
            remove_scenes=(list[Id], Field(None, max_length=n, description="Applied first.")),
            scenes=(list[scene_patch], Field(None, max_length=n, description="Per-scene changes, by id.")),  # type: ignore[valid-type]  # made at run time
            order=(
                list[Id],
                Field(None, max_length=n, description="Every remaining scene id once, in the new display order."),
            ),
            add_scenes=(list[new_scene], Field(None, max_length=n, description="Appended last.")),  # type: ignore[valid-type]  # made at run time
        )
        write = create_model(
            "WriteProjectScenesRequest",
            __config__=STRICT,
            number_of_scenes=(
                Annotated[int, Field(ge=1, le=n), INTEGRAL] | None,
                Field(None, description="Default: the project's scene count (or the create_scenes default)."),
            ),
            character_characteristics=(text | None, None),
            video_type=(text | None, None),
            camera_angle=(text | None, None),
        )
        return cls(create=create, patch=patch, write_scenes=write)


# Options a client may pass when a project generates its character image or its clips; everything else comes
# from the project.
CHARACTER_OPTIONS = frozenset(
    {
        "aspect_ratio",
        "safety_filter_level",
        "person_generation",
        "output_format",
        "negative_prompt",
        "seed",
        "number_of_images",
    }
)
# jobs.options.option_fields
JOB_OPTIONS = frozenset({"deadline_seconds", "webhook_url", "webhook_events", "provider_logs"})
CLIP_OPTIONS = frozenset({"backend", "seed", "generate_audio", "video_rules_template"}) | JOB_OPTIONS
SCENE_LIPSYNC_OPTIONS = frozenset({"sync_mode", "temperature", "active_speaker"}) | JOB_OPTIONS
