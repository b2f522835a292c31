"""The request models of one app (each feature builds its own from the settings) and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from mvserver import __version__
from mvserver.assembly.schemas import assemble_request_model, assembly_options_model
from mvserver.core.config import Config
from mvserver.core.fields import UUID4_PATTERN
from mvserver.images.schemas import image_request_model
from mvserver.lipsync.schemas import lipsync_request_model
from mvserver.openapi.document import complete
from mvserver.openapi.responses import SONG_ANALYSIS_FIELDS
from mvserver.projects.schemas import ProjectModels
from mvserver.scenes.schemas import scenes_request_model
from mvserver.usage.schemas import USAGE_TIME
from mvserver.videos.schemas import video_request_model

INTEGER_RULE = "Integer fields accept a JSON number with no fractional part, so 8 and 8.0 are the same value."


_UUID4 = UUID4_PATTERN.strip("^$")
JOB_LIST_PATTERN = f"^{_UUID4}(,{_UUID4}){{0,499}}$"


class RequestModels(BaseModel):
    """The request models of one app, built from its config."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    scenes: type[BaseModel]
    image: type[BaseModel]
    video: type[BaseModel]
    projects: ProjectModels
    lipsync: type[BaseModel]
    assemble: type[BaseModel]
    assembly_options: type[BaseModel]

    @classmethod
    def build(cls, config: Config) -> RequestModels:
        return cls(
            scenes=scenes_request_model(config),
            image=image_request_model(config),
            video=video_request_model(config),
            projects=ProjectModels.build(config),
            lipsync=lipsync_request_model(config),
            assemble=assemble_request_model(config),
            assembly_options=assembly_options_model(config),
        )


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


AUDIO_BODY = {
    "required": True,
    "content": {
        "audio/*": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "additionalProperties": False,
                "properties": {"file": {"type": "string", "contentMediaType": "application/octet-stream"}},
            }
        },
    },
}
AUDIO_SCHEMA = {
    "type": "object",
    "required": [
        "audio_id",
        "format",
        "mime_type",
        "codec",
        "duration",
        "sample_rate",
        "channels",
        "size_bytes",
        "audio_url",
    ],
    "properties": {
        "audio_id": {"type": "string", "pattern": UUID4_PATTERN},
        "format": {"type": "string", "enum": ["mp3", "wav", "m4a", "aac", "ogg", "flac"]},
        "mime_type": {"type": "string"},
        "codec": {"type": "string"},
        "duration": {"type": "number", "description": "Seconds, from decoding the whole stream."},
        "sample_rate": {"type": "integer"},
        "channels": {"type": "integer", "minimum": 1, "maximum": 8},
        "size_bytes": {"type": "integer"},
        "audio_url": {"type": "string"},
        **SONG_ANALYSIS_FIELDS,
    },
}


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _answers(
    ok: int, description: str, *errors: int, content: str | tuple[str, ...] = "application/json"
) -> dict[str, Any]:
    """Responses: the success (with its media types) and JSON errors, plus the 403/421 every route may answer."""
    kinds = (content,) if isinstance(content, str) else content
    answers: dict[str, Any] = {str(ok): {"description": description, "content": {kind: {} for kind in kinds}}}
    for status in (*errors, 403, 421):
        answers[str(status)] = {
            "description": ERROR_DESCRIPTIONS.get(status, "error"),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return answers


def _described(answers: dict[str, Any], status: int, description: str) -> dict[str, Any]:
    """``answers`` with the description of one error status replaced by what that route answers with it."""
    answers[str(status)] = {**answers[str(status)], "description": description}
    return answers


ERROR_DESCRIPTIONS = {
    403: "forbidden_origin: the Origin header names a site that is neither this server nor in MV_CORS_ORIGINS",
    415: "unsupported_media_type: a POST body must be sent as Content-Type: application/json",
    421: "misdirected_request: the Host header names a host that is not in MV_ALLOWED_HOSTS",
    416: "the Range header asks for bytes the video does not have",
    409: "conflict (idempotency_in_progress: a request with this Idempotency-Key is still being answered)",
    422: "unprocessable (idempotency_key_reused: this Idempotency-Key was used with another request)",
}

# The POSTs that create jobs honour Idempotency-Key (see mvserver/web/access/idempotency.py).
JOB_CREATING_PATHS = (
    "/api/mv/generate_video",
    "/api/mv/lipsync",
    "/api/mv/assemble",
    "/api/mv/projects/{project_id}/clips",
    "/api/mv/projects/{project_id}/scenes/{scene_id}/clips",
    "/api/mv/projects/{project_id}/assemble",
    "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync",
)
# ... and so do the other POSTs that make something a retry must not make twice.
IDEMPOTENT_PATHS = (
    *JOB_CREATING_PATHS,
    "/api/mv/projects",
    "/api/mv/upload_audio",
    "/api/mv/projects/{project_id}/write_scenes",
    "/api/mv/projects/{project_id}/character",
)
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": r"^[\x21-\x7e][\x20-\x7e]{0,254}$"},
    "description": "Any unique string (1-255 printable ASCII characters, e.g. a UUID). The same key and request "
    "within 24 h return the first answer (header Idempotent-Replayed: true) instead of doing it again; "
    "the same key with another request is 422 idempotency_key_reused. The request is compared as the "
    "server reads it (text trimmed, defaults filled; an upload by its file's bytes), after it is "
    "validated. Scoped to the API key.",
}


def _with_idempotency(paths: dict[str, Any]) -> None:
    for path in IDEMPOTENT_PATHS:
        operation = paths[path]["post"]
        operation["parameters"] = [*operation.get("parameters", []), IDEMPOTENCY_PARAMETER]
        for status in (409, 422):
            operation["responses"].setdefault(
                str(status),
                {
                    "description": ERROR_DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            )


PROJECT_EVENTS_DESCRIPTION = (
    "Server-Sent Events that keep a page's project current; the stream stays open until the client goes. Events: "
    "`project` (the project as GET shows it, with its etag: when the stream opens and after every write by anyone), "
    "`version_added` {project_id, scene_id, job_id, kind, etag} (right after the `project` event that added it), "
    "`version_chosen` {project_id, scene_id, job_id, previous_job_id, etag} (a scene's chosen clip changed: by a "
    "write, or its awaited version succeeded, which moves no ETag), and the events of the project's unfinished jobs "
    "exactly as on the job streams (queued, running, progress, succeeded, failed, canceled; data.job_id says whose). "
    "The event id is the project version and each followed job's position (`7.736726c7-11`): Last-Event-ID (or "
    "`after`) resumes the jobs while the project is at that version, and starts with a `project` event otherwise. "
    "A `: ping` comment every jobs.sse_ping_interval_seconds."
)
PROJECT_EVENTS_AFTER = {
    "name": "after",
    "in": "query",
    "required": False,
    "description": "An event id of this stream to resume from (an EventSource cannot set "
    "Last-Event-ID; the header takes precedence)",
    "schema": {"type": "string", "pattern": r"^[0-9]{1,9}(\.[0-9a-f]{8}-[0-9]{1,9}){0,1000}$"},
}
PROJECT_EVENTS_LINK_SCHEMA = {
    "type": "object",
    "required": ["events_url", "expires_at"],
    "properties": {
        "events_url": {
            "type": "string",
            "description": "GET /api/mv/projects/{project_id}/events[?after=…][&kid=…&exp=…&sig=…]",
        },
        "expires_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "when the signed link stops working (null with keys off)",
        },
    },
}


def _stream_and_poster_paths() -> dict[str, Any]:
    project = [_id_parameter("project_id")]
    return {
        "/api/mv/get_poster/{video_id}": {
            "get": {
                "summary": "The clip's first frame as a JPEG (its job's poster_url), under get_video's rules: 409 while "
                "the job has not succeeded, 404 for an unknown id, another key's job, or a clip without a "
                "poster, 410 once expired",
                "parameters": [_id_parameter("video_id")],
                "responses": _answers(200, "poster", 400, 404, 409, 410, content="image/jpeg"),
            }
        },
        "/api/mv/projects/{project_id}/events": {
            "get": {
                "summary": "The project's event stream: its writes, versions added and chosen, and its jobs' events",
                "description": PROJECT_EVENTS_DESCRIPTION,
                "parameters": [*project, PROJECT_EVENTS_AFTER],
                "responses": _answers(200, "event stream", 400, 404, 503, content="text/event-stream"),
            }
        },
        "/api/mv/projects/{project_id}/events/link": {
            "get": {
                "summary": "The URL of the project's event stream for an EventSource: with keys on signed for the "
                "caller's key (the signature covers `after`) and valid until `expires_at`; with keys off the "
                "plain URL and `expires_at` null",
                "parameters": [*project, PROJECT_EVENTS_AFTER],
                "responses": {
                    **_answers(200, "the stream's URL", 400, 404),
                    "200": {
                        "description": "the stream's URL",
                        "content": {"application/json": {"schema": PROJECT_EVENTS_LINK_SCHEMA}},
                    },
                },
            }
        },
    }


def _id_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": UUID4_PATTERN}}


def _if_match(required: bool) -> dict[str, Any]:
    return {
        "name": "If-Match",
        "in": "header",
        "required": required,
        "schema": {"type": "string"},
        "description": "The project's ETag as last read" + ("" if required else " (optional: 412 if it moved)"),
    }


def _options_body(description: str) -> dict[str, Any]:
    return {
        "required": False,
        "description": description,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }


def _project_paths() -> dict[str, Any]:
    project = [_id_parameter("project_id")]
    action = [*project, _if_match(False)]
    return {
        "/api/mv/projects": {
            "post": {
                "summary": "Create a project (with audio_id: scenes sized to cover the song)",
                "requestBody": _json_body("CreateProjectRequest"),
                "responses": _answers(201, "the project (ETag, Location)", 400),
            }
        },
        "/api/mv/projects/{project_id}": {
            "get": {
                "summary": "The project, with every clip version's job state",
                "parameters": project,
                "responses": _answers(200, "the project (ETag)", 400, 404),
            },
            "patch": {
                "summary": "Edit prompts, order, trims, chosen versions, song offset (If-Match required)",
                "parameters": [*project, _if_match(True)],
                "requestBody": _json_body("PatchProjectRequest"),
                "responses": _answers(200, "the project (new ETag)", 400, 404, 409, 412, 428),
            },
        },
        "/api/mv/projects/{project_id}/write_scenes": {
            "post": {
                "summary": "Write the scene prompts with Gemini from the project's idea, character and style",
                "parameters": action,
                "requestBody": {**_json_body("WriteProjectScenesRequest"), "required": False},
                "responses": _answers(200, "the project", 400, 404, 412, 429, 502, 503, 504),
            }
        },
        "/api/mv/projects/{project_id}/character": {
            "post": {
                "summary": "Render the character image (Imagen) and make it the project's reference image",
                "parameters": action,
                "requestBody": _options_body(
                    "Optional image options: number_of_images (candidates, within the "
                    "images settings: the first becomes the reference image, all are kept "
                    "on the project as character_candidates until the next render), "
                    "aspect_ratio, safety_filter_level, person_generation, output_format, "
                    "negative_prompt, seed"
                ),
                "responses": _answers(200, "{image, project}", 400, 404, 412, 422, 429, 502, 503, 504),
            }
        },
        "/api/mv/projects/{project_id}/clips": {
            "post": {
                "summary": "Start a clip job for every scene without a chosen clip or one in progress",
                "parameters": action,
                "requestBody": _options_body("Optional: backend, seed, generate_audio, video_rules_template"),
                "responses": _answers(202, "{jobs, project}", 400, 404, 409, 412),
            }
        },
        "/api/mv/projects/{project_id}/scenes/{scene_id}/clips": {
            "post": {
                "summary": "Start a new clip version of one scene (older versions are kept)",
                "parameters": [*action, _id_parameter("scene_id")],
                "requestBody": _options_body("Optional: backend, seed, generate_audio, video_rules_template"),
                "responses": _answers(202, "{job, project}", 400, 404, 409, 412),
            }
        },
        "/api/mv/projects/{project_id}/assemble": {
            "post": {
                "summary": "Start an assembly job of the project's chosen clips (display order, trims) with its song from "
                "its offset; 400 naming scenes.N when a scene has no finished chosen clip, scenes when the "
                "video would be too long (assembly_too_long), crossfade_seconds as for POST /assemble",
                "parameters": project,
                "requestBody": {**_json_body("AssemblyOptions"), "required": False},
                "responses": _answers(
                    202, "{job_id, kind, status, status_url, events_url, video_url, project}", 400, 404, 409
                ),
            }
        },
        "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync": {
            "post": {
                "summary": "Lip-sync the scene's chosen clip to its slice of the project's song; the job becomes a new "
                "version of the scene's clip (chosen once it succeeds)",
                "parameters": [*project, _id_parameter("scene_id")],
                "requestBody": _options_body("Optional: sync_mode, temperature, active_speaker"),
                "responses": _answers(202, "{job, project}", 400, 404, 409),
            }
        },
        "/api/mv/projects/{project_id}/timeline": {
            "get": {
                "summary": "Scenes in order with chosen clip, trims and song window start",
                "parameters": project,
                "responses": _answers(200, "timeline", 400, 404),
            }
        },
    }


HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status", "version", "mode", "sandbox", "providers", "styles", "auth", "store"],
    "properties": {
        "status": {
            "type": "string",
            "enum": ["ok", "degraded"],
            "description": "degraded while the job and project store cannot be reached (see store)",
        },
        "version": {"type": "string"},
        "mode": {
            "type": "string",
            "enum": ["live", "sandbox"],
            "description": "sandbox when any provider service is answered by the built-in simulator",
        },
        "sandbox": {"type": "boolean"},
        "providers": {"type": "object", "additionalProperties": {"type": "string", "enum": ["live", "sandbox"]}},
        "styles": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "label", "description"],
                "properties": {
                    "name": {"type": "string"},
                    "label": {"type": "string"},
                    "description": {"type": "string"},
                },
            },
        },
        "auth": {
            "type": "object",
            "required": ["keys_required"],
            "properties": {
                "keys_required": {
                    "type": "boolean",
                    "description": "true when every other /api/mv route needs Authorization: Bearer "
                    "<API key> (MV_API_KEYS_FILE is set): a page should ask for a key "
                    "before its first call",
                }
            },
        },
        "store": {
            "type": "object",
            "required": ["kind", "reachable"],
            "properties": {
                "kind": {"type": "string", "enum": ["files", "redis"]},
                "reachable": {"type": "boolean", "description": "false while the store does not answer a ping in 2 s"},
            },
        },
    },
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
ME_SCHEMA = {
    "type": "object",
    "required": ["key_id", "name", "limits", "tokens", "jobs"],
    "properties": {
        "key_id": {"type": ["string", "null"], "description": "the caller's key id (null with keys off)"},
        "name": {"type": ["string", "null"]},
        "limits": {
            "type": ["object", "null"],
            "description": "the key's limits from the keys file (null: unlimited)",
            "properties": {
                name: _NUMBER_OR_NULL
                for name in (
                    "jobs_per_minute",
                    "jobs_burst",
                    "blocking_per_minute",
                    "blocking_burst",
                    "max_running_jobs",
                    "uploads_per_minute",
                    "uploads_burst",
                    "max_concurrent_uploads",
                    "monthly_budget",
                )
            },
        },
        "tokens": {
            "type": ["object", "null"],
            "description": "tokens each bucket holds now (null: unlimited); a request takes one per job, at "
            "most the burst",
            "properties": {name: _NUMBER_OR_NULL for name in ("jobs", "blocking", "uploads")},
        },
        "jobs": {
            "type": ["object", "null"],
            "required": ["running", "waiting"],
            "properties": {
                "running": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the key's unfinished jobs that are not waiting: queued for a slot or "
                    "running (at most max_running_jobs of them hold its places)",
                },
                "waiting": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the key's jobs queued behind max_running_jobs; each starts as one of the "
                    "running ones ends",
                },
            },
        },
    },
}
STORE_UNAVAILABLE_ANSWER = {
    "description": "store_unavailable: the job and project store (Redis) is unreachable; retry after Retry-After",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
# Routes that never need the store (everything else may answer 503 store_unavailable while Redis is down).
STORELESS_PATHS = frozenset({"/api/mv/health", "/api/mv/health/live", "/api/mv/openapi.json", "/metrics"})
EVENTS_LINK_SCHEMA = {
    "type": "object",
    "required": ["events_url", "expires_at", "jobs"],
    "properties": {
        "events_url": {"type": "string", "description": "GET /api/mv/events?jobs=…[&after=…][&kid=…&exp=…&sig=…]"},
        "expires_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "when the signed link stops working (null with keys off)",
        },
        "jobs": {"type": "array", "items": {"type": "string"}, "description": "the job ids, in stream order"},
    },
}
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (mv_<key id>_<secret>) from `python -m mvserver keys create NAME`; required on "
        "every /api/mv route but health when MV_API_KEYS_FILE is set. GET routes a browser loads "
        "without headers also accept the signed links of a response's `signed_urls` "
        "or of GET /api/mv/events/link (kid, exp, sig; the signature covers the path and every other "
        "query parameter; 403 when tampered or expired).",
    },
}
SIGNED_LINK_PARAMETERS = [
    {
        "name": "kid",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "signed link: the key id it was made for",
    },
    {
        "name": "exp",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
        "description": "signed link: expiry, unix seconds",
    },
    {
        "name": "sig",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "signed link: HMAC-SHA256 signature",
    },
]


# POST routes that draw on the key's quotas (a job-creating one also counts against its running-jobs cap)
CHARGED_POSTS = frozenset(
    {
        "/api/mv/create_scenes",
        "/api/mv/generate_character_reference",
        "/api/mv/generate_video",
        "/api/mv/lipsync",
        "/api/mv/assemble",
        "/api/mv/projects/{project_id}/write_scenes",
        "/api/mv/projects/{project_id}/character",
        "/api/mv/projects/{project_id}/clips",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/clips",
        "/api/mv/projects/{project_id}/assemble",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync",
        "/api/mv/upload_audio",
    }
)
# A usage report's bound: a date (midnight UTC), a date-time (UTC unless it has an offset), or unix seconds
# POST routes that create jobs: with keys on, each may answer 402 budget_exceeded (the key's monthly_budget)
JOB_POSTS = frozenset(
    {
        "/api/mv/generate_video",
        "/api/mv/lipsync",
        "/api/mv/assemble",
        "/api/mv/projects/{project_id}/clips",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/clips",
        "/api/mv/projects/{project_id}/assemble",
        "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync",
    }
)


def _with_access(paths: dict[str, Any], metrics: bool) -> None:
    """With keys on: bearer auth on every operation but health, signed-link parameters on GETs, 401/403/429."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path.startswith("/api/mv/health"):
                operation["security"] = []
                continue
            answers = operation["responses"]
            answers.setdefault(
                "401",
                {
                    "description": "missing or invalid API key",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            )
            if method == "get" and path.startswith("/api/mv/") and path != "/api/mv/openapi.json":
                operation["parameters"] = operation.get("parameters", []) + SIGNED_LINK_PARAMETERS
                answers.setdefault(
                    "403",
                    {
                        "description": "signed link tampered, expired or revoked",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                )
            if method == "post" and path in CHARGED_POSTS:
                answers.setdefault(
                    "429",
                    {
                        "description": "rate_limited (Retry-After: when the tokens the request "
                        "needs, one per job up to the burst, are there) or, for "
                        "upload_audio, quota_exceeded (the key's uploads running)",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                )
            if method == "post" and path in JOB_POSTS:
                answers.setdefault(
                    "402",
                    {
                        "description": "budget_exceeded: the job's estimated cost would pass the "
                        "key's monthly_budget; error.budget says what is left",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                )


def openapi_document(models: RequestModels, *, keys: bool = False, metrics: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the public API (with the bearer scheme and /metrics when they are on)."""
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for model in (
        models.scenes,
        models.image,
        models.video,
        models.lipsync,
        models.projects.create,
        models.projects.patch,
        models.projects.write_scenes,
        models.assemble,
        models.assembly_options,
    ):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    job_errors = (400, 404, 410, 503)
    stream_parameters = [
        {
            "name": "jobs",
            "in": "query",
            "required": True,
            "description": "Comma-separated job ids (at most jobs.sse_max_jobs_per_stream, 50)",
            "schema": {"type": "string", "pattern": JOB_LIST_PATTERN},
        },
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "Positions to resume from, in the form of an event id (`3.7.0`, one per job); on the stream a "
            "Last-Event-ID header takes precedence",
            "schema": {"type": "string", "pattern": r"^[0-9]{1,9}(\.[0-9]{1,9}){0,499}$"},
        },
    ]
    paths: dict[str, Any] = {
        "/api/mv/health": {
            "get": {
                "summary": "Version, sandbox/live mode per provider, style presets, and whether the API needs a key "
                "(never behind auth)",
                "responses": {
                    **_answers(200, "ok"),
                    "200": {"description": "ok", "content": {"application/json": {"schema": HEALTH_SCHEMA}}},
                },
            }
        },
        "/api/mv/me": {
            "get": {
                "summary": "The caller's API key: its id, name and limits, the tokens left in each bucket, and its jobs "
                "running and waiting behind max_running_jobs (every field null with keys off)",
                "responses": {
                    **_answers(200, "the key"),
                    "200": {"description": "the key", "content": {"application/json": {"schema": ME_SCHEMA}}},
                },
            }
        },
        "/api/mv/health/live": {
            "get": {
                "summary": "Liveness: 200 while the process serves requests, whether or not its store answers (never "
                "behind auth)",
                "responses": {
                    **_answers(200, "ok"),
                    "200": {
                        "description": "the process serves requests",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"type": "string", "enum": ["ok"]}},
                                }
                            }
                        },
                    },
                },
            }
        },
        "/api/mv/health/ready": {
            "get": {
                "summary": "Readiness: 200 while the job and project store answer; 503 store_unavailable while they do "
                "not (never behind auth)",
                "responses": {
                    **_answers(200, "ready"),
                    "200": {
                        "description": "the store answers",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status", "store"],
                                    "properties": {
                                        "status": {"type": "string", "enum": ["ready"]},
                                        "store": {"type": "string", "enum": ["files", "redis"]},
                                    },
                                }
                            }
                        },
                    },
                },
            }
        },  # + 503, as below
        "/api/mv/create_scenes": {
            "post": {
                "summary": "Write N scene prompts with Gemini",
                "requestBody": _json_body("CreateScenesRequest"),
                "responses": _answers(200, "scenes", 400, 413, 415, 422, 429, 502, 503, 504),
            }
        },
        "/api/mv/generate_character_reference": {
            "post": {
                "summary": "Render a character reference image with Replicate google/imagen-4",
                "requestBody": _json_body("CharacterReferenceRequest"),
                "responses": _answers(200, "image", 400, 413, 415, 422, 429, 502, 503, 504),
            }
        },
        "/api/mv/get_scenes/{scenes_id}.{ext}": {
            "get": {
                "summary": "Saved scenes as JSON or Markdown",
                "parameters": [
                    _id_parameter("scenes_id"),
                    {
                        "name": "ext",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["json", "md"]},
                    },
                ],
                "responses": _answers(200, "scenes file", 400, 404, content=("application/json", "text/markdown")),
            }
        },
        "/api/mv/get_image/{image_id}": {
            "get": {
                "summary": "The saved image",
                "parameters": [_id_parameter("image_id")],
                "responses": _answers(200, "image bytes", 400, 404, content="image/*"),
            }
        },
        "/api/mv/generate_video": {
            "post": {
                "summary": "Start a video job (answers 202 at once)",
                "requestBody": _json_body("GenerateVideoRequest"),
                "responses": _answers(202, "job accepted", 400, 404, 413, 415, 503),
            }
        },
        "/api/mv/lipsync": {
            "post": {
                "summary": "Start a lip-sync job (answers 202 at once): a finished clip's mouth movements follow a window "
                "of a song (Replicate sync/lipsync-2-pro); the result is served by get_video/{job_id}",
                "requestBody": _json_body("LipsyncRequest"),
                "responses": _described(
                    _answers(202, "job accepted", 400, 404, 413, 415, 503),
                    400,
                    "invalid_field, clip_not_found, clip_not_ready, invalid_clip, clip_too_long, "
                    "clip_too_large, invalid_audio, song_too_short, window_too_long, "
                    "window_too_short (the window is shorter than the server's "
                    "lipsync.limits.min_window_seconds, 0.5 s by default)",
                ),
            }
        },
        "/api/mv/assemble": {
            "post": {
                "summary": "Start an assembly job (answers 202 at once): finished clips (video or lip-sync jobs) joined "
                "with cuts (stream-copied where possible) or crossfades, with an optional song; the result "
                "is served by get_video/{job_id}. 400 names the field: clips (assembly_too_long past "
                "media.yaml assembly.output_seconds_max), clips.N.trim_in|trim_out (invalid_trim: outside "
                "the clip or keeping under one output frame), crossfade_seconds (under one frame, not "
                "shorter than every clip, or graph_too_large past assembly.graph_clips_max)",
                "requestBody": _json_body("AssembleRequest"),
                "responses": _answers(202, "job accepted", 400, 413, 415, 503),
            }
        },
        "/api/mv/jobs": {
            "get": {
                "summary": "The caller's jobs, newest first, a page at a time (the jobs made with keys off when keys are "
                "off); each item is the job's state (no request) with its URLs",
                "description": "Answers {jobs: [...], next_cursor}; pass next_cursor back as cursor for the next, older "
                "page (null: no more). A page looks at no more than 1,000 of the caller's jobs, so a rare "
                "filter may answer a short or empty page with a next_cursor.",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
                    },
                    {
                        "name": "kind",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["video", "lipsync", "assembly"]},
                    },
                    {
                        "name": "project_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": UUID4_PATTERN},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": r"^[0-9]{16}-" + UUID4_PATTERN[1:]},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                ],
                "responses": _answers(200, "a page of jobs", 400, 503),
            }
        },
        "/api/mv/jobs/{job_id}": {
            "get": {
                "summary": "Job state as JSON",
                "parameters": [_id_parameter("job_id")],
                "responses": _answers(200, "job", *job_errors),
            },
            "delete": {
                "summary": "Cancel the job and its provider prediction",
                "parameters": [_id_parameter("job_id")],
                "responses": _answers(200, "job", *job_errors),
            },
        },
        "/api/mv/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel the job (same as DELETE /api/mv/jobs/{job_id})",
                "parameters": [_id_parameter("job_id")],
                "responses": _answers(200, "job", *job_errors, 415),
            }
        },
        "/api/mv/jobs/{job_id}/deliveries": {
            "get": {
                "summary": "The job's webhook deliveries (webhook_url): each event sent, its status and attempts",
                "parameters": [_id_parameter("job_id")],
                "responses": _answers(200, "deliveries", *job_errors),
            }
        },
        "/api/mv/jobs/{job_id}/redeliver": {
            "post": {
                "summary": "Send the job's webhook again from event_id (default: its last event the webhook sends) on, "
                "in order; the same webhook-id as the first time",
                "parameters": [_id_parameter("job_id")],
                "requestBody": {**_json_body("RedeliverRequest"), "required": False},
                "responses": _answers(202, "sent again from this event", *job_errors, 409, 415),
            }
        },
        "/api/mv/jobs/{job_id}/events": {
            "get": {
                "summary": "Server-Sent Events: state, progress, final status",
                "parameters": [_id_parameter("job_id")],
                "responses": _answers(200, "event stream", *job_errors, content="text/event-stream"),
            }
        },
        "/api/mv/events": {
            "get": {
                "summary": "Server-Sent Events of several jobs on one connection; the event id is every job's position "
                "(dot-separated, in the order of `jobs`), so Last-Event-ID resumes them all",
                "parameters": stream_parameters,
                "responses": _answers(200, "event stream", 400, 404, content="text/event-stream"),
            }
        },
        "/api/mv/usage": {
            "get": {
                "summary": "Usage and estimated cost of the jobs that ended in [from, to): the caller's (every key's for "
                "an admin key), totals that are the sum of the jobs listed, grouped by model, kind or day",
                "description": "from/to: ISO 8601 dates (midnight UTC) or date-times, or unix seconds; default this "
                "calendar month (UTC) up to now. With keys on, `budget` is the caller's monthly limit, "
                "spending and what is left.",
                "parameters": [
                    {"name": "from", "in": "query", "required": False, "schema": USAGE_TIME},
                    {
                        "name": "to",
                        "in": "query",
                        "required": False,
                        "schema": {**USAGE_TIME, "description": "after `from`, at most report_max_days later"},
                    },
                    {
                        "name": "group_by",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["model", "kind", "day"], "default": "model"},
                    },
                ],
                "responses": _answers(200, "usage report", 400, 503),
            }
        },
        "/api/mv/events/link": {
            "get": {
                "summary": "The URL of the multi-job stream for these jobs (and positions), for an EventSource: with keys "
                "on signed for the caller's key (kid, exp, sig; the signature covers the exact job list and "
                "`after`, so a changed link gets 403) and valid until `expires_at`; with keys off the plain URL "
                "and `expires_at` null. 404 if a job is unknown (or another key's)",
                "parameters": stream_parameters,
                "responses": {
                    **_answers(200, "the stream's URL", 400, 404),
                    "200": {
                        "description": "the stream's URL",
                        "content": {"application/json": {"schema": EVENTS_LINK_SCHEMA}},
                    },
                },
            }
        },
        "/api/mv/get_video/{video_id}": {
            "get": {
                "summary": "The finished MP4 (Range requests supported)",
                "parameters": [_id_parameter("video_id")],
                "responses": {
                    **_answers(200, "video", 400, 404, 409, 410, 416, content="video/mp4"),
                    "206": {
                        "description": "the byte range asked for with a Range header",
                        "content": {"video/mp4": {}},
                    },
                },
            }
        },
        "/api/mv/webhooks/replicate": {
            "post": {
                "summary": "Replicate prediction webhooks (called by Replicate, not by clients; signed, no API key)",
                "description": "Body: the prediction JSON, at most 2 MiB. Headers webhook-id, webhook-timestamp and "
                "webhook-signature (Standard Webhooks, HMAC-SHA256, 300 s tolerance). Answers 200 with "
                '{"status": "accepted" | "duplicate" | "ignored"} at once; the job applies the update.',
                "parameters": [
                    {
                        "name": "job",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "pattern": UUID4_PATTERN},
                    }
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": _answers(200, "acknowledged", 400, 401, 413, 415),
            }
        },
        "/api/mv/upload_audio": {
            "post": {
                "summary": "Upload a song (mp3, wav, m4a/aac, ogg, flac; identified from its content, at most "
                "MV_MAX_AUDIO_MB); answers its audio_id, duration, sample rate, channels and format",
                "requestBody": AUDIO_BODY,
                "responses": {
                    **_described(
                        _answers(201, "audio saved", 400, 403, 408, 413, 415, 503),
                        400,
                        "invalid_audio (not an accepted audio file; one message for every file that "
                        "is not one, whatever it names), audio_too_long (the song lasts longer than "
                        "MV_MAX_AUDIO_SECONDS, 20 min by default), invalid_multipart, "
                        "incomplete_body",
                    ),
                    "201": {"description": "audio saved", "content": {"application/json": {"schema": AUDIO_SCHEMA}}},
                },
            }
        },
        "/api/mv/get_audio/{audio_id}": {
            "get": {
                "summary": "The uploaded song (Range requests supported)",
                "parameters": [_id_parameter("audio_id")],
                "responses": _answers(200, "audio", 400, 404, 416, content="audio/*"),
            }
        },
        "/api/mv/songs/{audio_id}": {
            "get": {
                "summary": "The uploaded song's description and analysis (tempo, beats, bars, sections, energy, "
                "waveform peaks): analysed at upload, or now for a song uploaded before; analysis_status "
                "pending: ask again shortly",
                "parameters": [_id_parameter("audio_id")],
                "responses": {
                    **_answers(200, "the song", 400, 404),
                    "200": {"description": "the song", "content": {"application/json": {"schema": AUDIO_SCHEMA}}},
                },
            }
        },
    }
    paths.update(_project_paths())
    paths.update(_stream_and_poster_paths())
    _with_idempotency(paths)
    for path, operations in paths.items():
        for operation in operations.values():
            if path not in STORELESS_PATHS:
                operation["responses"].setdefault("503", STORE_UNAVAILABLE_ANSWER)
    if metrics:
        paths["/metrics"] = {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "responses": _answers(200, "metrics", content="text/plain"),
            }
        }
    components: dict[str, Any] = {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "mvserver",
            "version": __version__,
            "description": "Music-video generation: scenes (Gemini), character images (Imagen 4), video jobs (Veo), lip-sync jobs (sync/lipsync-2-pro), assembly jobs (ffmpeg). "
            "POST bodies are JSON sent as Content-Type: application/json, except a song for "
            "upload_audio (an audio/* body or multipart/form-data). "
            + INTEGER_RULE
            + " Text fields are stripped of surrounding whitespace; a required one must not be "
            "only whitespace (the pattern says so). A request the HTTP parser refuses (a "
            "malformed header or request line, a line over 8190 bytes) is answered on any path "
            "with 400 and the Error shape: malformed_header (field: the header, when known) or "
            "malformed_request.",
        },
        "paths": paths,
        "components": components,
    }
    if keys:
        _with_access(paths, metrics)
        document["security"] = [{"bearerAuth": []}]
    complete(document, models, keys=keys)
    return document
