"""Shared fixtures: a provider simulator on 127.0.0.1 and apps whose real SDK clients point at it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mvserver.app import create_app
from mvserver.sandbox.simulator import Simulator, create_simulator_app

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sim(tmp_path: Path) -> Simulator:
    """A fast simulator whose state lives in the test's temporary directory."""
    return Simulator(tmp_path / "simulator", video_latency=1.0, image_latency=0.2, scenes_latency=0.0)


@pytest.fixture
async def sim_server(sim: Simulator, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(create_simulator_app(sim))


@pytest.fixture
def live_env(sim_server: TestServer, tmp_path: Path) -> dict[str, str]:
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
        "MV_SETTINGS_DIR": str(PROJECT / "settings"),
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
