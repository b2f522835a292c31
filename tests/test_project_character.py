"""A project's character candidates: ``number_of_images`` on ``POST .../character``, kept on the record and listed
again when the project is read; on both project stores."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient

pytestmark = pytest.mark.both_stores
BASE = "/api/mv/projects"


@pytest.fixture
async def app_client(make_client: AppClient, store_env: dict[str, str]) -> TestClient:
    return await make_client(**store_env)


async def new_project(client: TestClient) -> str:
    response = await client.post(BASE, json={"idea": "a rooftop party", "character_description": "a tabby cat DJ"})
    assert response.status == 201, await response.text()
    return (await response.json())["project_id"]


async def test_candidates_are_kept_on_the_project_and_listed_on_reload(app_client: TestClient) -> None:
    pid = await new_project(app_client)
    response = await app_client.post(f"{BASE}/{pid}/character", json={"number_of_images": 3, "seed": 11})
    assert response.status == 200, await response.text()
    body = await response.json()
    ids = [image["image_id"] for image in body["image"]["images"]]
    assert len(set(ids)) == 3
    assert body["project"]["character_image_id"] == ids[0]

    response = await app_client.get(f"{BASE}/{pid}")
    project = await response.json()
    candidates = project["character_candidates"]
    assert [c["image_id"] for c in candidates] == ids
    assert [c["seed"] for c in candidates] == [11, 12, 13]
    assert all(
        c["image_url"] == f"/api/mv/get_image/{c['image_id']}" and c["mime_type"] == "image/png" for c in candidates
    )
    for candidate in candidates:
        assert (await app_client.get(candidate["image_url"])).status == 200

    # the user picks the second one; the candidates stay for the next reload
    response = await app_client.patch(
        f"{BASE}/{pid}", json={"character_image_id": ids[1]}, headers={"If-Match": project["etag"]}
    )
    assert response.status == 200, await response.text()
    picked = await response.json()
    assert picked["character_image_id"] == ids[1]
    assert [c["image_id"] for c in picked["character_candidates"]] == ids

    # a new render replaces them (one image by default)
    response = await app_client.post(f"{BASE}/{pid}/character", json={})
    body = await response.json()
    assert [c["image_id"] for c in body["project"]["character_candidates"]] == [body["image"]["image_id"]]


@pytest.mark.parametrize("count", [0, 5, 2.5, "3"])
async def test_the_count_is_checked_against_the_images_settings(app_client: TestClient, count: object) -> None:
    pid = await new_project(app_client)
    response = await app_client.post(f"{BASE}/{pid}/character", json={"number_of_images": count})
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert (error["code"], error["field"]) == ("invalid_field", "number_of_images")
    project = await (await app_client.get(f"{BASE}/{pid}")).json()
    assert project["character_candidates"] == [] and project["etag"] == '"1"'  # nothing rendered, nothing written
