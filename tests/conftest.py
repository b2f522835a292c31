"""Shared fixtures: a provider simulator on 127.0.0.1 and apps whose real SDK clients point at it."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestClient, TestServer

from mvserver.app import create_app
from mvserver.sandbox.app import Simulator, create_simulator_app

PROJECT = Path(__file__).resolve().parent.parent
# The browser tests' Chromium; `.ci/run` reads this same constant (`python -c 'from conftest import CHROMIUM'`).
CHROMIUM = Path("/usr/bin/chromium")


def in_ci() -> bool:
    """``CI=true`` (or 1/yes/on): a test that cannot run there is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def require_or_skip(what: str, available: bool) -> None:
    """Skip the calling test when ``what`` is unavailable; under CI fail it instead, so CI cannot pass by skipping.

    Call it at the start of a test or fixture (e.g. ``require_or_skip(f"{CHROMIUM}", CHROMIUM.is_file())``).
    """
    if available:
        return
    if in_ci():
        pytest.fail(f"{what} is required when CI=true", pytrace=False)
    pytest.skip(f"{what} is missing")


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


TEST_REPLICATE_TOKEN = "r8_test"  # the apps' REPLICATE_API_TOKEN; the simulators answer it (and give it the secret)
SIM_DEFAULTS = {"video_latency": 0.2, "image_latency": 0.2, "scenes_latency": 0.0, "api_token": TEST_REPLICATE_TOKEN}
# The simulator's own defaults of the other knobs tests change.
SIM_KNOBS = {
    f.name: f.default
    for f in dataclasses.fields(Simulator)
    if f.name in ("render_cache", "output_pad_bytes", "webhook_retry_seconds")
}


@pytest.fixture
def sim(tmp_path: Path) -> Simulator:
    """A fast simulator whose state lives in the test's temporary directory."""
    return Simulator(tmp_path / "simulator", **SIM_DEFAULTS)


@pytest.fixture
async def sim_server(sim: Simulator, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(create_simulator_app(sim))


FAST_JOBS = {
    "poll_interval_seconds": 0.05,
    "retry_initial_delay_seconds": 0.05,
    "retry_max_delay_seconds": 0.2,
    "sse_ping_interval_seconds": 0.2,
}


@pytest.fixture
def settings_dir(tmp_path: Path) -> Path:
    """A copy of the project's settings with fast polling, for tests that run video jobs."""
    return fast_settings(tmp_path / "settings")


def fast_settings(target: Path) -> Path:
    """Copy the project's settings to ``target`` with fast polling (see :func:`settings_dir`)."""
    shutil.copytree(PROJECT / "settings", target)
    videos = yaml.safe_load((target / "videos.yaml").read_text())
    videos["jobs"].update(FAST_JOBS)
    (target / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
    images = yaml.safe_load((target / "images.yaml").read_text())
    images["poll_interval_seconds"] = 0.05
    (target / "images.yaml").write_text(yaml.safe_dump(images, sort_keys=False))
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 (persistence off unless asked); ``restart()`` keeps its port."""

    def __init__(self, workdir: Path, *, persistent: bool = False):
        self.workdir = workdir
        self.port = free_port()
        self.persistent = persistent
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "yes",
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "redis-server exited at start-up"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: a persistent server writes its data before it exits
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_server_or_skip() -> None:
    """Redis tests need Debian's redis-server; without it they skip, except on CI (CI=true), where they fail."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


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
    """Modules marked ``both_stores`` run every test on the file store and on Redis (one fixture, no copies)."""
    if not metafunc.definition.get_closest_marker("both_stores"):
        return
    kinds = ["file"] if metafunc.definition.get_closest_marker("file_store_only") else ["file", "redis"]
    if "job_store_kind" in metafunc.fixturenames:
        metafunc.parametrize("job_store_kind", kinds, indirect=True)
    if "shared_store_kind" in metafunc.fixturenames:  # the store of the module's shared app (``module_app``)
        metafunc.parametrize("shared_store_kind", kinds, indirect=True, scope="module")


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
def live_env(sim_server: TestServer, tmp_path: Path, settings_dir: Path, store_env: dict[str, str]) -> dict[str, str]:
    """Environment of an app with every provider 'configured', all pointed at the simulator (and the job store
    under test: files, or Redis in modules marked ``both_stores``)."""
    return provider_env(sim_server, tmp_path / "outputs", settings_dir, store_env)


def provider_env(
    sim_server: TestServer, output_dir: Path, settings_dir: Path, store_env: dict[str, str]
) -> dict[str, str]:
    """The environment of :func:`live_env` for a given simulator, output directory, settings and job store."""
    base = str(sim_server.make_url("")).rstrip("/")
    return {
        **store_env,
        "GEMINI_API_KEY": "test-gemini-key",
        "REPLICATE_API_TOKEN": TEST_REPLICATE_TOKEN,
        "GOOGLE_VERTEX_API_KEY": "test-vertex-key",
        "MV_GEMINI_BASE_URL": f"{base}/gemini",
        "MV_VERTEX_BASE_URL": f"{base}/vertex",
        "MV_REPLICATE_BASE_URL": f"{base}/replicate",
        "MV_OUTPUT_DIR": str(output_dir),
        "MV_SETTINGS_DIR": str(settings_dir),
        # No song analysis (a worker process costs ~3 s of CPU to start); the tests of it turn it on.
        "MV_ANALYSIS_WORKERS": "0",
    }


AppClient = Callable[..., Awaitable[TestClient]]


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

module_loop = pytest.mark.asyncio(loop_scope="module")
LiveApp = tuple[TestClient, Simulator]


@pytest.fixture(scope="module")
def shared_store_kind(request: pytest.FixtureRequest) -> str:
    """The job store of the module's shared app: in a ``both_stores`` module, each store in turn."""
    return getattr(request, "param", "file")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_app(
    shared_store_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveApp]:
    """A client of an app like :func:`client`'s, and its simulator, built once for the module."""
    root = tmp_path_factory.mktemp("module_app")
    store_env: dict[str, str] = {}
    if shared_store_kind == "redis":
        store_env = {
            "MV_REDIS_URL": request.getfixturevalue("redis_url"),
            "MV_REDIS_PREFIX": f"mvtest:{uuid.uuid4().hex[:10]}:",
        }
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


async def read_sse(response: Any, *, comments: bool = False) -> AsyncIterator[dict[str, Any]]:
    """Parse a text/event-stream body into ``{"id", "event", "data", "retry"}`` dicts (data JSON-decoded).

    With ``comments=True`` each comment line (``: ping``) is yielded too, as ``{"comment": "ping"}``, in stream order.
    """
    event: dict[str, Any] = {}
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                event["data"] = json.loads("\n".join(data))
                yield event
            event, data = {}, []
        elif line.startswith(":"):
            if comments:
                yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                event[name] = value


async def two_key_client(make_client: AppClient, tmp_path: Path) -> tuple[TestClient, str, str]:
    """An app with API keys on and two keys, alice's and bob's, whose job quotas no test here reaches."""
    from mvserver.web.access.auth import KeyLimits, create_key

    keys_file = tmp_path / "keys.yaml"
    limits = KeyLimits(jobs_per_minute=600, jobs_burst=50)
    _, alice = create_key(keys_file, "alice", limits)
    _, bob = create_key(keys_file, "bob", limits)
    client = await make_client(
        MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET="test-signing-secret-0123456789abcdefghij"
    )
    return client, alice, bob


async def settled(client: TestClient, job_id: str, *, timeout: float = 20) -> Any:
    """The job once it is final and its task has let go: the budget and the duration estimate are settled after
    the final event, by the job's own task."""
    from mvserver.appkeys import JOBS

    engine = client.app[JOBS]
    async with asyncio.timeout(timeout):
        while not (job := await engine.get(job_id)).final:
            await engine.next_event(job_id, job.last_event_id)
        task = engine.tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task})
    return job


def probe_media(path: Path) -> dict[str, Any]:
    """A media file described for assertions, by ``ffmpeg -i`` read with media's own parser: its duration, the first
    video stream's codec, size, pixel format and frame rate (None for an audio file) and the first audio codec.
    Raises :class:`mvserver.media.errors.MediaError` for a file ffmpeg cannot read."""
    from mvserver.media.probe import parse_probe
    from mvserver.media.run import ffmpeg_exe

    done = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    info = parse_probe(done.stderr.decode(errors="replace"))
    video, audio = info.first_video, info.first_audio
    return {
        "duration": info.duration,
        "video_codec": video.codec if video else None,
        "width": video.width if video else None,
        "height": video.height if video else None,
        "pix_fmt": video.pix_fmt if video else None,
        "fps": video.fps if video else None,
        "audio_codec": audio.codec if audio else None,
    }
