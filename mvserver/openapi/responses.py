"""JSON Schemas of the response bodies, for the OpenAPI document (``components/schemas``).

They describe what the handlers build (``Job.state``/``public``, ``accepted_job``, ``project_view``, the scenes,
image, audio and timeline bodies); ``tests/test_openapi_document.py`` checks real answers against them. Objects
stay open (no ``additionalProperties: false``): a field added to an answer must not break a generated client.
Nullable values are ``type: [..., "null"]`` (or ``anyOf`` with null for a reference), as OpenAPI 3.1 spells them.
"""

from __future__ import annotations

from typing import Any

from mvserver.analysis.model import SongAnalysis
from mvserver.core.fields import UUID4_PATTERN

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
    {
        "field": text("the request field, header or parameter at fault, as a path (scenes.1.trim_out)"),
        "provider": text("replicate or gemini"),
        "provider_status": {
            "type": ["integer", "string"],
            "description": "the provider's own HTTP status, prediction status or RPC code",
        },
        "provider_error": {"description": "the provider's own message or JSON body, unchanged"},
        "budget": {
            **obj(
                {
                    "month": text("YYYY-MM, UTC"),
                    "limit": NUMBER,
                    "spent": NUMBER,
                    "remaining": NUMBER,
                    "job_estimate": NUMBER,
                    "currency": text(),
                }
            ),
            "description": "402 budget_exceeded: the key's monthly budget and what is left of it",
        },
    },
    "The error object of the Error shape, also a failed or canceled job's `error`.",
)

SIGNED_URLS = obj(
    {"expires_at": {"type": "string", "format": "date-time", "description": "when the links stop working"}},
    {name: text() for name in ("status_url", "events_url", "video_url", "image_url", "audio_url", "json", "markdown")},
    "Each URL of the answer that a browser loads without headers (<img>, <video>, EventSource), under the same "
    "name, signed for the caller's key (?kid=&exp=&sig=); only with API keys on.",
)
SIGNED_URLS["additionalProperties"] = {"type": "string"}

COST = obj(
    {
        "amount": {**NUMBER, "minimum": 0, "description": "amount_micros / 1,000,000"},
        "amount_micros": {**INTEGER, "minimum": 0, "description": "millionths of the currency: add these up"},
        "currency": text("ISO 4217, from settings/pricing.yaml"),
        "as_of": {**nullable(text()), "description": "the date of the prices used; null when nothing was priced"},
        "basis": {
            "type": "string",
            "enum": ["price_table", "sandbox", "local", "unpriced"],
            "description": "price_table: list prices x use; sandbox: simulated, costs 0; local: ffmpeg on this "
            "server, costs 0",
        },
        "estimated": {"type": "boolean", "description": "always true: the provider's invoice is authoritative"},
    },
    description="A job's estimated cost.",
)
USAGE = obj(
    {
        "provider": text(),
        "model": text(),
        "output_seconds": {**nullable(SECONDS), "description": "seconds of media produced (null: nothing produced)"},
        "images": {**INTEGER, "minimum": 0},
        "provider_metrics": {
            **nullable(ANY_OBJECT),
            "description": "the provider's own numbers, unchanged (Replicate: predict_time, total_time)",
        },
        "queue_seconds": SECONDS,
        "wall_seconds": SECONDS,
        "retries": {**INTEGER, "minimum": 0, "description": "provider calls retried after a transient error"},
        "cost": ref("Cost"),
    },
    description="What an ended job used and what it cost (null until the job ends).",
)
USAGE_GROUP = obj(
    {
        "key": text("the model, kind or day (YYYY-MM-DD, UTC) of the group"),
        "jobs": INTEGER,
        "cost_micros": INTEGER,
        "cost": NUMBER,
        "output_seconds": SECONDS,
        "predict_seconds": SECONDS,
    }
)
USAGE_ENTRY = obj(
    {
        "job_id": ID,
        "owner": nullable(text()),
        "kind": text(),
        "backend": text(),
        "model": text(),
        "sandbox": BOOLEAN,
        "status": text(),
        "created_at": UNIX_TIME,
        "finished_at": UNIX_TIME,
        "output_seconds": nullable(SECONDS),
        "predict_seconds": nullable(SECONDS),
        "cost_micros": INTEGER,
        "currency": nullable(text()),
        "basis": nullable(text()),
    },
    description="One ended job in a usage report.",
)
USAGE_REPORT = obj(
    {
        "from": UNIX_TIME,
        "to": UNIX_TIME,
        "group_by": {"type": "string", "enum": ["model", "kind", "day"]},
        "currency": text(),
        "all_keys": BOOLEAN,
        "totals": obj(
            {
                "jobs": INTEGER,
                "cost_micros": INTEGER,
                "cost": NUMBER,
                "output_seconds": SECONDS,
                "predict_seconds": SECONDS,
            }
        ),
        "groups": {"type": "array", "items": ref("UsageGroup")},
        "jobs": {"type": "array", "items": ref("UsageEntry")},
    },
    {
        "budget": obj(
            {"month": text(), "limit": nullable(NUMBER), "spent": NUMBER, "remaining": nullable(NUMBER)},
            description="The caller's budget this month (keys on)",
        )
    },
    "GET /api/mv/usage: jobs that ended in [from, to), their totals (exactly the sum of `jobs`) and groups.",
)

_JOB_STATE: dict[str, Schema] = {
    "job_id": ID,
    "kind": {"type": "string", "enum": JOB_KINDS},
    "status": {"type": "string", "enum": JOB_STATUSES, "description": "succeeded, failed and canceled are final"},
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
    "video_seconds": {**nullable(SECONDS), "description": "the stored clip's length (null until it is stored)"},
    "video_width": nullable(INTEGER),
    "video_height": nullable(INTEGER),
    "poster_url": {**nullable(text()), "description": "the clip's first frame (JPEG), once the job succeeded"},
    "usage": nullable(ref("Usage")),
}
_FOLLOW = {"status_url": URL, "events_url": URL}

JOB_STATE = obj(_JOB_STATE, description="A job's state: the data of its status events.")
JOB = obj(
    {
        **_JOB_STATE,
        **_FOLLOW,
        "deadline_at": {**nullable(UNIX_TIME), "description": "when the request's deadline_seconds ends the job"},
        "webhook_url": {**nullable(text()), "description": "where the job's status changes are sent (webhooks out)"},
        "webhook_events": {"type": ["string", "null"], "enum": ["completed", "all", None]},
        "provider_logs": {"type": "boolean", "description": "progress events carry the provider's log lines"},
        "request": {**ANY_OBJECT, "description": "what was sent to the provider"},
    },
    SIGNED,
    "GET /api/mv/jobs/{job_id}: the job's state, its URLs and its request.",
)
JOB_LIST_ITEM = obj(
    {**_JOB_STATE, **_FOLLOW},
    {"project_id": ID, "scene_id": ID, **SIGNED},
    "A listed job: its state (no request) and URLs; project_id and scene_id for a project's clip.",
)
JOB_LIST = obj(
    {
        "jobs": {"type": "array", "items": ref("JobListItem")},
        "next_cursor": {**nullable(text()), "description": "pass back as cursor; null: no more pages"},
    }
)
JOB_EVENT = obj(
    {name: _JOB_STATE[name] for name in ("job_id", "status", "stage", "progress", "elapsed_seconds")}
    | {"event_time": UNIX_TIME},
    {
        **{name: schema for name, schema in _JOB_STATE.items()},
        "logs": text("progress events: the provider's last log lines, when they changed"),
        "eta_seconds": {
            **SECONDS,
            "description": "progress events: seconds left if this run takes as long as "
            "recent runs of its model and kind of request (0: running late)",
        },
        "progress_estimated": {
            "type": "boolean",
            "description": "true: `progress` is guessed from recent run times (the provider reports none)",
        },
    },
    "The data of one event: a status event carries the job's whole state (errors clipped), a progress event only "
    "what moves. Merge each onto the last state held.",
)
SSE_EVENT = obj(
    {
        "event": {"type": "string", "enum": EVENT_NAMES},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": ref("JobEvent")},
    },
    {
        "id": text(
            "the event's position (per job, or every job's position dot-separated on the multi-job stream); "
            "Last-Event-ID resumes after it"
        ),
        "retry": {"type": "integer", "description": "reconnect delay, milliseconds"},
    },
    "One Server-Sent Event; the stream is a sequence of them (OpenAPI 3.2's itemSchema), with `: ping` comments.",
)

PROJECT_SSE_EVENT = obj(
    {
        "event": {"type": "string", "enum": ["project", "version_added", "version_chosen", *EVENT_NAMES]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "project: the project as GET shows it; version_added: {project_id, scene_id, job_id, "
            "kind, etag}; version_chosen: {project_id, scene_id, job_id, previous_job_id, etag}; "
            "a job's event: its JobEvent",
        },
    },
    {
        "id": text("the project's version, then the position of each job still followed; Last-Event-ID resumes"),
        "retry": {"type": "integer", "description": "reconnect delay, milliseconds"},
    },
    "One Server-Sent Event of a project's stream, with `: ping` comments.",
)

ACCEPTED_JOB = obj(
    {
        "job_id": ID,
        "kind": _JOB_STATE["kind"],
        "status": _JOB_STATE["status"],
        "backend": _JOB_STATE["backend"],
        "sandbox": BOOLEAN,
        **_FOLLOW,
        "video_url": {**URL, "description": "serves the clip once the job succeeded (409 before)"},
    },
    {
        "project_id": {**ID, "description": "a project's job"},
        "scene_id": {**ID, "description": "a project scene's clip version"},
        **SIGNED,
    },
    "A job a request started. URLs are absolute on MV_PUBLIC_BASE_URL when it is set.",
)
JOBS_ACCEPTED = obj(
    {"jobs": {"type": "array", "items": ref("AcceptedJob")}},
    {"job": ref("AcceptedJob"), "project": ref("Project")},
    "The 202 of every request that starts jobs (one envelope, `mvserver/jobs/accepted.py`). `jobs`: every job it started "
    "(a project's clips may start none). `job`: the job, when the route starts exactly one; its fields are also "
    "repeated at the top level, as these routes always answered. `project`: the project as GET "
    "/api/mv/projects/{project_id} shows it, on a project's routes (its ETag in the header).",
)

SONG = obj(
    {"audio_id": ID, "offset": SECONDS, "duration": SECONDS},
    {
        "sized_by": {
            "type": ["string", "null"],
            "enum": ["bars", "length", None],
            "description": "how the scenes were sized to the song when the project was made: on its "
            "bars (every cut on a downbeat), or by length; null: not sized to it",
        },
        "sizing_note": {
            **nullable(text()),
            "description": "why not on bars: no beat grid (and why), the analysis off, failed or not ready",
        },
    },
    description="The project's song.",
)
CUT_KINDS = ["downbeat", "beat", "time", "end"]
SONG_WINDOW = obj(
    {"start": SECONDS, "end": SECONDS},
    {
        "first_bar": {
            **nullable(INTEGER),
            "description": "bar of the start: 0 is the first downbeat's bar, -1 before it; null without a beat grid",
        },
        "end_bar": {**nullable(INTEGER), "description": "the bar after the window's last one (exclusive)"},
        "section": {**nullable(INTEGER), "description": "index in the song analysis' sections of the start"},
        "section_label": nullable(text()),
        "cut": {
            "type": "string",
            "enum": CUT_KINDS,
            "description": "what the window's end (the cut) lands on within one frame: a downbeat, a beat, the "
            "song's end, or a plain time",
        },
    },
    "Where a scene's kept part plays in the project's song (seconds), its bars and section, and its cut.",
)
CLIP_VERSION = obj(
    {
        "job_id": ID,
        "created_at": UNIX_TIME,
        "duration": INTEGER,
        "status": {
            "type": "string",
            "enum": [*JOB_STATUSES, "missing"],
            "description": "the job's status; missing: the job store no longer has it",
        },
        "stage": nullable(text()),
        "progress": _JOB_STATE["progress"],
        "video_url": nullable(text()),
        "error": nullable(ref("ErrorDetail")),
    },
    {name: _JOB_STATE[name] for name in ("poster_url", "video_seconds", "video_width", "video_height")},
    description="One generated clip of a scene, with its job's live state.",
)
PROJECT_SCENE = obj(
    {
        "id": ID,
        "prompt": text(),
        "negative_prompt": text(),
        "duration": {**INTEGER, "description": "seconds of the next clip generated for the scene"},
        "trim_in": SECONDS,
        "trim_out": SECONDS,
        "versions": {"type": "array", "items": ref("ClipVersion")},
        "chosen_job_id": nullable(ID),
        "awaited_job_id": nullable(ID),
        "seconds": {**SECONDS, "description": "trim_out - trim_in"},
        "song_start": {**nullable(SECONDS), "description": "where the kept part starts in the song; null: no song"},
        "chosen_video_url": nullable(text()),
    },
    {
        "chosen_poster_url": {**nullable(text()), "description": "the chosen clip's poster"},
        "window": nullable(ref("SongWindow")),
    },
    description="A scene in display order.",
)
PROJECT = obj(
    {
        "project_id": ID,
        "etag": text("the ETag a PATCH names in If-Match"),
        "version": INTEGER,
        "owner": nullable(text()),
        "created_at": UNIX_TIME,
        "updated_at": UNIX_TIME,
        "idea": text(),
        "character_description": text(),
        "style": nullable(text()),
        "aspect_ratio": text(),
        "character_image_id": nullable(ID),
        "song": nullable(ref("ProjectSong")),
        "scenes": {"type": "array", "items": ref("ProjectScene")},
        "assembly_job_id": nullable(ID),
        "total_seconds": SECONDS,
    },
    description="A project (storyboard): the record, every clip version with its job's live state.",
)
TIMELINE_ENTRY = obj(
    {
        "scene_id": ID,
        "job_id": nullable(ID),
        "trim_in": SECONDS,
        "trim_out": SECONDS,
        "seconds": SECONDS,
        "song_start": nullable(SECONDS),
        "status": {"type": ["string", "null"], "enum": [*JOB_STATUSES, None]},
    }
)
TIMELINE = obj(
    {
        "project_id": ID,
        "song": nullable(ref("ProjectSong")),
        "entries": {"type": "array", "items": ref("TimelineEntry")},
    },
    description="The scenes in display order: chosen clip, trims, where each starts in the song.",
)

SCENE = obj({"description": text(), "negative_description": text()})
SCENES_METADATA = obj(
    {
        "model": text(),
        "parameters": ANY_OBJECT,
        "defaults_applied": STRINGS,
        "elapsed_seconds": SECONDS,
        "attempts": INTEGER,
        "sandbox": BOOLEAN,
    }
)
_SCENE_FILES = {"json": text(), "markdown": text()}
SCENES = obj(
    {
        "scenes_id": ID,
        "scenes": {"type": "array", "items": ref("Scene")},
        "sandbox": BOOLEAN,
        "urls": {**obj(_SCENE_FILES), "description": "GET the scenes as JSON or Markdown"},
        "metadata": ref("ScenesMetadata"),
    },
    SIGNED,
    "Scene prompts written by Gemini, saved as JSON and Markdown.",
)
SAVED_SCENES = obj(
    {"scenes_id": ID, "scenes": {"type": "array", "items": ref("Scene")}, "metadata": ref("ScenesMetadata")},
    {"owner_key_id": text()},
)

IMAGE_METADATA = obj(
    {
        "model": text(),
        "prompt": text(),
        "parameters": ANY_OBJECT,
        "defaults_applied": STRINGS,
        "prediction_id": text(),
        "prediction_ids": STRINGS,
        "elapsed_seconds": SECONDS,
    }
)
_IMAGE = {"image_id": ID, "mime_type": text(), "image_url": URL}
CANDIDATE_IMAGE = obj(
    {**_IMAGE, "prediction_id": text(), "seed": nullable(INTEGER)},
    description="One candidate image; send its image_id as reference_image_id.",
)
_IMAGES = {
    **_IMAGE,
    "sandbox": BOOLEAN,
    "metadata": ref("ImageMetadata"),
    "images": {"type": "array", "items": ref("CandidateImage")},
}
CHARACTER_REFERENCE = obj(
    {**_IMAGES, "image_base64": text("the first image, base64")},
    SIGNED,
    "Character images: the first one at the top level (inlined as base64), every candidate in `images`.",
)
PROJECT_IMAGE = obj(_IMAGES, SIGNED, "The project's new character image (no base64).")

PROJECT_CHARACTER = obj({"image": ref("ProjectImage"), "project": ref("Project")})
WEBHOOK_ACK = obj({"status": {"type": "string", "enum": ["accepted", "duplicate", "ignored"]}})
WEBHOOK_ATTEMPT = obj(
    {"at": UNIX_TIME, "http_status": nullable(INTEGER), "error": nullable(text()), "seconds": SECONDS},
    description="One POST: the receiver's HTTP status, or why none came.",
)
WEBHOOK_DELIVERY = obj(
    {
        "webhook_id": text("the webhook-id header: the same for every attempt and redelivery of the message"),
        "event_id": INTEGER,
        "type": text("job.<event>, e.g. job.succeeded"),
        "status": {
            "type": "string",
            "enum": ["pending", "delivered", "failed"],
            "description": "failed: given up after jobs.webhook_retry_seconds",
        },
        "attempt_count": INTEGER,
        "attempts": {
            "type": "array",
            "items": ref("WebhookAttempt"),
            "description": "the first and the latest attempts (at most 20)",
        },
    },
    {"first_attempt_at": UNIX_TIME},
)
WEBHOOK_DELIVERIES = obj(
    {
        "job_id": ID,
        "webhook_url": {**nullable(text()), "description": "null: no webhook"},
        "webhook_events": {"type": ["string", "null"], "enum": ["completed", "all", None]},
        "deliveries": {"type": "array", "items": ref("WebhookDelivery")},
    },
    description="GET /api/mv/jobs/{job_id}/deliveries: the job's webhook deliveries, in order.",
)
REDELIVERY = obj(
    {"job_id": ID, "event_id": INTEGER}, description="The event from which the job's deliveries are sent again."
)

# The song analysis (mvserver.analysis.model), its nested models named for the song.
_ANALYSIS_NAMES = {
    "Grid": "SongGrid",
    "Section": "SongSection",
    "Curve": "SongCurve",
    "BeatEvidence": "BeatEvidence",
    "SongAnalysis": "SongAnalysis",
}


def _analysis_schemas() -> dict[str, Schema]:
    raw = SongAnalysis.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = {**raw.pop("$defs", {}), "SongAnalysis": raw}

    def renamed(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (ref(_ANALYSIS_NAMES[v.rsplit("/", 1)[1]])["$ref"] if k == "$ref" else renamed(v))
                for k, v in node.items()
                if k != "additionalProperties"
            }  # answers stay open
        return [renamed(v) for v in node] if isinstance(node, list) else node

    schemas = {_ANALYSIS_NAMES[name]: renamed(schema) for name, schema in defs.items()}
    schemas["SongAnalysis"]["description"] = (
        "A song's analysis (version 1): tempo, beats, downbeats and meter (`grid`, null when the beat evidence is "
        "too weak: `no_grid_reason` says why), sections, an energy curve and waveform peaks. Times are seconds from "
        "the start of the song."
    )
    return schemas


ANALYSIS_STATUSES = ["ready", "pending", "failed", "off"]
SONG_ANALYSIS_FIELDS = {
    "song_url": {**URL, "description": "GET it for the analysis once it is ready"},
    "analysis_status": {
        "type": "string",
        "enum": ANALYSIS_STATUSES,
        "description": "ready: `analysis` holds it; pending: still running (GET song_url again "
        "shortly); failed: `analysis_error` says why; off: the server analyses no "
        "songs (MV_ANALYSIS_WORKERS=0)",
    },
    "analysis": nullable(ref("SongAnalysis")),
    "analysis_error": {
        **nullable(obj({"code": text("analysis_failed or analysis_timeout"), "message": text()})),
        "description": "why the analysis failed",
    },
}

RESPONSE_SCHEMAS: dict[str, Schema] = {
    "ErrorDetail": ERROR_DETAIL,
    "SignedUrls": SIGNED_URLS,
    "JobState": JOB_STATE,
    "Job": JOB,
    "JobListItem": JOB_LIST_ITEM,
    "JobList": JOB_LIST,
    "JobEvent": JOB_EVENT,
    "JobStreamEvent": SSE_EVENT,
    "ProjectStreamEvent": PROJECT_SSE_EVENT,
    "AcceptedJob": ACCEPTED_JOB,
    "JobsAccepted": JOBS_ACCEPTED,
    "ProjectSong": SONG,
    "ClipVersion": CLIP_VERSION,
    "ProjectScene": PROJECT_SCENE,
    "Project": PROJECT,
    "TimelineEntry": TIMELINE_ENTRY,
    "Timeline": TIMELINE,
    "Scene": SCENE,
    "ScenesMetadata": SCENES_METADATA,
    "Scenes": SCENES,
    "SavedScenes": SAVED_SCENES,
    "ImageMetadata": IMAGE_METADATA,
    "CandidateImage": CANDIDATE_IMAGE,
    "CharacterReference": CHARACTER_REFERENCE,
    "ProjectImage": PROJECT_IMAGE,
    "ProjectCharacter": PROJECT_CHARACTER,
    "WebhookAck": WEBHOOK_ACK,
    "SongWindow": SONG_WINDOW,
    **_analysis_schemas(),
    "Cost": COST,
    "Usage": USAGE,
    "UsageGroup": USAGE_GROUP,
    "UsageEntry": USAGE_ENTRY,
    "UsageReport": USAGE_REPORT,
    "WebhookAttempt": WEBHOOK_ATTEMPT,
    "WebhookDelivery": WEBHOOK_DELIVERY,
    "WebhookDeliveries": WEBHOOK_DELIVERIES,
    "Redelivery": REDELIVERY,
    "RedeliverRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "event_id": {**INTEGER, "minimum": 1, "description": "default: the last event the webhook sends"}
        },
    },
}
