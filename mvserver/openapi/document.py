"""What makes the OpenAPI document generate a typed client: operation ids, response bodies, errors, security.

:func:`mvserver.openapi.schemas.openapi_document` describes the routes (paths, parameters, request bodies, statuses);
:func:`complete` then gives every operation its stable ``operationId``, a schema for every JSON answer (the bodies
in :mod:`mvserver.openapi.responses`, the errors all ``Error``), the statuses every route of its kind may answer
(500, 413 and 415 for bodies, 503 where a store is read, 206/302/304/416 for files), the headers a client reads
(``Location``, ``ETag``, ``Retry-After``, ...), the request schemas of the project actions' option bodies and, with
API keys on, its ``security``. A route without an entry in :data:`OPERATIONS` fails the document's test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mvserver.openapi.responses import RESPONSE_SCHEMAS, ref
from mvserver.projects.schemas import CHARACTER_OPTIONS, CLIP_OPTIONS, SCENE_LIPSYNC_OPTIONS

if TYPE_CHECKING:
    from mvserver.openapi.schemas import RequestModels

Document = dict[str, Any]
HEALTH = ("/api/mv/health", "/api/mv/health/live", "/api/mv/health/ready")  # never behind a key
PUBLIC = (*HEALTH, "/api/mv/webhooks/replicate")  # no API key: open, or signed by Replicate
PROJECT = "/api/mv/projects/{project_id}"
SCENE = PROJECT + "/scenes/{scene_id}"

# (path, method) -> (operationId, schema of the success answer's JSON or event-stream body, by status)
OPERATIONS: dict[tuple[str, str], tuple[str, dict[str, str]]] = {
    ("/api/mv/health", "get"): ("getHealth", {"200": "Health"}),
    ("/api/mv/health/live", "get"): ("getLiveness", {"200": "Liveness"}),
    ("/api/mv/health/ready", "get"): ("getReadiness", {"200": "Readiness"}),
    ("/api/mv/me", "get"): ("getMe", {"200": "Me"}),
    ("/api/mv/create_scenes", "post"): ("createScenes", {"200": "Scenes"}),
    ("/api/mv/get_scenes/{scenes_id}.{ext}", "get"): ("getScenes", {"200": "SavedScenes"}),
    ("/api/mv/generate_character_reference", "post"): ("generateCharacterReference", {"200": "CharacterReference"}),
    ("/api/mv/get_image/{image_id}", "get"): ("getImage", {}),
    ("/api/mv/generate_video", "post"): ("generateVideo", {"202": "JobsAccepted"}),
    ("/api/mv/lipsync", "post"): ("startLipsync", {"202": "JobsAccepted"}),
    ("/api/mv/assemble", "post"): ("startAssembly", {"202": "JobsAccepted"}),
    ("/api/mv/jobs", "get"): ("listJobs", {"200": "JobList"}),
    ("/api/mv/jobs/{job_id}", "get"): ("getJob", {"200": "Job"}),
    ("/api/mv/jobs/{job_id}", "delete"): ("cancelJob", {"200": "Job"}),
    ("/api/mv/jobs/{job_id}/cancel", "post"): ("cancelJobByPost", {"200": "Job"}),
    ("/api/mv/jobs/{job_id}/events", "get"): ("streamJobEvents", {"200": "JobStreamEvent"}),
    ("/api/mv/jobs/{job_id}/deliveries", "get"): ("listJobWebhookDeliveries", {"200": "WebhookDeliveries"}),
    ("/api/mv/jobs/{job_id}/redeliver", "post"): ("startWebhookRedelivery", {"202": "Redelivery"}),
    ("/api/mv/events", "get"): ("streamEvents", {"200": "JobStreamEvent"}),
    ("/api/mv/usage", "get"): ("getUsage", {"200": "UsageReport"}),
    ("/api/mv/events/link", "get"): ("getEventsLink", {"200": "EventsLink"}),
    ("/api/mv/get_poster/{video_id}", "get"): ("getPoster", {}),
    (PROJECT + "/events", "get"): ("streamProjectEvents", {"200": "ProjectStreamEvent"}),
    (PROJECT + "/events/link", "get"): ("getProjectEventsLink", {"200": "ProjectEventsLink"}),
    ("/api/mv/get_video/{video_id}", "get"): ("getVideo", {}),
    ("/api/mv/webhooks/replicate", "post"): ("receiveReplicateWebhook", {"200": "WebhookAck"}),
    ("/api/mv/upload_audio", "post"): ("uploadAudio", {"201": "Audio"}),
    ("/api/mv/get_audio/{audio_id}", "get"): ("getAudio", {}),
    ("/api/mv/songs/{audio_id}", "get"): ("getSong", {"200": "Audio"}),
    ("/api/mv/projects", "post"): ("createProject", {"201": "Project"}),
    (PROJECT, "get"): ("getProject", {"200": "Project"}),
    (PROJECT, "patch"): ("updateProject", {"200": "Project"}),
    (PROJECT + "/write_scenes", "post"): ("writeProjectScenes", {"200": "Project"}),
    (PROJECT + "/character", "post"): ("generateProjectCharacter", {"200": "ProjectCharacter"}),
    (PROJECT + "/clips", "post"): ("startProjectClips", {"202": "JobsAccepted"}),
    (SCENE + "/clips", "post"): ("startSceneClip", {"202": "JobsAccepted"}),
    (PROJECT + "/assemble", "post"): ("startProjectAssembly", {"202": "JobsAccepted"}),
    (SCENE + "/lipsync", "post"): ("startSceneLipsync", {"202": "JobsAccepted"}),
    (PROJECT + "/timeline", "get"): ("getProjectTimeline", {"200": "Timeline"}),
    ("/metrics", "get"): ("getMetrics", {}),
}

# Errors a route answers beyond what its kind implies (see _statuses): provider conflicts and rejections, a
# project that kept changing (409 conflict), a project id that already exists.
EXTRA_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("/api/mv/health/ready", "get"): (503,),
    ("/api/mv/create_scenes", "post"): (409,),
    ("/api/mv/generate_character_reference", "post"): (409,),
    ("/api/mv/projects", "post"): (409,),
    (PROJECT + "/write_scenes", "post"): (409, 422),
    (PROJECT + "/character", "post"): (409,),
}
FILES = (
    "/api/mv/get_video/{video_id}",
    "/api/mv/get_poster/{video_id}",
    "/api/mv/get_audio/{audio_id}",
    "/api/mv/get_image/{image_id}",
    "/api/mv/get_scenes/{scenes_id}.{ext}",
)
BODILESS = {("/api/mv/jobs/{job_id}/cancel", "post")}  # a POST whose body is never read (so never too large)
STORE_PREFIXES = (
    "/api/mv/jobs",
    "/api/mv/events",
    "/api/mv/projects",
    "/api/mv/get_video/",
    "/api/mv/get_poster/",
    "/api/mv/usage",
    "/api/mv/generate_video",
    "/api/mv/lipsync",
    "/api/mv/assemble",
    "/api/mv/webhooks/",
)
# A Location header on every success of these (the job's status URL, or the new resource)
LOCATION = {
    ("/api/mv/generate_video", "post"),
    ("/api/mv/lipsync", "post"),
    ("/api/mv/assemble", "post"),
    ("/api/mv/upload_audio", "post"),
    ("/api/mv/projects", "post"),
    (SCENE + "/clips", "post"),
    (PROJECT + "/assemble", "post"),
    (SCENE + "/lipsync", "post"),
}
# Request bodies of project actions: the options of the request model they fill (the rest comes from the project)
ACTION_OPTIONS = {
    (PROJECT + "/character", "post"): ("ProjectCharacterOptions", "image", CHARACTER_OPTIONS),
    (PROJECT + "/clips", "post"): ("ProjectClipOptions", "video", CLIP_OPTIONS),
    (SCENE + "/clips", "post"): ("ProjectClipOptions", "video", CLIP_OPTIONS),
    (SCENE + "/lipsync", "post"): ("SceneLipsyncOptions", "lipsync", SCENE_LIPSYNC_OPTIONS),
}
# Inline success schemas the route table already spells out, made components under these names.
LIFTED = {"Health", "Liveness", "Readiness", "Me", "EventsLink", "ProjectEventsLink", "Audio"}

STATUS_TEXT = {
    400: "invalid request: invalid_json, missing_field, unknown_field, invalid_field, invalid_id or an endpoint's "
    "own code; `field` names the field, header or parameter",
    401: "auth_required (no Authorization header) or invalid_api_key (WWW-Authenticate says which)",
    403: "forbidden_origin: the Origin header names a site that is neither this server nor in MV_CORS_ORIGINS",
    404: "not_found: no such id (or it belongs to another API key); `field` names the id when it was an input",
    408: "request_timeout: the body took too long to arrive",
    409: "conflict, or a provider's conflict (provider_conflict)",
    410: "expired: the job finished longer ago than the server keeps jobs (jobs.retention_hours)",
    412: "precondition_failed: the project changed since the ETag sent in If-Match",
    413: "request_too_large: the body is over MV_MAX_BODY_MB (a song: MV_MAX_AUDIO_MB)",
    416: "range_not_satisfiable: the Range header must be one byte range inside the file (Content-Range: bytes */size)",
    422: "provider_rejected_input: the provider refused the input",
    428: "precondition_required: this change needs If-Match",
    429: "provider_rate_limited: the provider's rate limit (Retry-After when it sent one)",
    500: "internal_error: a server bug (no details are given)",
    502: "provider_*: the provider failed, answered badly or could not be reached (see provider_status, provider_error)",
    503: "store_unavailable: the job or project store (Redis) did not answer, or the server is busy; see Retry-After",
    504: "provider_timeout: the provider did not answer in time",
}
KEYED_TEXT = {
    402: "budget_exceeded: the job's estimated cost would pass the key's monthly_budget (error.budget: month, "
    "limit, spent, remaining, job_estimate, currency); nothing was started",
    403: "forbidden_origin (Origin not allowed), or for a signed link: invalid_signature (tampered, another path "
    "or method, key revoked) or signature_expired",
    429: "rate_limited (the key's token bucket lacks the tokens the request needs, one per job up to the burst: retry "
    "after Retry-After) or, for upload_audio, quota_exceeded (the key's uploads running); for a call to a "
    "provider also provider_rate_limited",
}
HEADERS = {
    "Location": "the new resource, or the started job's status URL",
    "ETag": "the project's version: send it as If-Match to change the project",
    "Retry-After": "seconds to wait before retrying",
    "WWW-Authenticate": 'Bearer realm="mvserver" (with error="invalid_token" for a bad key)',
    "Content-Range": "bytes start-end/size (206), or bytes */size (416)",
    "Idempotent-Replayed": "true when this is the kept answer to an earlier request with the same Idempotency-Key",
}


def complete(document: Document, models: RequestModels, *, keys: bool) -> None:
    """Finish ``document`` in place (see the module's docstring); ``models`` are the app's request models."""
    schemas = document["components"]["schemas"]
    schemas.update(RESPONSE_SCHEMAS)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            key = (path, method)
            operation_id, bodies = OPERATIONS.get(key, (None, {}))
            if operation_id is not None:
                operation["operationId"] = operation_id
            responses = operation["responses"]
            for status in _statuses(path, method, keys):
                responses.setdefault(str(status), _error(status, responses))
            idempotent = any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
            for status, answer in responses.items():
                _describe(answer, int(status), keys, path)
                _content(answer, bodies.get(status), schemas)
                _headers(answer, int(status), key, idempotent)
            if key in ACTION_OPTIONS:
                name, model, names = ACTION_OPTIONS[key]
                schemas[name] = _options_schema(getattr(models, model), names)
                operation["requestBody"]["content"]["application/json"]["schema"] = ref(name)
            if keys:
                operation["security"] = [] if path in PUBLIC else [{"bearerAuth": []}]


def _statuses(path: str, method: str, keys: bool) -> list[int]:
    """What a route of this kind may answer besides its own errors."""
    statuses = [500]
    if method in ("post", "patch") and (path, method) not in BODILESS:
        statuses.append(413)
    if method == "post":
        statuses.append(415)
    if path.startswith(STORE_PREFIXES):
        statuses.append(503)
    if path in FILES:
        statuses += [206, 302, 304, 416]  # 302: with MV_STORAGE_URL, a presigned link of the object
    if keys and path not in HEALTH:
        statuses.append(401)
    return statuses + list(EXTRA_ERRORS.get((path, method), ()))


def _error(status: int, responses: dict[str, Any]) -> dict[str, Any]:
    """The answer of a status the route table did not list: the Error shape, or for a file its part or nothing."""
    if status == 206:
        return {
            "description": "the byte range asked for with a Range header",
            "content": {kind: {} for kind in responses["200"]["content"]},
        }
    if status == 302:
        return {
            "description": "with object storage (MV_STORAGE_URL): a presigned link of the object in Location "
            "(Cache-Control: no-store), after the same checks; the store answers ranges itself"
        }
    if status == 304:
        return {"description": "not modified: the If-None-Match ETag still matches (no body)"}
    return {"description": "error", "content": {"application/json": {"schema": ref("Error")}}}


def _describe(answer: dict[str, Any], status: int, keys: bool, path: str) -> None:
    if keys and status in KEYED_TEXT and path not in PUBLIC:
        answer["description"] = KEYED_TEXT[status]
    elif answer.get("description") in (None, "", "error") and status in STATUS_TEXT:
        answer["description"] = STATUS_TEXT[status]


def _content(answer: dict[str, Any], name: str | None, schemas: dict[str, Any]) -> None:
    """A schema for every media type of the answer: the named component for JSON and event streams, a string for
    text, binary for media files."""
    for media_type, entry in answer.get("content", {}).items():
        if name is not None and ("json" in media_type or media_type == "text/event-stream"):
            if name in LIFTED and entry.get("schema", {}).get("$ref") is None:
                schemas[name] = entry["schema"]
            entry["schema"] = ref(name)
        elif "schema" not in entry:
            plain = media_type.startswith("text/")
            entry["schema"] = {"type": "string"} if plain else {"type": "string", "format": "binary"}


def _headers(answer: dict[str, Any], status: int, key: tuple[str, str], idempotent: bool) -> None:
    """The response headers a client reads; ``required`` only where every such answer has them."""
    path = key[0]
    names: list[tuple[str, bool]] = []
    if 200 <= status < 300:
        if key in LOCATION:
            names.append(("Location", True))
        if path.startswith("/api/mv/projects") and not path.endswith(("/events", "/events/link")):
            names.append(("ETag", True))  # the stream and its link carry the version in their events
        if idempotent:
            names.append(("Idempotent-Replayed", False))
    if status in (409, 429, 503):
        names.append(("Retry-After", False))
    if status == 401:
        names.append(("WWW-Authenticate", path != "/api/mv/webhooks/replicate"))
    if status in (206, 416) and path in FILES:
        names.append(("Content-Range", True))
    if status == 302 and path in FILES:
        names.append(("Location", True))
    for name, required in names:
        answer.setdefault("headers", {})[name] = {
            "description": HEADERS[name],
            "required": required,
            "schema": {"type": "string"},
        }


def _options_schema(model: type[BaseModel], names: frozenset[str]) -> dict[str, Any]:
    """The options a project action takes: those fields of the request model it fills, each optional (the project
    supplies the rest); any other field is 400 unknown_field."""
    full = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: schema for name, schema in full["properties"].items() if name in names},
        "description": f"Optional: {', '.join(name for name in full['properties'] if name in names)}; the "
        "rest comes from the project.",
    }
