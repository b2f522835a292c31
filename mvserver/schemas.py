"""Request schemas built from the settings (defaults and allowed values come from YAML) and the OpenAPI document.

Each request model is made once at start-up with ``pydantic.create_model``: YAML defaults become field defaults,
allowed-value lists become ``Literal`` types, and ``model_fields_set`` tells which fields the client sent.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model

from . import __version__
from .config import Config
from .debug import debug_print
from .errors import ApiError, validation_error

STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
SEED = Annotated[int | None, Field(ge=0, le=2**31 - 1, description="Random seed; null lets the provider choose.")]
UUID4_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
Model = TypeVar("Model", bound=BaseModel)


def _text(max_chars: int, *, blank: bool = False) -> Any:
    return Annotated[str, StringConstraints(strip_whitespace=True, min_length=0 if blank else 1, max_length=max_chars)]


def _choice(values: list[Any]) -> Any:
    return Literal[tuple(values)]  # type: ignore[valid-type]


def scenes_request_model(config: Config) -> type[BaseModel]:
    s = config.scenes
    text, d, n = _text(s.limits.text_max_chars), s.defaults, s.limits.number_of_scenes
    return create_model(
        "CreateScenesRequest",
        __config__=STRICT,
        idea=(text, Field(description="The concept or topic of the music video.")),
        character_description=(text, Field(description="Visual description of the main character.")),
        character_characteristics=(text, Field(d.character_characteristics, description="Personality.")),
        number_of_scenes=(int, Field(d.number_of_scenes, ge=n.min, le=n.max, description="How many scenes.")),
        video_type=(text, Field(d.video_type)),
        video_characteristics=(text, Field(d.video_characteristics, description="Style words.")),
        camera_angle=(text, Field(d.camera_angle, description="Primary camera angle.")),
    )


def image_request_model(config: Config) -> type[BaseModel]:
    s = config.images
    d, a = s.defaults, s.allowed
    return create_model(
        "CharacterReferenceRequest",
        __config__=STRICT,
        character_description=(_text(s.limits.text_max_chars), Field(description="Visual description of the character.")),
        aspect_ratio=(_choice(a.aspect_ratio), d.aspect_ratio),
        safety_filter_level=(_choice(a.safety_filter_level), d.safety_filter_level),
        person_generation=(_choice(a.person_generation), d.person_generation),
        output_format=(_choice(a.output_format), d.output_format),
        negative_prompt=(_text(s.limits.text_max_chars, blank=True), d.negative_prompt),
        seed=(SEED, d.seed),
    )


def video_request_model(config: Config) -> type[BaseModel]:
    s = config.videos
    d, a = s.defaults, s.allowed
    base64_limit = s.limits.reference_image_max_bytes * 4 // 3 + 64
    return create_model(
        "GenerateVideoRequest",
        __config__=STRICT,
        prompt=(_text(s.limits.text_max_chars), Field(description="The scene description.")),
        negative_prompt=(_text(s.limits.text_max_chars, blank=True), d.negative_prompt),
        aspect_ratio=(_choice(a.aspect_ratio), d.aspect_ratio),
        duration=(_choice(a.duration), Field(d.duration, description="Seconds.")),
        generate_audio=(bool, d.generate_audio),
        seed=(SEED, d.seed),
        reference_image_base64=(
            Annotated[str | None, StringConstraints(max_length=base64_limit)],
            Field(None, description="A reference image, base64 or a data: URI (PNG, JPEG or WebP)."),
        ),
        reference_image_id=(
            Annotated[str | None, StringConstraints(pattern=UUID4_PATTERN)],
            Field(None, description="image_id returned by generate_character_reference."),
        ),
        video_rules_template=(
            _text(s.limits.text_max_chars, blank=True) | None,
            Field(None, description="Rules appended to the prompt, as a template that may substitute only "
                                    "{{ prompt }}, {{ aspect_ratio }} and {{ duration }}; null uses the rules from "
                                    "settings, an empty string appends none."),
        ),
        backend=(_choice(["replicate", "gemini"]), s.default_backend),
    )


class RequestModels(BaseModel):
    """The request models of one app, built from its config."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    scenes: type[BaseModel]
    image: type[BaseModel]
    video: type[BaseModel]

    @classmethod
    def build(cls, config: Config) -> "RequestModels":
        return cls(scenes=scenes_request_model(config), image=image_request_model(config),
                   video=video_request_model(config))


REQUEST_MODELS = web.AppKey("request_models", RequestModels)


async def parse_body(request: web.Request, model: type[Model], debug: bool) -> tuple[Model, list[str]]:
    """Parse and validate a JSON body; return the model and the names of the fields filled from settings."""
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    debug_print(debug, f"{request.path} request arguments received", body)
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    defaulted = [name for name in model.model_fields if name not in parsed.model_fields_set]
    debug_print(debug, f"{request.path} defaults applied from settings",
                {name: getattr(parsed, name) for name in defaulted})
    return parsed, defaulted


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string"},
                "provider": {"type": "string"},
                "provider_status": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
                "provider_error": {},
            },
        }
    },
}


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _answers(ok: int, description: str, *errors: int, content: str = "application/json") -> dict[str, Any]:
    answers: dict[str, Any] = {str(ok): {"description": description, "content": {content: {}}}}
    for status in errors:
        answers[str(status)] = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return answers


def _id_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": UUID4_PATTERN}}


def openapi_document(models: RequestModels) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the public API."""
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for model in (models.scenes, models.image, models.video):
        schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    job_errors = (400, 404, 410, 503)
    paths = {
        "/api/mv/health": {"get": {"summary": "Version, sandbox/live mode per provider", "responses": _answers(200, "ok")}},
        "/api/mv/create_scenes": {"post": {
            "summary": "Write N scene prompts with Gemini", "requestBody": _json_body("CreateScenesRequest"),
            "responses": _answers(200, "scenes", 400, 413, 422, 429, 502, 503, 504)}},
        "/api/mv/generate_character_reference": {"post": {
            "summary": "Render a character reference image with Replicate google/imagen-4",
            "requestBody": _json_body("CharacterReferenceRequest"),
            "responses": _answers(200, "image", 400, 413, 422, 429, 502, 503, 504)}},
        "/api/mv/get_scenes/{scenes_id}.{ext}": {"get": {
            "summary": "Saved scenes as JSON or Markdown",
            "parameters": [_id_parameter("scenes_id"),
                           {"name": "ext", "in": "path", "required": True, "schema": {"type": "string", "enum": ["json", "md"]}}],
            "responses": _answers(200, "scenes file", 400, 404)}},
        "/api/mv/get_image/{image_id}": {"get": {
            "summary": "The saved image", "parameters": [_id_parameter("image_id")],
            "responses": _answers(200, "image bytes", 400, 404, content="image/*")}},
        "/api/mv/generate_video": {"post": {
            "summary": "Start a video job (answers 202 at once)", "requestBody": _json_body("GenerateVideoRequest"),
            "responses": _answers(202, "job accepted", 400, 404, 413, 503)}},
        "/api/mv/jobs/{job_id}": {
            "get": {"summary": "Job state as JSON", "parameters": [_id_parameter("job_id")],
                    "responses": _answers(200, "job", *job_errors)},
            "delete": {"summary": "Cancel the job and its provider prediction", "parameters": [_id_parameter("job_id")],
                       "responses": _answers(200, "job", *job_errors)}},
        "/api/mv/jobs/{job_id}/cancel": {"post": {
            "summary": "Cancel the job (same as DELETE /api/mv/jobs/{job_id})", "parameters": [_id_parameter("job_id")],
            "responses": _answers(200, "job", *job_errors)}},
        "/api/mv/jobs/{job_id}/events": {"get": {
            "summary": "Server-Sent Events: state, progress, final status", "parameters": [_id_parameter("job_id")],
            "responses": _answers(200, "event stream", *job_errors, content="text/event-stream")}},
        "/api/mv/events": {"get": {
            "summary": "Server-Sent Events of several jobs on one connection; the event id is every job's position "
                       "(dot-separated, in the order of `jobs`), so Last-Event-ID resumes them all",
            "parameters": [{"name": "jobs", "in": "query", "required": True,
                            "description": "Comma-separated job ids (at most jobs.sse_max_jobs_per_stream, 50)",
                            "schema": {"type": "string", "minLength": 1}},
                           {"name": "after", "in": "query", "required": False,
                            "description": "Positions to resume from, in the form of an event id (`3.7.0`); "
                                           "a Last-Event-ID header takes precedence",
                            "schema": {"type": "string"}}],
            "responses": _answers(200, "event stream", 400, 404, content="text/event-stream")}},
        "/api/mv/get_video/{video_id}": {"get": {
            "summary": "The finished MP4 (Range requests supported)", "parameters": [_id_parameter("video_id")],
            "responses": _answers(200, "video", 400, 404, 409, 410, 416, content="video/mp4")}},
        "/api/mv/webhooks/replicate": {"post": {
            "summary": "Replicate prediction webhooks (called by Replicate, not by clients; signed, no API key)",
            "description": "Body: the prediction JSON, at most 2 MiB. Headers webhook-id, webhook-timestamp and "
                           "webhook-signature (Standard Webhooks, HMAC-SHA256, 300 s tolerance). Answers 200 with "
                           '{"status": "accepted" | "duplicate" | "ignored"} at once; the job applies the update.',
            "parameters": [{"name": "job", "in": "query", "required": True,
                            "schema": {"type": "string", "pattern": UUID4_PATTERN}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": _answers(200, "acknowledged", 400, 401, 413, 415)}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mvserver", "version": __version__,
                 "description": "Music-video generation: scenes (Gemini), character images (Imagen 4), video jobs (Veo)."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
