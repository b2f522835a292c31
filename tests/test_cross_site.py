"""What a page on another origin may do: CORS preflights for every route and method, and media GETs (``<img>``,
``<video>``, ``<audio>``) that browsers send without ``Origin``."""

from __future__ import annotations

import uuid

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient

ALLOWED = "https://app.example.com"


def _fill(path: str) -> str:
    """A route's path with each ``{name}`` filled in: an id, or ``json`` for an extension."""
    out, rest = "", path
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        out += head + {"ext": "json", "name": "demo.css"}.get(name, str(uuid.uuid4()))
    return out + rest


@pytest.fixture
async def cors_client(make_client: AppClient) -> TestClient:
    return await make_client(MV_CORS_ORIGINS=ALLOWED)


async def test_every_route_and_method_answers_its_cors_preflight(cors_client: TestClient) -> None:
    """A browser preflights a DELETE, a PATCH or a POST with a bearer header; each route's method must be allowed
    for a listed origin (a path split over two router resources answered the second resource's methods 403)."""
    routes = {
        (route.method, route.resource.canonical)
        for route in cors_client.app.router.routes()
        if route.method not in ("OPTIONS", "HEAD", "*") and route.resource is not None
    }
    assert ("DELETE", "/api/mv/jobs/{job_id}") in routes
    for method, path in sorted(routes):
        response = await cors_client.options(
            _fill(path),
            headers={
                "Origin": ALLOWED,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert response.status == 200, (method, path, await response.text())
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert method in response.headers["Access-Control-Allow-Methods"]
        refused = await cors_client.options(
            _fill(path), headers={"Origin": "https://evil.example", "Access-Control-Request-Method": method}
        )
        assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers


async def test_a_cross_origin_delete_cancels_the_job(cors_client: TestClient) -> None:
    """The preflighted request itself: DELETE from the allowed origin cancels, and the page may read the answer."""
    created = await cors_client.post("/api/mv/generate_video", json={"prompt": "a lighthouse at dusk", "duration": 4})
    job_id = (await created.json())["job_id"]
    response = await cors_client.delete(f"/api/mv/jobs/{job_id}", headers={"Origin": ALLOWED})
    assert response.status == 200, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert (await response.json())["status"] == "canceled"


# -- media elements on another site -----------------------------------------------------------------------------------

MEDIA = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "video"}  # no Origin


async def test_a_signed_media_get_from_another_site_passes_and_writes_stay_guarded(
    make_client: AppClient, tmp_path
) -> None:
    """What ``<video src=signed link>`` on a page of another site sends: no ``Origin``, ``Sec-Fetch-Site:
    cross-site``. It is a safe GET with a valid signature, so it passes; a state-changing request from another site
    is still refused, and a safe GET without a valid signature still needs one."""
    from mvserver.web.access.auth import create_key

    _, key = create_key(tmp_path / "keys.yaml", "page")
    client = await make_client(
        MV_API_KEYS_FILE=tmp_path / "keys.yaml",
        MV_CORS_ORIGINS=ALLOWED,
        MV_URL_SIGNING_SECRET="test-signing-secret-0123456789abcdefghij",
    )
    bearer = {"Authorization": f"Bearer {key}"}
    created = await client.post(
        "/api/mv/generate_character_reference",
        headers=bearer,
        json={"character_description": "a tall woman in a red coat"},
    )
    assert created.status == 200, await created.text()
    signed = (await created.json())["signed_urls"]["image_url"]
    for method in ("GET", "HEAD"):
        response = await client.request(method, signed, headers={**MEDIA, "Sec-Fetch-Dest": "image"})
        assert response.status == 200, (method, await response.text())
        assert response.content_type.startswith("image/")
    ranged = await client.get(signed, headers={**MEDIA, "Range": "bytes=0-15"})
    assert ranged.status == 206 and len(await ranged.read()) == 16

    unsigned = await client.get(signed.split("?")[0], headers=MEDIA)
    assert unsigned.status == 401  # the guard lets it by; the key check still wants a key
    tampered = await client.get(signed.replace("sig=", "sig=A"), headers=MEDIA)
    assert tampered.status == 403 and (await tampered.json())["error"]["code"] == "invalid_signature"

    job = await client.post(
        "/api/mv/generate_video", json={"prompt": "a lighthouse at dusk", "duration": 4}, headers=bearer
    )
    job_id = (await job.json())["job_id"]
    for method, path in (("DELETE", f"/api/mv/jobs/{job_id}"), ("POST", f"/api/mv/jobs/{job_id}/cancel")):
        response = await client.request(method, path, headers={**bearer, "Sec-Fetch-Site": "cross-site"})
        assert response.status == 403, (method, await response.text())
        assert (await response.json())["error"] == {
            "code": "forbidden_origin",
            "field": "Origin",
            "message": "a request from another site must carry an allowed Origin",
        }
    assert (await (await client.get(f"/api/mv/jobs/{job_id}", headers=bearer)).json())["status"] != "canceled"
    assert (await client.delete(f"/api/mv/jobs/{job_id}", headers=bearer)).status == 200
