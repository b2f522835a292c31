"""Shared fixtures: a provider simulator on 127.0.0.1 and apps whose real SDK clients point at it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mvserver.app import create_app
from mvserver.sandbox.simulator import Simulator, create_simulator_app

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


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``browser`` test needs Chromium and Playwright: skipped without them, failed under CI."""
    if item.get_closest_marker("browser"):
        require_or_skip(f"Chromium at {CHROMIUM} (apt-get install chromium)", CHROMIUM.is_file())
        require_or_skip("the playwright package (pip install playwright)",
                        importlib.util.find_spec("playwright") is not None)


@pytest.fixture
def sim(tmp_path: Path) -> Simulator:
    """A fast simulator whose state lives in the test's temporary directory."""
    return Simulator(tmp_path / "simulator", video_latency=1.0, image_latency=0.2, scenes_latency=0.0)


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
    target = tmp_path / "settings"
    shutil.copytree(PROJECT / "settings", target)
    videos = yaml.safe_load((target / "videos.yaml").read_text())
    videos["jobs"].update(FAST_JOBS)
    (target / "videos.yaml").write_text(yaml.safe_dump(videos, sort_keys=False))
    images = yaml.safe_load((target / "images.yaml").read_text())
    images["poll_interval_seconds"] = 0.05
    (target / "images.yaml").write_text(yaml.safe_dump(images, sort_keys=False))
    return target


@pytest.fixture
def live_env(sim_server: TestServer, tmp_path: Path, settings_dir: Path) -> dict[str, str]:
    """Environment of an app with every provider 'configured', all pointed at the simulator."""
    base = str(sim_server.make_url("")).rstrip("/")
    return {
        "GEMINI_API_KEY": "test-gemini-key",
        "REPLICATE_API_TOKEN": "r8_test",
        "GOOGLE_VERTEX_API_KEY": "test-vertex-key",
        "MV_GEMINI_BASE_URL": f"{base}/gemini",
        "MV_VERTEX_BASE_URL": f"{base}/vertex",
        "MV_REPLICATE_BASE_URL": f"{base}/replicate",
        "MV_OUTPUT_DIR": str(tmp_path / "outputs"),
        "MV_SETTINGS_DIR": str(settings_dir),
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
