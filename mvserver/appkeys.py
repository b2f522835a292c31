"""Every ``web.AppKey`` of the service, in one place: what an app carries and what type each value has.

The value types are imported for the type checker only, so this module is a leaf at run time: any module (core,
web, a feature) can import its keys without importing the code that builds the values. The simulator's keys live
with its state, in :mod:`mvserver.sandbox.state`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import jinja2

    from mvserver.assembly.service import AssemblyDeps
    from mvserver.audio.routes import SongSaved, UploadSlots
    from mvserver.audio.songs import SongWork
    from mvserver.core.artefacts import Artefacts, OutputStore
    from mvserver.core.config import Config
    from mvserver.jobs.runner import JobEngine
    from mvserver.jobs.webhooks_out import WebhookSender
    from mvserver.lipsync.service import LipsyncDeps
    from mvserver.openapi.schemas import RequestModels
    from mvserver.projects.service import ProjectDeps
    from mvserver.projects.store import ProjectStore
    from mvserver.providers import Providers
    from mvserver.providers.replicate_webhooks import WebhookReceiver
    from mvserver.scenes.service import SceneDeps
    from mvserver.web.access.auth import KeyRing
    from mvserver.web.access.quotas import Quotas
    from mvserver.web.access.signing import UrlSigner
    from mvserver.web.metrics import Metrics

# -- settings and infrastructure ---------------------------------------------------------------------------------------
CONFIG: web.AppKey[Config] = web.AppKey("config")
TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("templates")
STORE: web.AppKey[OutputStore] = web.AppKey("store")
# Every artefact the service writes or serves (images, scene lists, songs, clips, windows, videos): the one artefact layer.
ARTEFACTS: web.AppKey[Artefacts] = web.AppKey("artefacts")
REQUEST_MODELS: web.AppKey[RequestModels] = web.AppKey("request_models")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")

# -- access: API keys, their quotas, signed links ----------------------------------------------------------------------
KEYRING: web.AppKey[KeyRing] = web.AppKey("keyring")
QUOTAS: web.AppKey[Quotas] = web.AppKey("quotas")
SIGNER: web.AppKey[UrlSigner] = web.AppKey("url_signer")

# -- providers and jobs ------------------------------------------------------------------------------------------------
PROVIDERS: web.AppKey[Providers] = web.AppKey("providers")
WEBHOOK_RECEIVER: web.AppKey[WebhookReceiver] = web.AppKey("webhook_receiver")  # Replicate's webhooks, inbound
JOBS: web.AppKey[JobEngine] = web.AppKey("jobs")
WEBHOOK_SENDER: web.AppKey[WebhookSender] = web.AppKey("webhook_sender")  # the clients' job webhooks, outbound

# -- features ----------------------------------------------------------------------------------------------------------
PROJECTS: web.AppKey[ProjectStore] = web.AppKey("projects")
UPLOAD_SLOTS: web.AppKey[UploadSlots] = web.AppKey("audio_upload_slots")
# Called once a song is saved (its sidecar written): starts its analysis and copies and answers fields for the upload
# answer (``mvserver.audio.songs`` sets it; without it an upload answers the description alone).
SONG_SAVED: web.AppKey[SongSaved] = web.AppKey("song_saved")
SONGS: web.AppKey[SongWork] = web.AppKey("songs")
FFMPEG_SLOTS: web.AppKey[asyncio.Semaphore] = web.AppKey("lipsync_ffmpeg_slots")
# ffmpeg-heavy job runs (assembly runs, lip-sync cuts) at once on this node: media.yaml ffmpeg.concurrency.
HEAVY_FFMPEG_SLOTS: web.AppKey[asyncio.Semaphore] = web.AppKey("heavy_ffmpeg_slots")
# The features' dependency objects, built once by the composition root (:mod:`mvserver.app`) when what they hold
# exists: lip sync's and assembly's before the job engine starts (their job drivers use them), the projects' and
# scenes' with the project store.
SCENE_DEPS: web.AppKey[SceneDeps] = web.AppKey("scene_deps")
PROJECT_DEPS: web.AppKey[ProjectDeps] = web.AppKey("project_deps")
LIPSYNC_DEPS: web.AppKey[LipsyncDeps] = web.AppKey("lipsync_deps")
ASSEMBLY_DEPS: web.AppKey[AssemblyDeps] = web.AppKey("assembly_deps")
