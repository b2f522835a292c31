"""The app factory: settings, output store, provider clients (live or sandboxed), job manager and routes."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web
from yarl import URL

from mvserver.appkeys import (
    ARTEFACTS,
    ASSEMBLY_DEPS,
    CONFIG,
    FFMPEG_SLOTS,
    HEAVY_FFMPEG_SLOTS,
    JOBS,
    KEYRING,
    LIPSYNC_DEPS,
    METRICS,
    PROJECT_DEPS,
    PROJECTS,
    PROVIDERS,
    REQUEST_MODELS,
    SCENE_DEPS,
    SONG_SAVED,
    SONGS,
    STORE,
    TEMPLATES,
    UPLOAD_SLOTS,
)
from mvserver.assembly.service import KIND as ASSEMBLY
from mvserver.assembly.service import AssemblyDeps, AssemblyDriver
from mvserver.audio import songs
from mvserver.audio.routes import UploadSlots
from mvserver.audio.service import saved_audio
from mvserver.core.artefacts import LocalArtefacts, OutputStore, node_context, start_node
from mvserver.core.config import Config, ConfigError, EnvSettings, load_config, package_templates
from mvserver.core.debug import debug_print
from mvserver.core.errors import hide_paths_under, server_log
from mvserver.core.object_artefacts import object_artefacts, object_storage_context
from mvserver.images.service import generate_reference
from mvserver.jobs import FileJobStore, Job, JobEngine, JobStore, video_kind, webhooks_out
from mvserver.jobs.census import JobCensus
from mvserver.jobs.retention import sweep_forever
from mvserver.lipsync.service import KIND as LIPSYNC
from mvserver.lipsync.service import LipsyncDeps, LipsyncDriver
from mvserver.openapi.schemas import RequestModels
from mvserver.projects import song as project_song
from mvserver.projects.service import ProjectDeps
from mvserver.projects.store import open_project_store
from mvserver.providers import Providers
from mvserver.providers import gemini as gemini_backend
from mvserver.providers import replicate as replicate_backend
from mvserver.providers import replicate_webhooks as webhooks
from mvserver.providers.outputs import DEFAULT_REPLICATE_OUTPUT_HOSTS, OutputHosts, url_origin
from mvserver.routes import add_routes
from mvserver.sandbox.app import Simulator, start_simulator
from mvserver.scenes.service import SceneDeps, write_scenes
from mvserver.videos import posters
from mvserver.videos.service import submit_video_job
from mvserver.web import middlewares as access
from mvserver.web.access.quotas import running_cap_of
from mvserver.web.metrics import Metrics
from mvserver.web.security import security_middleware

log = logging.getLogger("mvserver")
SANDBOX_TOKEN = "sandbox"


def sandboxed_services(env: EnvSettings) -> frozenset[str]:
    """Provider services without credentials (or all, with ``MV_SANDBOX=true``) are answered by the simulator."""
    missing = {
        "gemini_scenes": not env.gemini_api_key,
        "replicate": not env.replicate_api_token,
        "gemini_video": not env.gemini_video_configured,
    }
    return frozenset(name for name, absent in missing.items() if env.sandbox or absent)


def replicate_output_hosts(env: EnvSettings, replicate_url: str | None, sandboxed: bool) -> OutputHosts:
    """Where Replicate outputs may be fetched from: in sandbox mode only the built-in simulator; live, the hosts of
    ``MV_REPLICATE_OUTPUT_HOSTS`` (default: Replicate's delivery hosts) and the origin of ``MV_REPLICATE_BASE_URL``
    (an external simulator or proxy the deployer chose, which serves its own files)."""
    base = url_origin(URL(replicate_url)) if replicate_url else None
    if sandboxed:
        return OutputHosts((base,) if base else ())
    hosts = env.replicate_output_hosts or DEFAULT_REPLICATE_OUTPUT_HOSTS
    return OutputHosts(hosts + ((base,) if base else ()))


async def providers_context(app: web.Application) -> AsyncIterator[None]:
    """Build the provider clients; start the built-in simulator for the services that run sandboxed."""
    config, store = app[CONFIG], app[STORE]
    env = config.env
    sandboxed = sandboxed_services(env)
    runner = None
    urls = {"gemini": env.gemini_base_url, "vertex": env.vertex_base_url, "replicate": env.replicate_base_url}
    # The built-in simulator answers its Replicate routes, and gives its webhook secret, only to this process.
    replicate_token = secrets.token_urlsafe(24) if "replicate" in sandboxed else env.replicate_api_token or ""
    if sandboxed:
        simulator = Simulator(
            store.root / "sandbox",
            api_token=replicate_token,
            video_latency=config.sandbox_video_latency,
            image_latency=config.sandbox.image_latency_seconds,
            scenes_latency=config.sandbox.scenes_latency_seconds,
            max_concurrent_renders=config.sandbox.max_concurrent_renders,
        )
        runner, sim_url = await start_simulator(simulator)
        for service, key in (("gemini_scenes", "gemini"), ("gemini_video", "vertex"), ("replicate", "replicate")):
            if service in sandboxed:
                urls[key] = f"{sim_url}/{key}"
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60))
    videos = config.videos
    gemini = gemini_backend.GeminiProvider(
        gemini_backend.make_api_client(
            SANDBOX_TOKEN if "gemini_scenes" in sandboxed else env.gemini_api_key, urls["gemini"]
        ),
        gemini_backend.make_vertex_client(
            api_key=SANDBOX_TOKEN if "gemini_video" in sandboxed else env.vertex_api_key,
            project=env.google_cloud_project,
            location=env.google_cloud_location,
            base_url=urls["vertex"],
            timeout=videos.jobs.request_timeout_seconds,
        ),
        app[ARTEFACTS],
        video_model=videos.backends.gemini.model,
        person_generation=videos.backends.gemini.person_generation,
        resolution=videos.backends.gemini.resolution,
        sandbox="gemini_scenes" in sandboxed,
        video_sandbox="gemini_video" in sandboxed,
        video_max_bytes=videos.limits.output_max_bytes,
    )
    replicate = replicate_backend.ReplicateProvider(
        replicate_backend.make_client(replicate_token, urls["replicate"], videos.jobs.request_timeout_seconds),
        session,
        app[ARTEFACTS],
        video_model=videos.backends.replicate.model,
        request_timeout=videos.jobs.request_timeout_seconds,
        sandbox="replicate" in sandboxed,
        output_hosts=replicate_output_hosts(env, urls["replicate"], "replicate" in sandboxed),
        video_max_bytes=videos.limits.output_max_bytes,
        image_max_bytes=config.images.limits.output_max_bytes,
    )
    if METRICS in app:
        gemini.observe = replicate.observe = app[METRICS].observe_provider_call
    app[PROVIDERS] = Providers(gemini=gemini, replicate=replicate, sandboxed=sandboxed)
    modes = app[PROVIDERS].modes()
    log.info("providers: %s", ", ".join(f"{name}={mode}" for name, mode in modes.items()))
    if sandboxed:
        log.info(
            "sandbox mode: %s answered by the built-in simulator; outputs are labelled sandbox",
            ", ".join(sorted(sandboxed)),
        )
    try:
        yield
    finally:
        await gemini.aclose()
        await replicate.aclose()
        await session.close()
        if runner is not None:
            await runner.cleanup()


def job_store(app: web.Application) -> JobStore:
    """The configured job store: Redis when ``MV_REDIS_URL`` is set (several processes), else files under
    ``MV_OUTPUT_DIR`` (the embedded default)."""
    config = app[CONFIG]
    if config.env.redis_url:
        from mvserver.jobs.redis_store import RedisJobStore  # redis is imported only when it is used

        jobs = config.videos.jobs
        return RedisJobStore(
            config.env.redis_url,
            prefix=config.env.redis_prefix,
            lease_seconds=jobs.lease_seconds,
            claim_interval_seconds=jobs.claim_interval_seconds,
        )
    return FileJobStore(app[STORE])


async def jobs_context(app: web.Application) -> AsyncIterator[None]:
    """Start the job engine: unfinished jobs resume; at exit their tasks stop (they resume at the next start)."""
    config = app[CONFIG]
    kinds = {
        "video": video_kind(app[PROVIDERS], app[ARTEFACTS]),
        LIPSYNC: lambda job: LipsyncDriver(app[LIPSYNC_DEPS]),
        ASSEMBLY: lambda job: AssemblyDriver(app[ASSEMBLY_DEPS]),
    }
    engine = JobEngine(
        job_store(app), kinds, app[ARTEFACTS], config.videos.jobs, max_concurrent=config.max_concurrent_jobs
    )
    app[JOBS] = engine
    # Before the engine starts: a job it resumes may be a lip sync or an assembly, whose driver uses these.
    app[LIPSYNC_DEPS] = lipsync_deps(app)
    app[ASSEMBLY_DEPS] = assembly_deps(app)
    engine.running_cap = running_cap_of(app)  # a key's jobs beyond its max_running_jobs wait queued (keys on)
    engine.hooks.stored = posters.stored_hook(app)  # every stored clip: its poster, length and size
    engine.pricing = config.pricing
    engine.budget_of = monthly_budget(app)
    if METRICS in app:
        metrics = app[METRICS]
        engine.hooks.finished = lambda job: finished_metrics(metrics, job)
        engine.hooks.subscribers = metrics.sse_subscribers.inc
        metrics.census = JobCensus(engine).take  # mv_jobs and mv_job_queue_depth, counted at each scrape
    resumed = await engine.start()
    if resumed:
        log.info("resuming %d unfinished job(s)", resumed)
    sweeper = None
    retention = config.videos.jobs.retention_hours * 3600
    if retention > 0:
        sweeper = asyncio.get_running_loop().create_task(
            sweep_forever(engine.store, app[ARTEFACTS], retention, app[STORE]), name="retention-sweeper"
        )
    try:
        yield
    finally:
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        await engine.close()


def finished_metrics(metrics: Metrics, job: Job) -> None:
    """A job this process finished: its final status, and its estimated cost by model (``usage.cost``)."""
    metrics.jobs_finished.labels(job.status, job.kind, job.backend).inc()
    cost = (job.usage or {}).get("cost")
    if cost:
        metrics.job_cost.labels(job.model, cost["basis"]).inc(cost["amount_micros"])


def monthly_budget(app: web.Application) -> Callable[[str], float | None]:
    """A key's monthly spending limit from the keys file (re-read as it changes); none with keys off."""
    keyring = app.get(KEYRING)

    def limit(owner: str) -> float | None:
        record = keyring.get(owner) if keyring is not None else None
        return record.limits.monthly_budget if record is not None else None

    return limit


async def projects_context(app: web.Application) -> AsyncIterator[None]:
    """The project store: Redis when ``MV_REDIS_URL`` is set, else files under ``outputs/projects``."""
    app[PROJECTS] = open_project_store(app[STORE], app[CONFIG].env.redis_url, app[CONFIG].env.redis_prefix)
    app[SCENE_DEPS] = scene_deps(app)
    app[PROJECT_DEPS] = project_deps(app)  # needs the job engine and the providers, started before
    try:
        yield
    finally:
        await app[PROJECTS].close()


# -- the features' dependencies, built once at start-up (stored under their app keys) --------------------------------


def scene_deps(app: web.Application) -> SceneDeps:
    """The scene writer's dependencies (needs the providers)."""
    return SceneDeps(app[CONFIG], app[PROVIDERS], app[ARTEFACTS], app[TEMPLATES])


def project_deps(app: web.Application) -> ProjectDeps:
    """The project service's dependencies (needs the project store, the job engine and the scene deps); lip sync's
    and assembly's project routes use them too."""
    return ProjectDeps(
        config=app[CONFIG],
        projects=app[PROJECTS],
        jobs=app[JOBS],
        artefacts=app[ARTEFACTS],
        models=app[REQUEST_MODELS],
        submit_video=functools.partial(submit_video_job, app),
        write_scenes=functools.partial(write_scenes, app[SCENE_DEPS]),
        load_analysis=functools.partial(project_song.load_analysis, app),
        song_brief=functools.partial(project_song.song_brief, app),
        generate_reference=functools.partial(generate_reference, app),
    )


def lipsync_deps(app: web.Application) -> LipsyncDeps:
    """Lip sync's dependencies (needs the job engine and the providers)."""
    return LipsyncDeps(
        config=app[CONFIG],
        jobs=app[JOBS],
        artefacts=app[ARTEFACTS],
        providers=app[PROVIDERS],
        probe_slots=app[FFMPEG_SLOTS],
        heavy_slots=app[HEAVY_FFMPEG_SLOTS],
        saved_audio=functools.partial(saved_audio, app),
    )


def assembly_deps(app: web.Application) -> AssemblyDeps:
    """Assembly's dependencies (needs the job engine and the songs' work)."""
    return AssemblyDeps(
        config=app[CONFIG],
        jobs=app[JOBS],
        outputs=app[STORE],
        artefacts=app[ARTEFACTS],
        songs=app[SONGS],
        probe_slots=app[FFMPEG_SLOTS],
        heavy_slots=app[HEAVY_FFMPEG_SLOTS],
        saved_audio=functools.partial(saved_audio, app),
    )


async def end_streams(app: web.Application) -> None:
    """At shutdown, before open requests are waited for: end every event stream so the server stops at once."""
    if JOBS in app:
        app[JOBS].begin_shutdown()


def create_app(env: EnvSettings | Mapping[str, str] | None = None) -> web.Application:
    """Build the application; settings are loaded and validated here, once (ConfigError if they are wrong)."""
    environ = os.environ if env is None or isinstance(env, EnvSettings) else env  # each cloud's own variables
    if not isinstance(env, EnvSettings):
        env = EnvSettings.from_env(env)
    config: Config = load_config(env)
    debug_print(config.debug, "config params loaded at start-up", config.summary())
    try:
        store = OutputStore(env.output_dir, env.stale_temp_seconds)
    except OSError as exc:
        raise ConfigError(
            f"environment: MV_OUTPUT_DIR={str(env.output_dir)!r}: cannot create the output "
            f"directories: {exc.strerror or exc}"
        ) from None
    hide_paths_under(env.output_dir, env.settings_dir)  # error texts name files, never where they are
    app = web.Application(client_max_size=env.max_body_bytes, handler_args={"logger": server_log()})
    access.setup(app, env, guard=security_middleware(env))
    app[CONFIG] = config
    app[TEMPLATES] = package_templates()
    app[STORE] = store
    app[ARTEFACTS] = object_artefacts(env, environ) if env.storage_url else LocalArtefacts(store)
    app[REQUEST_MODELS] = RequestModels.build(config)
    start_node(store)  # only what dead nodes left: other nodes may be writing in a shared MV_OUTPUT_DIR
    app.cleanup_ctx.append(node_context)
    app.cleanup_ctx.append(object_storage_context)  # staging sweep; this node's scratch let go at exit
    app.cleanup_ctx.append(providers_context)
    app.cleanup_ctx.append(songs.songs_context)  # before the jobs: an assembly job reads a song's copy until they stop
    app[SONG_SAVED] = songs.on_song_saved
    app.cleanup_ctx.append(jobs_context)
    app.cleanup_ctx.append(webhooks_out.sender_context)  # its sender plugs into the job engine started just above
    app.cleanup_ctx.append(projects_context)
    app.on_shutdown.append(end_streams)
    webhooks.setup(app, env, "replicate" in sandboxed_services(env))
    # per-node bounds: lip-sync probes, ffmpeg-heavy job runs (assembly, lip-sync cuts), uploads at once
    app[FFMPEG_SLOTS] = asyncio.Semaphore(config.lipsync.limits.ffmpeg_concurrency)
    app[HEAVY_FFMPEG_SLOTS] = asyncio.Semaphore(config.media.ffmpeg.concurrency)
    app[UPLOAD_SLOTS] = UploadSlots(env.max_concurrent_uploads)
    add_routes(app, env)
    access.setup_cors(app, env)  # last: it covers every route added above
    return app
