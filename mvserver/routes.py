"""The route table: every route of the service, in one place, registered one way.

Handlers stay in their feature packages; this module only says which path and method reach which handler. Routes
are added in this order, which is the order they are matched in. Two methods of one path are listed next to each
other so they share one resource (and one CORS preflight). Every route here has an operation in the OpenAPI
document (:data:`mvserver.openapi.document.OPERATIONS`); tests/test_openapi_document.py checks both ways.
"""

from __future__ import annotations

from aiohttp import web

from mvserver.assembly import routes as assembly
from mvserver.audio import routes as audio
from mvserver.audio import songs
from mvserver.core.config import EnvSettings
from mvserver.images import routes as images
from mvserver.jobs import events as job_events
from mvserver.jobs import routes as jobs
from mvserver.jobs import webhooks_out
from mvserver.lipsync import routes as lipsync
from mvserver.openapi import routes as openapi
from mvserver.projects import events as project_events
from mvserver.projects import routes as projects
from mvserver.providers import replicate_webhooks
from mvserver.scenes import routes as scenes
from mvserver.usage import routes as usage
from mvserver.videos import posters
from mvserver.videos import routes as videos
from mvserver.web import demo, meta
from mvserver.web.metrics import metrics_endpoint

API = "/api/mv"
PROJECT = API + "/projects/{project_id}"
SCENE = PROJECT + "/scenes/{scene_id}"

ROUTES: list[web.RouteDef] = [
    # songs: a saved song's analysis and copies
    web.get(API + "/songs/{audio_id}", songs.get_song),
    # webhooks out: a job's deliveries to the client's backend
    web.get(API + "/jobs/{job_id}/deliveries", webhooks_out.job_deliveries),
    web.post(API + "/jobs/{job_id}/redeliver", webhooks_out.redeliver),
    # webhooks in: Replicate's signed deliveries (no API key)
    web.post(API + "/webhooks/replicate", replicate_webhooks.receive_replicate, name="webhooks.replicate"),
    # health, the OpenAPI document, the caller's key
    web.get(API + "/health", meta.health),
    web.get(API + "/health/live", meta.live),
    web.get(API + "/health/ready", meta.ready),
    web.get(API + "/openapi.json", openapi.openapi),
    web.get(API + "/me", meta.me),
    # scenes, images, videos
    web.post(API + "/create_scenes", scenes.create_scenes),
    web.get(API + "/get_scenes/{scenes_id}.{ext:json|md}", scenes.get_scenes),
    web.post(API + "/generate_character_reference", images.generate_character_reference),
    web.get(API + "/get_image/{image_id}", images.get_image),
    web.post(API + "/generate_video", videos.generate_video),
    # the jobs API, for jobs of every kind
    web.get(API + "/jobs", jobs.list_jobs),
    web.get(API + "/jobs/{job_id}", jobs.job_status),
    web.delete(API + "/jobs/{job_id}", jobs.cancel_job),
    web.post(API + "/jobs/{job_id}/cancel", jobs.cancel_job),
    web.get(API + "/jobs/{job_id}/events", jobs.job_events),
    web.get(API + "/get_video/{video_id}", jobs.get_video),
    web.get(API + "/usage", usage.usage_report),
    web.get(API + "/get_poster/{video_id}", posters.get_poster),
    # lip sync and assembly
    web.post(API + "/lipsync", lipsync.create_lipsync),
    web.post(SCENE + "/lipsync", lipsync.lipsync_scene),
    web.post(API + "/assemble", assembly.assemble),
    web.post(PROJECT + "/assemble", assembly.assemble_project),
    # many jobs' events on one stream
    web.get(API + "/events", job_events.job_events),
    web.get(API + "/events/link", job_events.events_link),
    # songs uploaded
    web.post(API + "/upload_audio", audio.upload_audio),
    web.get(API + "/get_audio/{audio_id}", audio.get_audio),
    # projects
    web.post(API + "/projects", projects.create),
    web.get(PROJECT, projects.get),
    web.patch(PROJECT, projects.patch),
    web.post(PROJECT + "/write_scenes", projects.write),
    web.post(PROJECT + "/character", projects.character),
    web.post(PROJECT + "/clips", projects.generate_missing),
    web.post(SCENE + "/clips", projects.generate_one),
    web.get(PROJECT + "/timeline", projects.timeline),
    web.get(PROJECT + "/events", project_events.project_events),
    web.get(PROJECT + "/events/link", project_events.project_events_link),
    # the demo pages and their static files
    web.get("/", demo.index),
    web.get("/single", demo.single),
    web.get("/static/{name}", demo.static_file),
]


def add_routes(app: web.Application, env: EnvSettings) -> None:
    """Every route of the service; ``GET /metrics`` (first) only with ``MV_METRICS`` on."""
    if env.metrics:
        app.router.add_get("/metrics", metrics_endpoint)
    app.add_routes(ROUTES)
