"""Shared fixtures: a provider simulator on 127.0.0.1 and apps whose real SDK clients point at it."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import certifi
import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer
from helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CLAIM_INTERVAL,
    LEASE,
    RENDER_CACHE,
    RENDER_CACHE_OWNED,
    SIM_DEFAULTS,
    SIM_KNOBS,
    AppClient,
    Cluster,
    HookClient,
    LiveApp,
    RedisServer,
    fast_settings,
    free_port,
    provider_env,
    redis_server_or_skip,
    remove_fast_settings,
    require_or_skip,
    set_safety_poll,
    sync_playwright,
)
from object_store import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures: moto's S3 server, a bucket per test)

from mvserver.app import create_app
from mvserver.sandbox.app import Simulator, create_simulator_app

if TYPE_CHECKING:
    from playwright.sync_api import Browser

_CA_BUNDLE = pytest.StashKey[tuple[Path, "str | None"]]()


def pytest_configure(config: pytest.Config) -> None:
    """Every provider in the tests is the simulator on plain-HTTP 127.0.0.1, so the CA bundle that google-genai and
    httpx load for each client they build (seven loads, about 0.3 s of every app's start-up) is never used. Point
    ``SSL_CERT_FILE``, which both honour (and the server processes the tests start inherit), at a bundle of one
    certificate from it: an app starts in milliseconds, and TLS, if a test ever used it, would still be verified."""
    bundle = Path(tempfile.mkdtemp(prefix="mvtest-ca-")) / "one-ca.pem"
    first = re.search(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", Path(certifi.where()).read_text(), re.S
    )
    assert first is not None, "certifi's bundle holds no certificate"
    bundle.write_text(first.group(0))
    config.stash[_CA_BUNDLE] = (bundle, os.environ.get("SSL_CERT_FILE"))
    os.environ["SSL_CERT_FILE"] = str(bundle)


def pytest_unconfigure(config: pytest.Config) -> None:
    remove_fast_settings()
    if RENDER_CACHE_OWNED:  # in the process that made it (the xdist workers inherit the variable)
        shutil.rmtree(RENDER_CACHE, ignore_errors=True)
    bundle, previous = config.stash.get(_CA_BUNDLE, (None, None))
    if bundle is None:
        return
    if previous is None:
        os.environ.pop("SSL_CERT_FILE", None)
    else:
        os.environ["SSL_CERT_FILE"] = previous
    shutil.rmtree(bundle.parent, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``browser`` test needs Chromium and Playwright: skipped without them, failed under CI."""
    if item.get_closest_marker("browser"):
        require_or_skip(f"Chromium at {CHROMIUM} (apt-get install chromium)", CHROMIUM.is_file())
        require_or_skip(
            "the playwright package (pip install playwright)", importlib.util.find_spec("playwright") is not None
        )


@pytest.fixture
def sim(tmp_path: Path) -> Simulator:
    """A fast simulator whose state lives in the test's temporary directory."""
    return Simulator(tmp_path / "simulator", **SIM_DEFAULTS)


@pytest.fixture
async def sim_server(sim: Simulator, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(create_simulator_app(sim))


@pytest.fixture
def settings_dir(tmp_path: Path) -> Path:
    """A copy of the project's settings with fast polling, for tests that run video jobs."""
    return fast_settings(tmp_path / "settings")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One private Redis for the session (or ``MV_TEST_REDIS_URL``); tests keep apart by key prefix."""
    if os.environ.get("MV_TEST_REDIS_URL"):
        yield os.environ["MV_TEST_REDIS_URL"]
        return
    redis_server_or_skip()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules marked ``both_stores`` run every test on the file store and on Redis (one fixture, no copies), but
    for the tests that touch no store (``store_independent``: refused before any store access, settings,
    documents), which run once, on files. Modules marked ``both_backends`` run on the local output directory
    and on object storage (``artefact_backends`` names other backends for a test). A module marked both runs
    the deployments, not their cross product: the file store with the output directory (one machine), Redis with
    each backend (several processes on one disk, or nodes on a bucket): ``[file-local]``, ``[redis-local]``,
    ``[redis-s3]``."""

    definition = metafunc.definition
    kinds = ["file"]
    if definition.get_closest_marker("both_stores") and not (
        definition.get_closest_marker("file_store_only") or definition.get_closest_marker("store_independent")
    ):
        kinds = ["file", "redis"]
    backends = ["local"]
    if definition.get_closest_marker("both_backends"):
        chosen = definition.get_closest_marker("artefact_backends")
        backends = list(chosen.args) if chosen else ["local", "s3"]
        if definition.get_closest_marker("store_independent"):
            backends = backends[:1]
    pairs = deployments(kinds, backends)
    if pairs == [("file", "local")]:
        return  # the fixtures' defaults
    for store, backend, scope in (
        ("job_store_kind", "artefact_backend", "function"),
        ("shared_store_kind", "shared_artefact_backend", "module"),  # the module's shared app (``module_app``)
    ):
        wanted = [name for name in (store, backend) if name in metafunc.fixturenames]
        if len(wanted) == 2:
            ids = [deployment_id(pair, pairs) for pair in pairs]
            metafunc.parametrize((store, backend), pairs, indirect=True, scope=scope, ids=ids)
        elif wanted:
            values = list(dict.fromkeys(pair[0 if wanted[0] == store else 1] for pair in pairs))
            metafunc.parametrize(wanted[0], values, indirect=True, scope=scope)


def deployments(kinds: list[str], backends: list[str]) -> list[tuple[str, str]]:
    """The (job store, artefact backend) pairs a test runs on: with the file store alone, every backend; with Redis
    too, the file store only on the output directory (one machine, one disk) and Redis on every backend."""
    if kinds == ["file"]:
        return [("file", backend) for backend in backends]
    return [("file", "local")] * ("local" in backends) + [("redis", backend) for backend in backends]


def deployment_id(pair: tuple[str, str], pairs: list[tuple[str, str]]) -> str:
    """``file``/``redis`` when only the store varies, the backend when only it does, else ``redis-s3``."""
    if len({kind for kind, _ in pairs}) == 1:
        return pair[1]
    if len({backend for _, backend in pairs}) == 1:
        return pair[0]
    return "-".join(pair)


@pytest.fixture
def job_store_kind(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "file")


@pytest.fixture
def store_env(job_store_kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """The variables that select the job store: none for files; a Redis URL and a prefix of its own for Redis."""
    if job_store_kind == "file":
        return {}
    url = request.getfixturevalue("redis_url")
    return {"MV_REDIS_URL": url, "MV_REDIS_PREFIX": f"mvtest:{uuid.uuid4().hex[:10]}:"}


@pytest.fixture
def artefact_backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "local")


@pytest.fixture
def artefact_env(artefact_backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """The variables that select where artefacts go: none for the output directory; a bucket of the test's own
    (moto's S3 server) and a scratch directory for object storage, served by redirect (``s3``) or through the
    server (``s3-proxy``)."""
    return object_env(artefact_backend, lambda: request.getfixturevalue("s3_env"))


def object_env(backend: str, bucket_env: Callable[[], dict[str, str]]) -> dict[str, str]:
    if backend == "local":
        return {}
    assert backend in ("s3", "s3-proxy"), backend
    return {**bucket_env(), "MV_STORAGE_DELIVERY": "proxy" if backend == "s3-proxy" else "redirect"}


@pytest.fixture
def live_env(
    sim_server: TestServer,
    tmp_path: Path,
    settings_dir: Path,
    store_env: dict[str, str],
    artefact_env: dict[str, str],
) -> dict[str, str]:
    """Environment of an app with every provider 'configured', all pointed at the simulator (and the job store
    under test: files, or Redis in modules marked ``both_stores``; artefacts in ``outputs/``, or also in object
    storage in modules marked ``both_backends``)."""
    return provider_env(sim_server, tmp_path / "outputs", settings_dir, {**store_env, **artefact_env})


@pytest.fixture
def make_client(live_env: dict[str, str], aiohttp_client: Callable[..., Awaitable[TestClient]]) -> AppClient:
    """``await make_client(**env_overrides)``: a test client of a fresh app (None removes a variable)."""

    async def build(**overrides: Any) -> TestClient:
        env = dict(live_env)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return await aiohttp_client(create_app(env))

    return build


@pytest.fixture
async def client(make_client: AppClient) -> TestClient:
    return await make_client()


# -- one app per module ---------------------------------------------------------------------------------------------
# Building an app and its simulator costs a few tenths of a second. Tests that leave nothing another test could
# see (they read, or make jobs of their own and look only at those) share one app per module (and per job store in
# a ``both_stores`` module) through ``module_live``; they run on the module's event loop: ``@module_loop``.


@pytest.fixture(scope="module")
def shared_store_kind(request: pytest.FixtureRequest) -> str:
    """The job store of the module's shared app: in a ``both_stores`` module, each store in turn."""
    return getattr(request, "param", "file")


@pytest.fixture(scope="module")
def shared_artefact_backend(request: pytest.FixtureRequest) -> str:
    """Where the module's shared app keeps artefacts: in a ``both_backends`` module, each backend in turn."""
    return getattr(request, "param", "local")


@pytest.fixture(scope="module")
def shared_artefact_env(
    shared_artefact_backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The variables of a module's shared app for its artefact backend: none locally; a bucket of the module's own
    and a scratch directory on object storage (the bucket dropped after the module)."""
    if shared_artefact_backend == "local":
        yield {}
        return
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    scratch = tmp_path_factory.mktemp("scratch")
    try:
        yield object_env(shared_artefact_backend, lambda: {**server.bucket_env(bucket), "MV_SCRATCH_DIR": str(scratch)})
    finally:
        server.drop_bucket(bucket)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_app(
    shared_store_kind: str,
    shared_artefact_env: dict[str, str],
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LiveApp]:
    """A client of an app like :func:`client`'s, and its simulator, built once for the module."""
    root = tmp_path_factory.mktemp("module_app")
    store_env: dict[str, str] = {**shared_artefact_env}
    if shared_store_kind == "redis":
        store_env.update(
            {
                "MV_REDIS_URL": request.getfixturevalue("redis_url"),
                "MV_REDIS_PREFIX": f"mvtest:{uuid.uuid4().hex[:10]}:",
            }
        )
    sim = Simulator(root / "simulator", **SIM_DEFAULTS)
    async with TestServer(create_simulator_app(sim)) as sim_server:
        env = provider_env(sim_server, root / "outputs", fast_settings(root / "settings"), store_env)
        async with TestClient(TestServer(create_app(env))) as client:
            yield client, sim


@pytest.fixture
def module_live(module_app: LiveApp) -> LiveApp:
    """The module's app and its simulator, the simulator's knobs back to the defaults: no pending faults, no
    recorded requests, the default latencies."""
    client, sim = module_app
    sim.faults.clear()
    sim.requests.clear()
    sim.prompts.clear()
    sim.inline_parts.clear()
    sim.webhook_deliveries.clear()
    for name, value in {**SIM_KNOBS, **SIM_DEFAULTS}.items():
        setattr(sim, name, value)
    return client, sim


# -- shared by several modules: webhooks, browsers, clusters ---------------------------------------------------------


@pytest.fixture
def hook_client(live_env: dict[str, str], settings_dir: Path, aiohttp_client: Any) -> HookClient:
    """``await hook_client(safety=..., **env)``: an app with webhooks on, its public base URL its own address."""

    async def build(safety: float = 30.0, **overrides: str) -> TestClient:
        set_safety_poll(settings_dir, safety)
        port = free_port()
        env = {**live_env, "MV_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", **overrides}
        return await aiohttp_client(create_app(env), server_kwargs={"port": port})

    return build


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Chromium for one test: the sync API's event loop must not outlive it, or the async tests cannot run."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def cluster_settings(settings_dir: Path) -> Path:
    videos = yaml.safe_load((settings_dir / "videos.yaml").read_text())
    videos["jobs"].update(poll_interval_seconds=0.1, lease_seconds=LEASE, claim_interval_seconds=CLAIM_INTERVAL)
    (settings_dir / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
    return settings_dir


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test, empty at the start, which the test may stop and start again (the
    session's ``redis_url`` is shared); fails under CI=true if redis-server is missing."""
    redis_server_or_skip()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis per test, with an append-only file so a restart keeps the data."""
    redis_server_or_skip()
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def cluster(
    tmp_path: Path, redis_server: RedisServer, cluster_settings: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """The simulator takes ``VIDEO_SECONDS`` per video, or what a ``video_seconds`` marker says."""
    running = Cluster(tmp_path, redis_server, cluster_settings)
    marker = request.node.get_closest_marker("video_seconds")
    if marker is not None:
        running.video_seconds = marker.args[0]
    running.start_simulator()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session
