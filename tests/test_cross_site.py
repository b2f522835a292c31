"""What a page on another origin may do: CORS preflights for every route and method, and media GETs (``<img>``,
``<video>``, ``<audio>``) that browsers send without ``Origin``."""

from __future__ import annotations

import uuid

import pytest
from aiohttp.test_utils import TestClient

from conftest import AppClient

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
    routes = {(route.method, route.resource.canonical) for route in cors_client.app.router.routes()
              if route.method not in ("OPTIONS", "HEAD", "*") and route.resource is not None}
    assert ("DELETE", "/api/mv/jobs/{job_id}") in routes
    for method, path in sorted(routes):
        response = await cors_client.options(_fill(path), headers={
            "Origin": ALLOWED, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert response.status == 200, (method, path, await response.text())
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert method in response.headers["Access-Control-Allow-Methods"]
        refused = await cors_client.options(_fill(path), headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": method})
        assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers


async def test_a_cross_origin_delete_cancels_the_job(cors_client: TestClient) -> None:
    """The preflighted request itself: DELETE from the allowed origin cancels, and the page may read the answer."""
    created = await cors_client.post("/api/mv/generate_video", json={"prompt": "a lighthouse at dusk", "duration": 4})
    job_id = (await created.json())["job_id"]
    response = await cors_client.delete(f"/api/mv/jobs/{job_id}", headers={"Origin": ALLOWED})
    assert response.status == 200, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert (await response.json())["status"] == "canceled"
