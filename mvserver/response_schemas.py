"""JSON Schemas of the response bodies, for the OpenAPI document (``components/schemas``).

They describe what the handlers build (``Job.state``/``public``, ``accepted_job``, ``project_view``, the scenes,
image, audio and timeline bodies); ``tests/test_openapi_document.py`` checks real answers against them. Objects
stay open (no ``additionalProperties: false``): a field added to an answer must not break a generated client.
Nullable values are ``type: [..., "null"]`` (or ``anyOf`` with null for a reference), as OpenAPI 3.1 spells them.
"""

from __future__ import annotations

from typing import Any

from .fields import UUID4_PATTERN

JOB_STATUSES = ["queued", "running", "succeeded", "failed", "canceled"]
JOB_KINDS = ["video", "lipsync", "assembly"]
EVENT_NAMES = [*JOB_STATUSES[:2], "progress", *JOB_STATUSES[2:]]

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """``schema`` or null."""
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    kind = schema["type"]
    return {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, description: str = "") -> Schema:
    """An object with these required and optional properties (open to properties added later)."""
    schema: Schema = {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}
    if description:
        schema["description"] = description
    return schema


def text(description: str = "") -> Schema:
    return {"type": "string", "description": description} if description else {"type": "string"}


ID = {"type": "string", "pattern": UUID4_PATTERN}
NUMBER = {"type": "number"}
SECONDS = {"type": "number", "minimum": 0}
UNIX_TIME = {"type": "number", "description": "Unix time, seconds"}
INTEGER = {"type": "integer"}
BOOLEAN = {"type": "boolean"}
STRINGS = {"type": "array", "items": {"type": "string"}}
ANY_OBJECT = {"type": "object"}
URL = text("a URL path under /api/mv")
SIGNED = {"signed_urls": {**ref("SignedUrls"), "description": "With API keys on: the URLs of this answer, signed"}}

ERROR_DETAIL = obj(
    {"code": text("what went wrong; branch on it"), "message": text("for people")},
    {"field": text("the request field, header or parameter at fault, as a path (scenes.1.trim_out)"),
     "provider": text("replicate or gemini"),
     "provider_status": {"type": ["integer", "string"],
                         "description": "the provider's own HTTP status, prediction status or RPC code"},
     "provider_error": {"description": "the provider's own message or JSON body, unchanged"}},
    "The error object of the Error shape, also a failed or canceled job's `error`.")

SIGNED_URLS = obj(
    {"expires_at": {"type": "string", "format": "date-time", "description": "when the links stop working"}},
    {name: text() for name in ("status_url", "events_url", "video_url", "image_url", "audio_url", "json",
                               "markdown")},
    "Each URL of the answer that a browser loads without headers (<img>, <video>, EventSource), under the same "
    "name, signed for the caller's key (?kid=&exp=&sig=); only with API keys on.")
SIGNED_URLS["additionalProperties"] = {"type": "string"}

_JOB_STATE = {
    "job_id": ID,
    "kind": {"type": "string", "enum": JOB_KINDS},
    "status": {"type": "string", "enum": JOB_STATUSES,
               "description": "succeeded, failed and canceled are final"},
    "stage": text("queued, submitting, generating, downloading, running, assembling, done: for progress text"),
    "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 1, "description": "null: unknown"},
    "backend": text("replicate, gemini (Veo on Vertex) or ffmpeg (assembly)"),
    "model": text(),
    "sandbox": BOOLEAN,
    "provider_prediction_id": nullable(text()),
    "created_at": UNIX_TIME,
    "started_at": nullable(UNIX_TIME),
    "finished_at": nullable(UNIX_TIME),
    "elapsed_seconds": SECONDS,
    "error": nullable(ref("ErrorDetail")),
    "video_url": {**nullable(text()), "description": "set once the job succeeded"},
    "video_bytes": nullable(INTEGER),
}
_FOLLOW = {"status_url": URL, "events_url": URL}

JOB_STATE = obj(_JOB_STATE, description="A job's state: the data of its status events.")
JOB = obj({**_JOB_STATE, **_FOLLOW,
           "deadline_at": {**nullable(UNIX_TIME), "description": "when the request's deadline_seconds ends the job"},
           "webhook_url": {**nullable(text()), "description": "where the job's status changes are sent (webhooks out)"},
           "webhook_events": {"type": ["string", "null"], "enum": ["completed", "all", None]},
           "request": {**ANY_OBJECT, "description": "what was sent to the provider"}},
          SIGNED, "GET /api/mv/jobs/{job_id}: the job's state, its URLs and its request.")
JOB_LIST_ITEM = obj({**_JOB_STATE, **_FOLLOW}, {"project_id": ID, "scene_id": ID, **SIGNED},
                    "A listed job: its state (no request) and URLs; project_id and scene_id for a project's clip.")
JOB_LIST = obj({"jobs": {"type": "array", "items": ref("JobListItem")},
                "next_cursor": {**nullable(text()), "description": "pass back as cursor; null: no more pages"}})
JOB_EVENT = obj(
    {name: _JOB_STATE[name] for name in ("job_id", "status", "stage", "progress", "elapsed_seconds")}
    | {"event_time": UNIX_TIME},
    {**{name: schema for name, schema in _JOB_STATE.items()},
     "logs": text("progress events: the provider's last log lines, when they changed")},
    "The data of one event: a status event carries the job's whole state (errors clipped), a progress event only "
    "what moves. Merge each onto the last state held.")
SSE_EVENT = obj(
    {"event": {"type": "string", "enum": EVENT_NAMES},
     "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": ref("JobEvent")}},
    {"id": text("the event's position (per job, or every job's position dot-separated on the multi-job stream); "
                "Last-Event-ID resumes after it"),
     "retry": {"type": "integer", "description": "reconnect delay, milliseconds"}},
    "One Server-Sent Event; the stream is a sequence of them (OpenAPI 3.2's itemSchema), with `: ping` comments.")

JOB_ACCEPTED = obj(
    {"job_id": ID, "status": _JOB_STATE["status"], "backend": _JOB_STATE["backend"], "sandbox": BOOLEAN,
     **_FOLLOW, "video_url": {**URL, "description": "where the result plays once the job succeeded"}},
    {"kind": _JOB_STATE["kind"], **SIGNED},
    "A job was started (202): follow it with events_url or status_url.")
SCENE_JOB_ACCEPTED = {**JOB_ACCEPTED, "required": [*JOB_ACCEPTED["required"], "scene_id"],
                      "properties": {**JOB_ACCEPTED["properties"], "scene_id": ID},
                      "description": "A project scene's clip job was started (202)."}

SONG = obj({"audio_id": ID, "offset": SECONDS, "duration": SECONDS}, description="The project's song.")
CLIP_VERSION = obj(
    {"job_id": ID, "created_at": UNIX_TIME, "duration": INTEGER,
     "status": {"type": "string", "enum": [*JOB_STATUSES, "missing"],
                "description": "the job's status; missing: the job store no longer has it"},
     "stage": nullable(text()), "progress": _JOB_STATE["progress"], "video_url": nullable(text()),
     "error": nullable(ref("ErrorDetail"))},
    description="One generated clip of a scene, with its job's live state.")
PROJECT_SCENE = obj(
    {"id": ID, "prompt": text(), "negative_prompt": text(),
     "duration": {**INTEGER, "description": "seconds of the next clip generated for the scene"},
     "trim_in": SECONDS, "trim_out": SECONDS,
     "versions": {"type": "array", "items": ref("ClipVersion")},
     "chosen_job_id": nullable(ID), "awaited_job_id": nullable(ID),
     "seconds": {**SECONDS, "description": "trim_out - trim_in"},
     "song_start": {**nullable(SECONDS), "description": "where the kept part starts in the song; null: no song"},
     "chosen_video_url": nullable(text())},
    description="A scene in display order.")
PROJECT = obj(
    {"project_id": ID, "etag": text("the ETag a PATCH names in If-Match"), "version": INTEGER,
     "owner": nullable(text()), "created_at": UNIX_TIME, "updated_at": UNIX_TIME, "idea": text(),
     "character_description": text(), "style": nullable(text()), "aspect_ratio": text(),
     "character_image_id": nullable(ID), "song": nullable(ref("ProjectSong")),
     "scenes": {"type": "array", "items": ref("ProjectScene")},
     "assembly_job_id": nullable(ID), "total_seconds": SECONDS},
    description="A project (storyboard): the record, every clip version with its job's live state.")
TIMELINE_ENTRY = obj({"scene_id": ID, "job_id": nullable(ID), "trim_in": SECONDS, "trim_out": SECONDS,
                      "seconds": SECONDS, "song_start": nullable(SECONDS),
                      "status": {"type": ["string", "null"], "enum": [*JOB_STATUSES, None]}})
TIMELINE = obj({"project_id": ID, "song": nullable(ref("ProjectSong")),
                "entries": {"type": "array", "items": ref("TimelineEntry")}},
               description="The scenes in display order: chosen clip, trims, where each starts in the song.")

SCENE = obj({"description": text(), "negative_description": text()})
SCENES_METADATA = obj({"model": text(), "parameters": ANY_OBJECT, "defaults_applied": STRINGS,
                       "elapsed_seconds": SECONDS, "attempts": INTEGER, "sandbox": BOOLEAN})
_SCENE_FILES = {"json": text(), "markdown": text()}
SCENES = obj(
    {"scenes_id": ID, "scenes": {"type": "array", "items": ref("Scene")}, "sandbox": BOOLEAN,
     "urls": {**obj(_SCENE_FILES), "description": "GET the scenes as JSON or Markdown"},
     "metadata": ref("ScenesMetadata")},
    SIGNED, "Scene prompts written by Gemini, saved as JSON and Markdown.")
SAVED_SCENES = obj({"scenes_id": ID, "scenes": {"type": "array", "items": ref("Scene")},
                    "metadata": ref("ScenesMetadata")}, {"owner_key_id": text()})

IMAGE_METADATA = obj({"model": text(), "prompt": text(), "parameters": ANY_OBJECT, "defaults_applied": STRINGS,
                      "prediction_id": text(), "prediction_ids": STRINGS, "elapsed_seconds": SECONDS})
_IMAGE = {"image_id": ID, "mime_type": text(), "image_url": URL}
CANDIDATE_IMAGE = obj({**_IMAGE, "prediction_id": text(), "seed": nullable(INTEGER)},
                      description="One candidate image; send its image_id as reference_image_id.")
_IMAGES = {**_IMAGE, "sandbox": BOOLEAN, "metadata": ref("ImageMetadata"),
           "images": {"type": "array", "items": ref("CandidateImage")}}
CHARACTER_REFERENCE = obj(
    {**_IMAGES, "image_base64": text("the first image, base64")}, SIGNED,
    "Character images: the first one at the top level (inlined as base64), every candidate in `images`.")
PROJECT_IMAGE = obj(_IMAGES, SIGNED, "The project's new character image (no base64).")

PROJECT_CHARACTER = obj({"image": ref("ProjectImage"), "project": ref("Project")})
PROJECT_CLIPS_STARTED = obj({"jobs": {"type": "array", "items": ref("SceneJobAccepted")}, "project": ref("Project")},
                            description="One job per scene that had no chosen clip and none in progress.")
SCENE_JOB_STARTED = obj({"job": ref("SceneJobAccepted"), "project": ref("Project")})
PROJECT_ASSEMBLY_STARTED = {**JOB_ACCEPTED,
                            "required": [*JOB_ACCEPTED["required"], "kind", "project"],
                            "properties": {**JOB_ACCEPTED["properties"], "project": ref("Project")},
                            "description": "The assembly job's fields and the project (its assembly_job_id)."}
WEBHOOK_ACK = obj({"status": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]}})
WEBHOOK_ATTEMPT = obj({"at": UNIX_TIME, "http_status": nullable(INTEGER), "error": nullable(text()),
                       "seconds": SECONDS}, description="One POST: the receiver's HTTP status, or why none came.")
WEBHOOK_DELIVERY = obj(
    {"webhook_id": text("the webhook-id header: the same for every attempt and redelivery of the message"),
     "event_id": INTEGER, "type": text("job.<event>, e.g. job.succeeded"),
     "status": {"type": "string", "enum": ["pending", "delivered", "failed"],
                "description": "failed: given up after jobs.webhook_retry_seconds"},
     "attempt_count": INTEGER, "attempts": {"type": "array", "items": ref("WebhookAttempt"),
                                            "description": "the first and the latest attempts (at most 20)"}},
    {"first_attempt_at": UNIX_TIME})
WEBHOOK_DELIVERIES = obj({"job_id": ID, "webhook_url": {**nullable(text()), "description": "null: no webhook"},
                          "webhook_events": {"type": ["string", "null"], "enum": ["completed", "all", None]},
                          "deliveries": {"type": "array", "items": ref("WebhookDelivery")}},
                         description="GET /api/mv/jobs/{job_id}/deliveries: the job's webhook deliveries, in order.")
REDELIVERY = obj({"job_id": ID, "event_id": INTEGER},
                 description="The event from which the job's deliveries are sent again.")

RESPONSE_SCHEMAS: dict[str, Schema] = {
    "ErrorDetail": ERROR_DETAIL, "SignedUrls": SIGNED_URLS,
    "JobState": JOB_STATE, "Job": JOB, "JobListItem": JOB_LIST_ITEM, "JobList": JOB_LIST, "JobEvent": JOB_EVENT,
    "JobStreamEvent": SSE_EVENT, "JobAccepted": JOB_ACCEPTED, "SceneJobAccepted": SCENE_JOB_ACCEPTED,
    "ProjectSong": SONG, "ClipVersion": CLIP_VERSION, "ProjectScene": PROJECT_SCENE, "Project": PROJECT,
    "TimelineEntry": TIMELINE_ENTRY, "Timeline": TIMELINE,
    "Scene": SCENE, "ScenesMetadata": SCENES_METADATA, "Scenes": SCENES, "SavedScenes": SAVED_SCENES,
    "ImageMetadata": IMAGE_METADATA, "CandidateImage": CANDIDATE_IMAGE, "CharacterReference": CHARACTER_REFERENCE,
    "ProjectImage": PROJECT_IMAGE, "ProjectCharacter": PROJECT_CHARACTER, "ProjectClipsStarted": PROJECT_CLIPS_STARTED,
    "SceneJobStarted": SCENE_JOB_STARTED, "ProjectAssemblyStarted": PROJECT_ASSEMBLY_STARTED,
    "WebhookAck": WEBHOOK_ACK,
    "WebhookAttempt": WEBHOOK_ATTEMPT, "WebhookDelivery": WEBHOOK_DELIVERY, "WebhookDeliveries": WEBHOOK_DELIVERIES,
    "Redelivery": REDELIVERY,
    "RedeliverRequest": {"type": "object", "additionalProperties": False,
                         "properties": {"event_id": {**INTEGER, "minimum": 1,
                                                     "description": "default: the last event the webhook sends"}}},
}
