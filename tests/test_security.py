"""Cross-site request forgery and DNS rebinding: what a hostile web page can send to a server on 127.0.0.1.

A page can POST an HTML form or a ``text/plain``/multipart ``fetch`` without a CORS preflight, and a rebound DNS name
makes its requests carry the attacker's host name. Every such request is refused before a handler runs: no job, no
provider call, nothing written.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, LiveApp, module_loop

from mvserver.appkeys import STORE
from mvserver.core.config import ConfigError, EnvSettings
from mvserver.sandbox.app import Simulator

VIDEO = "/api/mv/generate_video"
BODY = {"prompt": "A getaway driver roller-skates through a neon disco.", "duration": 4}


def nothing_happened(client: TestClient, sim: Simulator) -> None:
    """No job was written and no provider was called (the refusal tests share one app: none may leave a job)."""
    assert not [path for path in (client.app[STORE].root / "jobs").rglob("*") if path.is_file()]
    assert sim.requests == []


def origin_of(client: TestClient) -> str:
    return str(client.make_url("")).rstrip("/")


async def refused(response: aiohttp.ClientResponse, status: int, code: str, field: str) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == code and error["field"] == field, error


@module_loop
async def test_an_html_form_post_is_refused(module_live: LiveApp) -> None:
    client, sim = module_live
    # What <form method=post action=http://127.0.0.1:8080/api/mv/generate_video> sends (no Origin: old browsers).
    response = await client.post(VIDEO, data={"prompt": BODY["prompt"]})
    assert response.request_info.headers["Content-Type"] == "application/x-www-form-urlencoded"
    await refused(response, 415, "unsupported_media_type", "Content-Type")
    nothing_happened(client, sim)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "application/json-seq",
        "application/jsonx",
        None,
    ],
)
@module_loop
async def test_a_json_body_with_another_type_is_refused(module_live: LiveApp, content_type: str | None) -> None:
    """fetch(url, {method: "POST", body: JSON.stringify(...)}) sends text/plain and needs no preflight."""
    client, sim = module_live
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await client.post(
        VIDEO, data=json.dumps(BODY).encode(), headers=headers, skip_auto_headers=["Content-Type"]
    )
    await refused(response, 415, "unsupported_media_type", "Content-Type")
    nothing_happened(client, sim)


@module_loop
async def test_a_multipart_post_is_refused(module_live: LiveApp) -> None:
    client, sim = module_live
    form = aiohttp.FormData()
    form.add_field("body", json.dumps(BODY), content_type="application/json")
    form.add_field("file", b"\x89PNG", filename="x.png", content_type="image/png")
    response = await client.post(VIDEO, data=form)
    await refused(response, 415, "unsupported_media_type", "Content-Type")
    nothing_happened(client, sim)


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://evil.example:8080",
        "null",
        "https://127.0.0.1",
        "http://localhost.evil.example",
        "http://127.0.0.1:1",
    ],
)
@module_loop
async def test_a_foreign_origin_is_refused(module_live: LiveApp, origin: str) -> None:
    client, sim = module_live
    response = await client.post(VIDEO, json=BODY, headers={"Origin": origin})
    await refused(response, 403, "forbidden_origin", "Origin")
    response = await client.get("/api/mv/health", headers={"Origin": origin})  # a cross-origin fetch() reading
    await refused(response, 403, "forbidden_origin", "Origin")
    nothing_happened(client, sim)


async def test_a_foreign_origin_cannot_cancel(client: TestClient) -> None:
    response = await client.post(VIDEO, json=BODY)
    job_id = (await response.json())["job_id"]
    for method, path in (("POST", f"/api/mv/jobs/{job_id}/cancel"), ("DELETE", f"/api/mv/jobs/{job_id}")):
        response = await client.request(method, path, headers={"Origin": "http://evil.example"})
        await refused(response, 403, "forbidden_origin", "Origin")
    assert (await (await client.get(f"/api/mv/jobs/{job_id}")).json())["status"] != "canceled"
    assert (await client.delete(f"/api/mv/jobs/{job_id}")).status == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io", "localhost.", "[::2]", "rebind.127.0.0.1.example"]
)
@module_loop
async def test_a_rebinding_host_is_refused(module_live: LiveApp, host: str) -> None:
    """A page on evil.example whose name now resolves to 127.0.0.1: same-origin for the browser, wrong Host here."""
    client, sim = module_live
    response = await client.post(VIDEO, json=BODY, headers={"Host": host, "Origin": f"http://{host}"})
    await refused(response, 421, "misdirected_request", "Host")
    response = await client.get("/api/mv/health", headers={"Host": host})
    await refused(response, 421, "misdirected_request", "Host")
    nothing_happened(client, sim)


async def test_same_origin_and_allowed_requests_pass(make_client: AppClient) -> None:
    client = await make_client(MV_CORS_ORIGINS="http://localhost:3000, https://mv.example.com/")
    own = origin_of(client)
    port = client.port
    for origin in (own, own.upper().replace("HTTP://", "http://"), "http://localhost:3000", "https://mv.example.com"):
        response = await client.post(VIDEO, json=BODY, headers={"Origin": origin})
        assert response.status == 202, (origin, await response.text())
    # the same server reached as localhost or [::1]; the Origin names the host the page was loaded from
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.1"):
        origin = f"http://{host}"
        response = await client.post(VIDEO, json=BODY, headers={"Host": host, "Origin": origin})
        assert response.status == 202, (host, await response.text())
    response = await client.post(
        VIDEO, data=json.dumps(BODY), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status == 202
    # a page on localhost:3000 (allowed) talking to 127.0.0.1:<port>, and a GET with no Origin at all
    response = await client.get("/api/mv/health", headers={"Origin": "http://localhost:3000"})
    assert response.status == 200
    assert (await client.get("/", headers={"Host": f"localhost:{port}"})).status == 200


async def test_allowed_hosts_can_be_configured(make_client: AppClient) -> None:
    client = await make_client(MV_ALLOWED_HOSTS="mv.internal, 127.0.0.1")
    assert (await client.get("/api/mv/health", headers={"Host": "mv.internal:8080"})).status == 200
    assert (await client.get("/api/mv/health")).status == 200
    response = await client.get("/api/mv/health", headers={"Host": "localhost"})
    await refused(response, 421, "misdirected_request", "Host")


def test_the_settings_read_the_lists() -> None:
    env = EnvSettings.from_env({"MV_CORS_ORIGINS": "HTTP://LocalHost:3000/,https://a.example", "MV_HOST": "0.0.0.0"})
    assert env.cors_origins == ("http://localhost:3000", "https://a.example")
    assert env.host_names == {"0.0.0.0", "localhost", "127.0.0.1", "[::1]"}
    assert EnvSettings.from_env({"MV_HOST": "::1"}).host_names == {"[::1]", "localhost", "127.0.0.1"}
    assert EnvSettings.from_env({"MV_ALLOWED_HOSTS": "A.example,b"}).host_names == {"a.example", "b"}
    for bad in ("localhost:3000", "http://a.example/path", "ftp://a.example", "*"):
        with pytest.raises(ConfigError, match="MV_CORS_ORIGINS"):
            EnvSettings.from_env({"MV_CORS_ORIGINS": bad})


async def test_the_public_base_url_host_is_allowed_for_webhook_deliveries(make_client: AppClient) -> None:
    """Replicate addresses its webhooks to MV_PUBLIC_BASE_URL's host: the guard lets that host through."""
    client = await make_client(MV_PUBLIC_BASE_URL="https://mv.example.com/base")
    response = await client.get("/api/mv/health", headers={"Host": "mv.example.com"})
    assert response.status == 200
    response = await client.post(
        "/api/mv/webhooks/replicate?job=0b4e7c1e-3f5a-4c39-9d2a-5f0e7b8c9d10",
        data=b"{}",
        headers={"Host": "mv.example.com", "Content-Type": "application/json"},
    )
    assert response.status == 401  # past the guard: refused only for its missing signature
    other = await make_client()
    response = await other.get("/api/mv/health", headers={"Host": "mv.example.com"})
    await refused(response, 421, "misdirected_request", "Host")
