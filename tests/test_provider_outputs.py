"""Provider outputs are fetched only from allowed hosts, up to a size cap, and kept only when they are the expected
media, whether the job learnt of the output from a poll or from a signed webhook.

Before: a signed delivery claiming ``succeeded`` with ``output: http://127.0.0.1:<port>/x`` made the server fetch
that loopback URL and serve what it got as the MP4, a 300 MB body included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import artefact, delivery, events_of, stored_names, submit
from yarl import URL

from mvserver.app import replicate_output_hosts
from mvserver.appkeys import JOBS
from mvserver.core.config import ConfigError, EnvSettings
from mvserver.providers.outputs import DEFAULT_REPLICATE_OUTPUT_HOSTS, OutputHosts
from mvserver.sandbox import gemini_api, replicate_api
from mvserver.sandbox.app import Simulator

pytestmark = pytest.mark.both_stores

MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"  # an ftyp box, as every MP4 starts
CHUNK = 64 * 1024
HUGE = 300 * 1024 * 1024  # what the hostile host offers
CAP = 1024 * 1024  # limits.output_max_bytes in these tests
SLACK = 16 * 1024 * 1024  # what socket buffers may take in after the server stopped reading


class FileHost:
    """An HTTP server standing in for an output host: it counts requests and the bytes it managed to send."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.sent = 0
        self.server: TestServer | None = None
        self.redirect_to: str | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    @property
    def origin(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        kind = request.match_info["kind"]
        if kind == "redirect":
            raise web.HTTPFound(self.redirect_to or "/")
        if kind == "html":
            return web.Response(text="<html><body>an internal dashboard</body></html>", content_type="text/html")
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        if kind == "declared":
            response.content_length = HUGE  # says how large it is up front
        await response.prepare(request)
        await self._send(response, MP4_HEAD)
        while self.sent < HUGE:  # an MP4 that never ends, unless the client stops reading
            await self._send(response, bytes(CHUNK))
        return response

    async def _send(self, response: web.StreamResponse, data: bytes) -> None:
        await response.write(data)
        self.sent += len(data)


@pytest.fixture
async def file_hosts(aiohttp_server: Any) -> AsyncIterator[tuple[FileHost, FileHost]]:
    """(allowed, foreign): two output hosts on loopback; the tests allow the first one."""
    hosts = (FileHost(), FileHost())
    for host in hosts:
        app = web.Application()
        app.router.add_get("/{kind}", host.handle)
        host.server = await aiohttp_server(app)
    yield hosts


def set_output_cap(settings_dir: Path, limit: int) -> None:
    path = settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["limits"]["output_max_bytes"] = limit
    path.write_text(yaml.safe_dump(videos, sort_keys=False))


async def app_for(via: str, hook_client: Any, make_client: Any, sim: Simulator, allowed: FileHost) -> TestClient:
    """An app whose jobs hear of the end by webhook (``via="webhook"``) or by polling, with ``allowed`` on its list
    of output hosts (besides the simulator's own origin)."""
    sim.video_latency = 60.0  # the real prediction never ends during a test: only the forged end does
    hosts = f"replicate.delivery,*.replicate.delivery,{allowed.origin}"
    if via == "webhook":
        return await hook_client(MV_REPLICATE_OUTPUT_HOSTS=hosts)
    return await make_client(MV_REPLICATE_OUTPUT_HOSTS=hosts)


async def prediction_of(client: TestClient, job_id: str) -> str:
    """The job's prediction id, once it is saved (awaited on the job's events)."""
    engine = client.app[JOBS]
    async with asyncio.timeout(10):
        while True:
            job = await engine.get(job_id)
            if job.prediction_id is not None:
                return job.prediction_id
            await engine.next_event(job_id, job.last_event_id)


async def end_with_output(client: TestClient, sim: Simulator, via: str, output: str) -> list[dict[str, Any]]:
    """Start a job, make its prediction claim ``succeeded`` with ``output`` (a signed webhook delivery, or what the
    next poll answers) and return the job's events to its end."""
    job_id = (await submit(client))["job_id"]
    prediction_id = await prediction_of(client, job_id)
    body = {
        "id": prediction_id,
        "model": "google/veo-3.1",
        "version": "v",
        "status": "succeeded",
        "input": {},
        "logs": "",
        "output": output,
        "error": None,
        "created_at": None,
    }
    if via == "webhook":
        raw, headers = delivery(sim.webhook_secret, body)
        response = await client.post(f"/api/mv/webhooks/replicate?job={job_id}", data=raw, headers=headers)
        assert (response.status, await response.json()) == (200, {"status": "accepted"})
    else:
        sim.add_fault("replicate.get", "status", status=200, body=body, times=1000)
    return await events_of(client, job_id)


async def failure(events: list[dict[str, Any]], client: TestClient) -> dict[str, Any]:
    """The job failed, and no video (or temporary file, or staging object) was kept."""
    assert events[-1]["event"] == "failed", events[-1]
    assert await stored_names(client, "videos") == []
    return events[-1]["data"]["error"]


VIAS = ["webhook", "poll"]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("spelling", ["127.0.0.1", "localhost"])
async def test_an_output_on_a_foreign_host_fails_the_job_without_a_request(
    via: str,
    spelling: str,
    hook_client: Any,
    make_client: Any,
    sim: Simulator,
    file_hosts: tuple[FileHost, FileHost],
) -> None:
    allowed, foreign = file_hosts
    client = await app_for(via, hook_client, make_client, sim, allowed)
    output = foreign.url("/x").replace("127.0.0.1", spelling)
    error = await failure(await end_with_output(client, sim, via, output), client)
    assert error["code"] == "provider_output_refused" and error["provider"] == "replicate"
    assert foreign.requests == []  # not even asked


@pytest.mark.parametrize("via", VIAS)
async def test_a_redirect_to_a_foreign_host_is_not_followed(
    via: str, hook_client: Any, make_client: Any, sim: Simulator, file_hosts: tuple[FileHost, FileHost]
) -> None:
    allowed, foreign = file_hosts
    allowed.redirect_to = foreign.url("/x")
    client = await app_for(via, hook_client, make_client, sim, allowed)
    error = await failure(await end_with_output(client, sim, via, allowed.url("/redirect")), client)
    assert error["code"] == "provider_output_refused"
    assert allowed.requests == ["/redirect"] and foreign.requests == []


@pytest.mark.both_backends
@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("kind", ["stream", "declared"])
async def test_an_oversized_output_is_cut_off_and_fails_the_job(
    via: str,
    kind: str,
    hook_client: Any,
    make_client: Any,
    sim: Simulator,
    settings_dir: Path,
    file_hosts: tuple[FileHost, FileHost],
) -> None:
    allowed, _ = file_hosts
    set_output_cap(settings_dir, CAP)
    client = await app_for(via, hook_client, make_client, sim, allowed)
    error = await failure(await end_with_output(client, sim, via, allowed.url(f"/{kind}")), client)
    assert error["code"] == "provider_output_too_large" and str(CAP) in error["message"]
    assert allowed.requests == [f"/{kind}"]  # not retried
    assert allowed.sent < CAP + SLACK  # the host was cut off, far short of the 300 MB it offered


@pytest.mark.both_backends
@pytest.mark.parametrize("via", VIAS)
async def test_an_output_that_is_not_an_mp4_fails_the_job(
    via: str, hook_client: Any, make_client: Any, sim: Simulator, file_hosts: tuple[FileHost, FileHost]
) -> None:
    allowed, _ = file_hosts
    client = await app_for(via, hook_client, make_client, sim, allowed)
    error = await failure(await end_with_output(client, sim, via, allowed.url("/html")), client)
    assert error["code"] == "provider_bad_output" and "MP4" in error["message"]
    assert allowed.requests == ["/html"]


@pytest.mark.both_backends
async def test_the_simulators_own_output_still_downloads(client: TestClient) -> None:
    """The default list plus the origin of MV_REPLICATE_BASE_URL: a job on the simulator succeeds as before."""
    job_id = (await submit(client))["job_id"]
    assert (await events_of(client, job_id))[-1]["event"] == "succeeded"
    assert (await artefact(client, f"videos/{job_id}.mp4"))[4:8] == b"ftyp"


@pytest.mark.file_store_only
@pytest.mark.parametrize("case", ["foreign", "too_large"])
async def test_an_image_output_goes_through_the_same_checks(
    case: str,
    make_client: Any,
    sim: Simulator,
    settings_dir: Path,
    file_hosts: tuple[FileHost, FileHost],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, foreign = file_hosts
    path = settings_dir / "images.yaml"
    images = yaml.safe_load(path.read_text())
    images["limits"]["output_max_bytes"] = 1000  # a sandbox character card is tens of KB
    path.write_text(yaml.safe_dump(images, sort_keys=False))
    client = await make_client()
    if case == "foreign":  # the prediction, polled at its end, names an output on the foreign host
        real = replicate_api.prediction_json
        monkeypatch.setattr(
            replicate_api,
            "prediction_json",
            lambda record, base: {
                **real(record, base),
                **({"output": foreign.url("/x")} if record["status"] == "succeeded" else {}),
            },
        )
    response = await client.post("/api/mv/generate_character_reference", json={"character_description": "a keeper"})
    error = (await response.json())["error"]
    assert response.status == 502
    assert error["code"] == ("provider_output_refused" if case == "foreign" else "provider_output_too_large")
    assert foreign.requests == []


@pytest.mark.both_backends
async def test_an_inline_vertex_video_over_the_cap_or_not_an_mp4_fails_the_job(
    make_client: Any, settings_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_output_cap(settings_dir, 1000)  # a sandbox clip is tens of KB
    client = await make_client()
    events = await events_of(client, (await submit(client, backend="gemini"))["job_id"])
    assert (await failure(events, client))["code"] == "provider_output_too_large"

    async def not_a_video(path: Path, **_: Any) -> None:
        path.write_bytes(b"<html>not a video</html>")

    monkeypatch.setattr(gemini_api, "render_video", not_a_video)
    events = await events_of(client, (await submit(client, backend="gemini", prompt="another"))["job_id"])
    error = await failure(events, client)
    assert error["code"] == "provider_bad_output" and error["provider"] == "gemini"


# -- the setting ----------------------------------------------------------------------------------------------------


def test_the_output_hosts_setting_is_normalised_and_checked() -> None:
    env = EnvSettings.from_env(
        {"MV_REPLICATE_OUTPUT_HOSTS": "Replicate.Delivery, *.replicate.delivery,http://10.0.0.5:8090/,http://[::1]:80"}
    )
    hosts = OutputHosts(env.replicate_output_hosts or ())
    allowed = [
        "https://replicate.delivery/a.mp4",
        "https://pbxt.replicate.delivery/b/c.mp4",
        "http://10.0.0.5:8090/replicate/files/x/output.mp4",
        "http://[::1]/x",
    ]
    refused = [
        "http://replicate.delivery/a.mp4",
        "https://replicate.delivery:8443/a.mp4",
        "https://evilreplicate.delivery/a.mp4",
        "https://replicate.delivery.evil.example/a.mp4",
        "http://10.0.0.5:8091/x",
        "https://replicate.delivery@127.0.0.1/x",
        "http://2130706433:8090/x",
        "file:///etc/passwd",
        "x.mp4",
    ]
    assert [hosts.allows(URL(url)) for url in allowed] == [True] * len(allowed)
    assert [hosts.allows(URL(url)) for url in refused] == [False] * len(refused)
    for bad in ("ftp://replicate.delivery", "http://a:99999", "*", "http://*:80", "a b"):
        with pytest.raises(ConfigError, match="MV_REPLICATE_OUTPUT_HOSTS"):
            EnvSettings.from_env({"MV_REPLICATE_OUTPUT_HOSTS": bad})


def test_the_list_is_the_simulator_alone_in_sandbox_mode_and_adds_the_base_url_live() -> None:
    env = EnvSettings.from_env({})
    assert replicate_output_hosts(env, "http://127.0.0.1:4321/replicate", True).entries == ("http://127.0.0.1:4321",)
    assert replicate_output_hosts(env, None, False).entries == DEFAULT_REPLICATE_OUTPUT_HOSTS
    assert replicate_output_hosts(env, "http://sim:8090/replicate", False).entries == (
        *DEFAULT_REPLICATE_OUTPUT_HOSTS,
        "http://sim:8090",
    )
