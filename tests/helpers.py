"""Plain helpers shared by the test modules: constants, app and simulator environments, job helpers, songs and
clips, server processes, clusters and browsers. Fixtures live in conftest.py; this module imports nothing from it
or from a test module, so any of them can import it."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import imageio_ffmpeg
import obstore
import pytest
import yaml
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from standardwebhooks import Webhook, WebhookVerificationError

from mvserver.appkeys import ARTEFACTS, JOBS
from mvserver.audio import routes as audio
from mvserver.core.artefacts import LocalArtefacts, OutputStore, artefact_key, new_id, write_bytes_atomic
from mvserver.core.objects import STAGING
from mvserver.core.scratch import OUTPUT_PREFIX
from mvserver.core.scratch import TEMP_SUFFIX as SCRATCH_TEMP_SUFFIX
from mvserver.media.probe import parse_probe
from mvserver.media.run import ffmpeg_exe
from mvserver.sandbox.state import Simulator
from mvserver.sandbox.webhooks import sign
from mvserver.web.access.auth import KeyLimits, create_key

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None


# -- the test environment: simulator, settings, apps, Redis, SSE ------------------------------------------------------

PROJECT = Path(__file__).resolve().parent.parent


# The browser tests' Chromium; `.ci/run` reads this same constant (`python -c 'from helpers import CHROMIUM'`).
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


TEST_REPLICATE_TOKEN = "r8_test"  # the apps' REPLICATE_API_TOKEN; the simulators answer it (and give it the secret)


# One directory of rendered clips for the whole test run: every simulator (in this process, in the pytest-xdist
# workers, which inherit the variable from the process that starts them, and in the cluster tests' simulator
# processes) renders a clip of one prompt, duration and options once. The process that made it removes it at the end
# (conftest); a directory named by the variable beforehand is kept.
RENDER_CACHE_VARIABLE = "MVTEST_RENDER_CACHE"
RENDER_CACHE_OWNED = not os.environ.get(RENDER_CACHE_VARIABLE)
if RENDER_CACHE_OWNED:
    os.environ[RENDER_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="mvtest-renders-")
RENDER_CACHE = Path(os.environ[RENDER_CACHE_VARIABLE])
SIM_DEFAULTS = {
    "video_latency": 0.2,
    "image_latency": 0.2,
    "scenes_latency": 0.0,
    "api_token": TEST_REPLICATE_TOKEN,
    "render_cache": True,
    "render_cache_dir": RENDER_CACHE,
}

# The simulator's own defaults of the other knobs tests change.
SIM_KNOBS = {
    f.name: f.default
    for f in dataclasses.fields(Simulator)
    if f.name in ("render_cache", "output_pad_bytes", "webhook_retry_seconds")
}


FAST_JOBS = {
    "poll_interval_seconds": 0.05,
    "retry_initial_delay_seconds": 0.05,
    "retry_max_delay_seconds": 0.2,
    "sse_ping_interval_seconds": 0.2,
}


_FAST_SETTINGS: list[Path] = []  # this process's fast settings, written once (see fast_settings)


def remove_fast_settings() -> None:
    """Remove this process's fast settings template (conftest, at the end of each pytest process: xdist workers
    may end without running ``atexit`` handlers)."""
    while _FAST_SETTINGS:
        shutil.rmtree(_FAST_SETTINGS.pop().parent, ignore_errors=True)


def fast_settings(target: Path) -> Path:
    """Copy the project's settings to ``target`` with fast polling (see :func:`settings_dir`). The YAML is read and
    rewritten once per process, then copied: parsing and dumping it for every test cost tens of milliseconds each
    (far more on a loaded machine), copying eight small files costs about two."""
    if not _FAST_SETTINGS:
        template = Path(tempfile.mkdtemp(prefix="mvtest-settings-")) / "settings"
        shutil.copytree(PROJECT / "settings", template)
        videos = yaml.safe_load((template / "videos.yaml").read_text())
        videos["jobs"].update(FAST_JOBS)
        (template / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
        images = yaml.safe_load((template / "images.yaml").read_text())
        images["poll_interval_seconds"] = 0.05
        (template / "images.yaml").write_text(yaml.safe_dump(images, sort_keys=False))
        _FAST_SETTINGS.append(template)
    shutil.copytree(_FAST_SETTINGS[0], target)
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


module_loop = pytest.mark.asyncio(loop_scope="module")


LiveApp = tuple[TestClient, Simulator]


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
    engine = client.app[JOBS]
    async with asyncio.timeout(timeout):
        while not (job := await engine.get(job_id)).final:
            await engine.next_event(job_id, job.last_event_id)
        task = engine.tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task})
    return job


# -- artefacts, wherever the app keeps them ----------------------------------------------------------------------------
# A test reads what the app stored through the app's own artefact layer (``ARTEFACTS``): the same test body works on
# the output directory and on object storage (``both_backends``). Tests of the directory itself read the disk.

AppLike = TestClient | web.Application


def artefacts_of(app: AppLike) -> Any:
    """The app's :class:`~mvserver.core.artefacts.Artefacts` (of a test client's app, or of an app)."""
    return (app.app if isinstance(app, TestClient) else app)[ARTEFACTS]


async def artefact(app: AppLike, key: str) -> bytes:
    """The bytes of the artefact ``key`` (``videos/<id>.mp4``); FileNotFoundError when it is not stored."""
    return await artefacts_of(app).get_bytes(key)


async def artefact_json(app: AppLike, key: str) -> Any:
    return json.loads(await artefact(app, key))


async def has_artefact(app: AppLike, key: str) -> bool:
    return await artefacts_of(app).stat(key) is not None


async def artefact_keys(app: AppLike, kind: str) -> list[str]:
    """Every stored artefact of ``kind`` (``videos``), sorted; temporaries and staging objects are not artefacts."""
    return sorted(await artefacts_of(app).list_old(kind, float("inf")))


async def leftovers(app: AppLike, kind: str) -> list[str]:
    """What unfinished writes of ``kind`` left behind: a temporary next to the artefacts in the output directory;
    on object storage an output or download in the scratch directory, or a staging object in the bucket."""
    store = artefacts_of(app)
    if isinstance(store, LocalArtefacts):
        return sorted(path.name for path in (store.outputs.root / kind).glob(".*"))
    root = store.scratch_dir.root
    names = [path.name for pattern in (f"{OUTPUT_PREFIX}*", f"*{SCRATCH_TEMP_SUFFIX}") for path in root.glob(pattern)]
    async for batch in obstore.list(store.storage.store, prefix=STAGING, chunk_size=500):
        names += [meta["path"] for meta in batch]  # a long stream's staging object, never copied into place
    return sorted(names)


async def stored_names(app: AppLike, kind: str) -> list[str]:
    """The names of the stored artefacts of ``kind`` and of every unfinished write left behind (:func:`leftovers`)."""
    names = [key.partition("/")[2] for key in await artefact_keys(app, kind)]
    return sorted(names + await leftovers(app, kind))


def ffmpeg_folder(app: AppLike, kind: str) -> Path:
    """Where the app's ffmpeg writes an artefact of ``kind`` before it is stored: next to it in the output
    directory, or in an object store's scratch directory."""
    store = artefacts_of(app)
    return store.outputs.root / kind if isinstance(store, LocalArtefacts) else store.scratch_dir.root


@contextlib.asynccontextmanager
async def artefact_file(app: AppLike, key: str) -> AsyncIterator[Path]:
    """A local file holding the artefact for the block (to probe it with ffmpeg): the stored file itself, or a
    scratch copy of the object."""
    async with artefacts_of(app).local_file(key) as path:
        yield path


# -- video jobs over HTTP ---------------------------------------------------------------------------------------------

PROMPT = "A tabby cat DJ in neon headphones spins records on a rooftop at dusk."


def png_base64(color: str = "orange", size: tuple[int, int] = (64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def submit(client: TestClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, "duration": 4, **body})
    assert response.status == 202, await response.text()
    accepted = await response.json()
    assert response.headers["Location"] == accepted["status_url"]
    return accepted


async def events_of(client: TestClient, job_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with client.get(f"/api/mv/jobs/{job_id}/events", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [event async for event in read_sse(response)]


async def wait_for(client: TestClient, job_id: str, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            state = await (await client.get(f"/api/mv/jobs/{job_id}")).json()
            if predicate(state):
                return state
            await asyncio.sleep(0.02)


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


# -- settings ---------------------------------------------------------------------------------------------------------


def jobs_settings(settings_dir: Path, **changes: Any) -> None:
    """Rewrite ``jobs`` keys of the test's copy of ``videos.yaml`` (before the app is created)."""
    path = settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["jobs"].update(changes)
    path.write_text(yaml.safe_dump(videos, sort_keys=False))


# -- the simulator's records ------------------------------------------------------------------------------------------


def requests_to(sim: Simulator, route: str) -> int:
    return sum(1 for name, _ in sim.requests if name == route)


# -- songs and clips --------------------------------------------------------------------------------------------------

SINGER_PROMPT = "A singer in a yellow raincoat sings on a rainy night platform."


FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


_CODECS = {"mp3": ["-c:a", "libmp3lame", "-b:a", "128k"], "wav": ["-c:a", "pcm_s16le"], "m4a": ["-c:a", "aac"]}


def lavfi(path: Path, source: str, *options: str) -> Path:
    """Write ``path`` from an ffmpeg lavfi ``source`` (a tone, silence) with output ``options``: test media."""
    args = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source, *options]
    subprocess.run([*args, str(path)], check=True, capture_output=True, timeout=60)
    return path


async def make_song(
    client: TestClient,
    seconds: float,
    fmt: str = "mp3",
    *,
    rate: int = 44100,
    channels: int = 2,
    sidecar: dict[str, Any] | None = None,
) -> str:
    """Save a song as the upload does, through the app's artefacts: ``audio/<id>.<ext>`` (a lavfi tone whose pitch
    rises every second, so windows differ), then its JSON sidecar, last."""
    audio_id = new_id()
    tone = f"aevalsrc='0.4*sin(2*PI*(220+40*floor(t))*t)':s={rate}:d={seconds}"
    with tempfile.TemporaryDirectory(prefix="mvtest-song-") as folder:
        path = Path(folder) / f"song.{fmt}"
        await asyncio.to_thread(lavfi, path, tone, "-ac", str(channels), *_CODECS[fmt])
        await artefacts_of(client).put_bytes(artefact_key("audio", audio_id, f".{fmt}"), path.read_bytes())
    record = {
        "audio_id": audio_id,
        "format": fmt,
        "mime_type": audio.FORMATS[fmt].mime_type,
        "duration": seconds,
        "sample_rate": rate,
        "channels": channels,
        **(sidecar or {}),
    }
    await artefacts_of(client).put_json(artefact_key("audio", audio_id, ".json"), record)
    return audio_id


async def make_clip(client: TestClient, sim: Simulator, duration: int = 4) -> str:
    """A finished sandbox video job (a real H.264 clip) to lip-sync."""
    latency, sim.video_latency = sim.video_latency, 0.2
    try:
        response = await client.post(
            "/api/mv/generate_video", json={"prompt": SINGER_PROMPT, "duration": duration, "generate_audio": False}
        )
        assert response.status == 202, await response.text()
        job_id = (await response.json())["job_id"]
        state = await wait_for(client, job_id, lambda s: s["status"] in ("succeeded", "failed", "canceled"))
        assert state["status"] == "succeeded", state
        return job_id
    finally:
        sim.video_latency = latency


def probe_media(path: Path) -> dict[str, Any]:
    """A media file described for assertions, by ``ffmpeg -i`` read with media's own parser: its duration, the first
    video stream's codec, size, pixel format and frame rate (None for an audio file) and the first audio codec.
    Raises :class:`mvserver.media.errors.MediaError` for a file ffmpeg cannot read."""
    done = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    info = parse_probe(done.stderr.decode(errors="replace"))
    video, audio_stream = info.first_video, info.first_audio
    return {
        "duration": info.duration,
        "video_codec": video.codec if video else None,
        "width": video.width if video else None,
        "height": video.height if video else None,
        "pix_fmt": video.pix_fmt if video else None,
        "fps": video.fps if video else None,
        "audio_codec": audio_stream.codec if audio_stream else None,
    }


# -- audio files ------------------------------------------------------------------------------------------------------

UPLOAD = "/api/mv/upload_audio"


def make_audio(path: Path, *options: str, seconds: float = 2.0, rate: int = 44100, channels: int = 2) -> Path:
    return lavfi(path, f"sine=f=440:d={seconds}:r={rate}", "-ac", str(channels), *options)


def stored(tmp_path: Path) -> list[str]:
    """Everything in outputs/audio, temporaries included."""
    return sorted(p.name for p in (tmp_path / "outputs" / "audio").iterdir())


def song_bytes(seconds: float = 2.0, frequency: int = 440) -> bytes:
    """A few seconds of MP3 (a sine of ``frequency`` Hz), made by the bundled ffmpeg."""
    from imageio_ffmpeg import get_ffmpeg_exe

    done = subprocess.run(
        [
            get_ffmpeg_exe(),
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={frequency}:duration={seconds:g}",
            "-c:a",
            "libmp3lame",
            "-f",
            "mp3",
            "-",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return done.stdout


# -- projects and their event stream ----------------------------------------------------------------------------------

PROJECTS = "/api/mv/projects"
JOB_EVENTS = ("queued", "running", "progress", "succeeded", "failed", "canceled")

Events = list[dict[str, Any]]


async def new_project(client: TestClient, scenes: int = 2, **headers: str) -> dict[str, Any]:
    """A project whose scenes have prompts (4 s clips), ready for clips."""
    response = await client.post(
        PROJECTS,
        json={"idea": "a rooftop party", "character_description": "a tabby cat DJ", "number_of_scenes": scenes},
        headers=headers,
    )
    assert response.status == 201, await response.text()
    project = await response.json()
    patch = {"scenes": [{"id": s["id"], "prompt": PROMPT, "duration": 4} for s in project["scenes"]]}
    response = await client.patch(
        f"{PROJECTS}/{project['project_id']}", json=patch, headers={"If-Match": project["etag"], **headers}
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def read_until(
    response: ClientResponse,
    events: Events,
    done: Callable[[Events], bool],
    timeout: float = 30.0,
    comments: bool = False,
) -> Events:
    """Append the stream's events to ``events`` until ``done(events)``; the stream itself never ends."""
    if done(events):
        return events
    async with asyncio.timeout(timeout):
        async for event in read_sse(response, comments=comments):
            events.append(event)
            if done(events):
                return events
    raise AssertionError(f"the stream ended early: {events}")


def named(events: Events, *names: str) -> Events:
    return [e for e in events if e.get("event") in names]


def job_events(events: Events) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for event in named(events, *JOB_EVENTS):
        seen[event["data"]["job_id"]].append(event["event"])
    return seen


def finished(job_ids: list[str]) -> Callable[[Events], bool]:
    return lambda events: all(job_events(events)[j][-1:] in (["succeeded"], ["failed"]) for j in job_ids)


# -- inbound (provider) webhooks --------------------------------------------------------------------------------------


def set_safety_poll(settings_dir: Path, seconds: float) -> None:
    path = settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["jobs"]["webhook_safety_poll_seconds"] = seconds
    path.write_text(yaml.safe_dump(videos, sort_keys=False))


HookClient = Callable[..., Awaitable[TestClient]]


def delivery(
    secret: str, body: dict[str, Any], *, age: int = 0, webhook_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    webhook_id = webhook_id or f"msg_{time.monotonic_ns()}"
    timestamp = int(time.time()) - age
    return raw, {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, raw),
    }


async def running_job(client: TestClient) -> tuple[str, dict[str, Any]]:
    """A running job and its prediction's JSON from the API, marked failed (what a forger would send)."""
    job = await submit(client)
    async with asyncio.timeout(5):
        while (await client.app[JOBS].get(job["job_id"])).prediction_id is None:
            await asyncio.sleep(0.01)
    prediction_id = (await client.app[JOBS].get(job["job_id"])).prediction_id
    body = {
        "id": prediction_id,
        "model": "google/veo-3.1",
        "version": "v",
        "status": "failed",
        "input": {},
        "logs": "",
        "output": None,
        "error": "forged",
        "created_at": None,
    }
    return job["job_id"], body


# -- outbound webhooks ------------------------------------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver:
    """A backend that receives webhooks: verifies each with the library, answers 500 to the first ``fail``
    attempts, and keeps what it verified in arrival order."""

    def __init__(self, secret: str, fail: int = 0):
        self.webhook = Webhook(secret)
        self.fail = fail
        self.attempts = 0
        self.verified: list[dict[str, Any]] = []  # {"id", "type", "event_id", "job_id", "data"}
        self.refused = 0
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._answer(request)
        finally:
            self.arrived.set()

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        if self.attempts <= self.fail:
            return web.Response(status=500)
        try:
            payload = self.webhook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.refused += 1
            return web.Response(status=400)
        self.verified.append({"id": request.headers["webhook-id"], **payload})
        return web.Response(status=204)

    def types(self, job_id: str) -> list[str]:
        return [d["type"] for d in self.verified if d["job_id"] == job_id]

    async def until(self, condition: Any, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.arrived.clear()
                await self.arrived.wait()


# -- processes --------------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def heartbeat(outputs: OutputStore | Path, node: str, pid: int, *, host: str | None = None, age: float = 0.0) -> Path:
    """A node's heartbeat file in an output directory, as :meth:`OutputStore.beat` writes it, ``age`` seconds old."""
    root = outputs.root if isinstance(outputs, OutputStore) else outputs
    path = root / "nodes" / f"{node}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"node": node, "host": host or socket.gethostname(), "pid": pid}))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


async def exited(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (not necessarily a child) ends within ``timeout``: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    ended = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, ended.set)
    try:
        async with asyncio.timeout(timeout):
            await ended.wait()
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def proc_limit(pid: int, name: str) -> tuple[str, str]:
    """The soft and hard value of one line of /proc/<pid>/limits (e.g. "Max data size")."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            soft, hard = line[len(name) :].split()[:2]
            return soft, hard
    raise AssertionError(f"no {name} in /proc/{pid}/limits")


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("holding", flush=True)
sys.stdin.read()
"""


# -- a server process -------------------------------------------------------------------------------------------------


def keyless_env(tmp_path: Path) -> dict[str, str]:
    """The current environment without provider credentials or ``MV_*`` knobs.

    The credential variables are set to blank (which counts as unset) so a stray ``.env`` cannot fill them in.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GEMINI_", "REPLICATE_", "MV_"))}
    env.update(
        {
            name: ""
            for name in (
                "GEMINI_API_KEY",
                "REPLICATE_API_TOKEN",
                "GOOGLE_VERTEX_API_KEY",
                "GOOGLE_CLOUD_PROJECT",
                "GOOGLE_API_KEY",
                "MV_SANDBOX",
            )
        }
    )
    env.update(
        {
            "PYTHONPATH": str(PROJECT),
            "MV_OUTPUT_DIR": str(tmp_path / "outputs"),
            "MV_SETTINGS_DIR": str(PROJECT / "settings"),
        }
    )
    return env


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for_health(process: subprocess.Popen, url: str, log: Path, deadline: float) -> dict[str, Any]:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            status, body = get_json(url)
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
            continue
        assert status == 200, body
        return body
    pytest.fail(f"server did not answer {url} in time:\n{log.read_text()}")


@contextlib.contextmanager
def running_server(tmp_path: Path, stop: signal.Signals, **env: str) -> Iterator[tuple[int, Path, list[int]]]:
    """``python -m mvserver`` with no API keys (plus ``env``) on a free port; stopped with ``stop`` on exit, its code
    recorded."""
    port = free_port()
    log = tmp_path / "server.log"
    exit_code: list[int] = []
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", str(port)],
            env={**keyless_env(tmp_path), **env},
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        # a busy machine imports the server slowly: wait up to a minute for it to answer
        wait_for_health(process, f"http://127.0.0.1:{port}/api/mv/health", log, time.monotonic() + 60)
        yield port, log, exit_code
    finally:
        process.send_signal(stop)
        try:
            exit_code.append(process.wait(timeout=10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise


# -- clusters of server processes on one Redis ------------------------------------------------------------------------

CLUSTER_PROMPT = "Three drummers on three rooftops keep one beat across the city at night."


LEASE = 2.0


CLAIM_INTERVAL = 0.5


VIDEO_SECONDS = 4.0


STARTUP_TIMEOUT = 90.0  # a loaded machine starts Python processes slowly


class Cluster:
    """A simulator process, a Redis and any number of nodes sharing one output directory."""

    def __init__(self, tmp_path: Path, redis: RedisServer, settings_dir: Path):
        self.video_seconds = VIDEO_SECONDS
        self.tmp_path = tmp_path
        self.redis = redis
        self.settings_dir = settings_dir
        self.processes: list[subprocess.Popen] = []
        self.sim_dir = tmp_path / "simulator"
        self.sim_port = free_port()
        self.nodes: list[tuple[subprocess.Popen, str]] = []
        self.extra_env: dict[str, str] = {}  # e.g. API keys for every node
        self.sim_args: list[str] = []  # more options of the simulator's command line

    def env(self) -> dict[str, str]:
        sim = f"http://127.0.0.1:{self.sim_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MV_", "GEMINI_", "REPLICATE_", "GOOGLE_"))}
        env.update(
            {
                "GEMINI_API_KEY": "cluster-test",
                "REPLICATE_API_TOKEN": "r8_cluster",
                "GOOGLE_VERTEX_API_KEY": "cluster",
                "MV_GEMINI_BASE_URL": f"{sim}/gemini",
                "MV_VERTEX_BASE_URL": f"{sim}/vertex",
                "MV_REPLICATE_BASE_URL": f"{sim}/replicate",
                "MV_REDIS_URL": self.redis.url,
                "MV_REDIS_PREFIX": "cluster:",
                "MV_OUTPUT_DIR": str(self.tmp_path / "outputs"),
                "MV_SETTINGS_DIR": str(self.settings_dir),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
                **self.extra_env,
            }
        )
        return env

    def start_simulator(self) -> None:
        log = (self.tmp_path / "simulator.log").open("wb")
        self.processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mvserver.sandbox",
                    "--port",
                    str(self.sim_port),
                    "--state-dir",
                    str(self.sim_dir),
                    "--video-latency",
                    str(self.video_seconds),
                    "--render-cache",
                    "--render-cache-dir",
                    str(RENDER_CACHE),
                    *self.sim_args,
                ],
                cwd=self.tmp_path,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def start_node(self) -> tuple[subprocess.Popen, str]:
        process, base = spawn_server(self.env(), self.tmp_path, self.tmp_path / f"node-{len(self.nodes)}.log")
        self.processes.append(process)
        self.nodes.append((process, base))
        return process, base

    def log(self, index: int) -> str:
        return (self.tmp_path / f"node-{index}.log").read_text(errors="replace")

    def predictions(self) -> dict[str, dict[str, Any]]:
        return {path.stem: json.loads(path.read_text()) for path in (self.sim_dir / "predictions").glob("*.json")}

    def fast_forward(self, seconds_left: float = 0.5) -> None:
        """Bring every running prediction's end near (the simulator reads its records from disk on each poll): long
        predictions keep jobs mid-generation however slowly the nodes start, and still end soon after the check."""
        for prediction_id, record in self.predictions().items():
            if record.get("status") in ("starting", "processing"):
                record["latency"] = time.time() - record["created_at"] + seconds_left
                write_bytes_atomic(self.sim_dir / "predictions" / f"{prediction_id}.json", json.dumps(record).encode())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with_signal(process, signal.SIGCONT)
                process.kill()
                process.wait(timeout=10)


def with_signal(process: subprocess.Popen, sig: int) -> None:
    try:
        os.kill(process.pid, sig)
    except ProcessLookupError:
        pass


async def until_up(http: aiohttp.ClientSession, process: subprocess.Popen, url: str) -> dict[str, Any]:
    """The health answer at ``url`` once it is 200, waiting up to ``STARTUP_TIMEOUT`` while ``process`` lives."""
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while True:
            assert process.poll() is None, f"{url} exited with {process.returncode}"
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return await response.json()
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


def spawn_server(env: dict[str, str], cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``python -m mvserver`` with ``env`` on a free loopback port, its output in ``log``; the caller waits for it
    (:func:`until_up`) and stops it. Returns the process and its base URL."""
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}"


def sandbox_env(tmp_path: Path, settings_dir: Path, **extra: str) -> dict[str, str]:
    """A server process's environment in sandbox mode: this one without provider credentials or ``MV_*`` knobs
    (the credentials blank, so a ``.env`` cannot supply them), outputs in ``tmp_path``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MV_", "GEMINI_", "REPLICATE_", "GOOGLE_"))}
    env.update(
        {
            "GEMINI_API_KEY": "",
            "REPLICATE_API_TOKEN": "",
            "GOOGLE_VERTEX_API_KEY": "",
            "GOOGLE_CLOUD_PROJECT": "",
            "MV_SANDBOX": "true",
            "MV_OUTPUT_DIR": str(tmp_path / "outputs"),
            "MV_SETTINGS_DIR": str(settings_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])),
            **extra,
        }
    )
    return env


async def nodes_up(http: aiohttp.ClientSession, cluster: Cluster, count: int) -> list[str]:
    started = [cluster.start_node() for _ in range(count)]
    for process, base in started:
        await until_up(http, process, f"{base}/api/mv/health")
    return [base for _, base in started]


async def sim_up(http: aiohttp.ClientSession, cluster: Cluster) -> None:
    await until_up(http, cluster.processes[0], f"http://127.0.0.1:{cluster.sim_port}/_sim/health")


async def state(http: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{base}/api/mv/jobs/{job_id}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def until(
    http: aiohttp.ClientSession,
    base: str,
    job_id: str,
    predicate: Callable[[dict[str, Any]], Any],
    timeout: float = 30.0,
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            current = await state(http, base, job_id)
            if predicate(current):
                return current
            await asyncio.sleep(0.05)


def final(current: dict[str, Any]) -> bool:
    return current["status"] in ("succeeded", "failed", "canceled")


# -- browsers ---------------------------------------------------------------------------------------------------------

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


PROVIDER_KEYS = ("GEMINI_API_KEY", "REPLICATE_API_TOKEN", "GOOGLE_VERTEX_API_KEY", "GOOGLE_CLOUD_PROJECT")


BROWSER_VIDEO_SECONDS = 3


def requires_browser(test: Any) -> Any:
    """Mark a test ``browser``: conftest skips it without Chromium or Playwright, and fails it under ``CI=true``."""
    return pytest.mark.browser(test)


def _browser_settings(target: Path) -> Path:
    """The project's settings with quick polling, so a 3 s sandbox video reports progress several times."""
    shutil.copytree(PROJECT / "settings", target)
    for name, changes in {
        "videos": {"jobs": {"poll_interval_seconds": 0.2}},
        "images": {"poll_interval_seconds": 0.1},
        "sandbox": {"image_latency_seconds": 0.3, "scenes_latency_seconds": 0.1},
    }.items():
        path = target / f"{name}.yaml"
        data = yaml.safe_load(path.read_text())
        for key, value in changes.items():
            data[key] = {**data[key], **value} if isinstance(value, dict) else value
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def _server_env(tmp: Path) -> dict[str, str]:
    """This environment without provider credentials (blank, so a ``.env`` cannot supply them) or MV_* knobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "MV_")) and k not in PROVIDER_KEYS}
    env.update({key: "" for key in PROVIDER_KEYS})
    env.update(
        {
            "MV_OUTPUT_DIR": str(tmp / "outputs"),
            "MV_SETTINGS_DIR": str(_browser_settings(tmp / "settings")),
            "MV_SANDBOX_VIDEO_SECONDS": str(BROWSER_VIDEO_SECONDS),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/api/mv/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    pytest.fail(f"the server did not answer /api/mv/health within {timeout} s:\n{log.read_text()}")


def start_server(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m mvserver`` on a free loopback port, every provider answered by the built-in simulator."""
    port = free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mvserver", "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT,
            env={**_server_env(tmp), **(extra_env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process, log)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def open_page(
    browser: Browser, server: str, path: str, expected: tuple[str, ...] = (), origins: tuple[str, ...] = ()
) -> Iterator[Page]:
    """A fresh page at ``path``; fails the test on script errors, unexpected console errors and requests to
    another origin than the server's and ``origins`` (``host:port``). ``expected`` are console error texts a test
    provokes on purpose."""
    context = browser.new_context(base_url=server, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    origin = urlsplit(server).netloc

    def check_console(message: Any) -> None:
        if (
            message.type == "error"
            and not _expected_console_error(message.text)
            and not any(text in message.text for text in expected)
        ):
            problems.append(f"console error: {message.text}")

    def check_origin(request: Any) -> None:
        url = urlsplit(request.url)
        if url.scheme != "data" and url.netloc != origin and url.netloc not in origins:
            problems.append(f"request to another origin: {request.url}")

    page.on("console", check_console)
    page.on("request", check_origin)
    page.goto(path)
    yield page
    context.close()
    assert not problems, problems


def _expected_console_error(text: str) -> bool:
    """Chromium logs every 4xx answer to fetch; the error test provokes a 400 on purpose."""
    return "status of 400 (Bad Request)" in text
