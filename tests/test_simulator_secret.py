"""The simulator's webhook signing secret goes only to the holder of its own token.

Whoever holds the secret can sign a delivery that ends any job. The built-in simulator used to hand it to any caller
with any bearer token (the server's own was the constant ``sandbox``), on a loopback port any local process can reach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import events_of, submit

from mvserver.appkeys import PROVIDERS, WEBHOOK_RECEIVER
from mvserver.sandbox.__main__ import build_parser, make_simulator
from mvserver.sandbox.app import Simulator, create_simulator_app

SECRET_PATH = "/v1/webhooks/default/secret"


async def test_the_built_in_simulator_gives_its_secret_to_no_other_caller(make_client: Any) -> None:
    client = await make_client(MV_SANDBOX="true", MV_SANDBOX_VIDEO_SECONDS="1")
    assert (client.app[WEBHOOK_RECEIVER].secret or "").startswith("whsec_")  # the server itself got it, unconfigured
    base = client.app[PROVIDERS].replicate.client._base_url
    session = client.session
    for headers in (
        {},
        {"Authorization": "Bearer sandbox"},
        {"Authorization": "Bearer r8_test"},
        {"Authorization": "Bearer " + "x" * 32},
    ):
        async with session.get(base + SECRET_PATH, headers=headers) as response:
            assert response.status == 401, headers
            assert "whsec_" not in await response.text()
    job = await submit(client)  # and sandbox jobs still finish by the simulator's signed webhooks
    assert (await events_of(client, job["job_id"]))[-1]["event"] == "succeeded"
    assert len(client.app[WEBHOOK_RECEIVER].seen) >= 2


async def test_a_simulator_without_a_token_of_its_own_gives_its_secret_to_no_one(
    tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = Simulator(tmp_path / "sim")
    client = await aiohttp_client(create_simulator_app(sim))
    response = await client.get("/replicate" + SECRET_PATH, headers={"Authorization": "Bearer r8_anyone"})
    assert response.status == 403 and "whsec_" not in await response.text()
    monkeypatch.delenv("MV_SIM_API_TOKEN", raising=False)
    assert make_simulator(build_parser().parse_args(["--state-dir", str(tmp_path)])).api_token is None
    monkeypatch.setenv("MV_SIM_API_TOKEN", "r8_cluster")
    assert make_simulator(build_parser().parse_args(["--state-dir", str(tmp_path)])).api_token == "r8_cluster"


async def test_a_simulator_with_a_token_answers_only_that_token(sim: Simulator, sim_server: TestServer) -> None:
    url = str(sim_server.make_url("/replicate" + SECRET_PATH))
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Authorization": "Bearer r8_other"}) as other:
            assert other.status == 401 and "whsec_" not in await other.text()
        async with session.get(url, headers={"Authorization": f"Bearer {sim.api_token}"}) as own:
            assert own.status == 200 and (await own.json())["key"] == sim.webhook_secret
