"""With keys on, every answer and event that names a resource a browser loads carries its signed twin.

The whole project flow runs with a key (song upload, project, scenes, candidate images, character, every clip,
a regeneration, lip sync, assembly, listing, timeline, event streams), and every ``*_url`` field (and every entry of a
``urls`` object) of every JSON answer must have a ``signed_urls`` entry next to it that a request without the key
may load. The walk below is the test's own, not the server's helper."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, read_sse, song_bytes

from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import KeyLimits, create_key

SECRET = "test-signing-secret-0123456789abcdefghij"
PROJECTS = "/api/mv/projects"


def unsigned(url: Any) -> bool:
    return isinstance(url, str) and url.startswith("/api/mv/") and "sig" not in parse_qs(urlsplit(url).query)


def links(value: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any], str, str]]:
    """Every (place, object, field, URL) in a JSON value that names a resource of the API by a plain (not yet
    signed) path."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from links(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            if name == "signed_urls":
                continue
            if name.endswith("_url") and unsigned(item):
                yield where, value, name, item
            elif name == "urls" and isinstance(item, dict):
                for entry, url in item.items():
                    if unsigned(url):
                        yield where, value, entry, url
            else:
                yield from links(item, f"{where}.{name}")


class Checker:
    """Checks answers as the flow goes: every link has a signed twin for the key, and the twin opens without it."""

    def __init__(self, client: TestClient, key_id: str):
        self.client = client
        self.key_id = key_id
        self.seen: set[str] = set()
        self.count = 0

    async def check(self, label: str, body: Any, *, minimum: int = 1) -> Any:
        found = list(links(body))
        assert len(found) >= minimum, (label, body)
        for where, owner, name, url in found:
            twin = (owner.get("signed_urls") or {}).get(name)
            assert twin, f"{label}: {where}.{name} = {url} has no signed twin"
            parts = urlsplit(twin)
            query = parse_qs(parts.query)
            assert parts.path == urlsplit(url).path and query["kid"] == [self.key_id], (label, twin)
            assert "expires_at" in owner["signed_urls"]
            self.count += 1
            if twin in self.seen:
                continue
            self.seen.add(twin)
            async with self.client.get(twin) as response:  # no Authorization header
                assert response.status not in (401, 403), (label, name, response.status, await response.text())
        return body


async def ok(response: Any, status: int) -> Any:
    assert response.status == status, await response.text()
    return await response.json()


@pytest.fixture
async def keyed(make_client: AppClient, tmp_path: Path) -> tuple[TestClient, dict[str, str], str]:
    record, key = create_key(
        tmp_path / "keys.yaml", "page", KeyLimits(jobs_per_minute=600, jobs_burst=50, max_running_jobs=10)
    )
    client = await make_client(MV_API_KEYS_FILE=tmp_path / "keys.yaml", MV_URL_SIGNING_SECRET=SECRET)
    return client, {"Authorization": f"Bearer {key}"}, record.id


async def finals(client: TestClient, url: str) -> dict[str, dict[str, Any]]:
    """The final event of each job of a stream, by job id."""
    ended: dict[str, dict[str, Any]] = {}
    async with client.get(url, timeout=120) as stream:
        assert stream.status == 200, await stream.text()
        async for event in read_sse(stream):
            if event["event"] in ("succeeded", "failed", "canceled"):
                ended[event["data"]["job_id"]] = event
    return ended


async def test_every_link_of_the_project_flow_has_a_signed_twin(
    keyed: tuple[TestClient, dict[str, str], str], sim: Simulator
) -> None:
    client, auth, key_id = keyed
    check = Checker(client, key_id).check
    song = await check(
        "upload",
        await ok(
            await client.post(
                "/api/mv/upload_audio", data=song_bytes(10.0), headers={**auth, "Content-Type": "audio/mpeg"}
            ),
            201,
        ),
    )
    project = await check(
        "create",
        await ok(
            await client.post(
                PROJECTS,
                headers=auth,
                json={"idea": "a night train", "character_description": "a singer", "audio_id": song["audio_id"]},
            ),
            201,
        ),
    )
    pid = project["project_id"]
    assert project["song"]["audio_url"] == song["audio_url"]
    await check("write_scenes", await ok(await client.post(f"{PROJECTS}/{pid}/write_scenes", headers=auth), 200))
    candidates = await check(
        "candidates",
        await ok(
            await client.post(
                "/api/mv/generate_character_reference",
                headers=auth,
                json={"character_description": "a singer", "number_of_images": 3},
            ),
            200,
        ),
        minimum=4,
    )
    assert all(image["signed_urls"]["image_url"] for image in candidates["images"])
    character = await check("character", await ok(await client.post(f"{PROJECTS}/{pid}/character", headers=auth), 200))
    assert character["project"]["signed_urls"]["character_image_url"]
    started = await check(
        "clips",
        await ok(await client.post(f"{PROJECTS}/{pid}/clips", headers=auth, json={"generate_audio": False}), 202),
        minimum=6,
    )
    jobs = [job["job_id"] for job in started["jobs"]]
    assert jobs and all(job["signed_urls"]["video_url"] for job in started["jobs"])

    # The multi-job stream, opened through its signed link and without the key, ends each job with an event whose
    # signed video link plays: the page needs no further request per clip.
    stream = await ok(await client.get(f"/api/mv/events/link?jobs={','.join(jobs)}", headers=auth), 200)
    assert "sig=" in stream["events_url"] and "signed_urls" not in stream  # signed already: it needs no twin
    ended = await finals(client, stream["events_url"])
    assert set(ended) == set(jobs)
    for event in ended.values():
        assert event["event"] == "succeeded"
        await check("final event", event["data"])
        async with client.get(event["data"]["signed_urls"]["video_url"]) as video:
            assert video.status == 200 and video.content_type == "video/mp4"
    one = await finals(client, (started["jobs"][0]["signed_urls"]["events_url"]))  # a job's own stream too
    await check("final event of one job", one[jobs[0]]["data"])

    current = await check(
        "project", await ok(await client.get(f"{PROJECTS}/{pid}", headers=auth), 200), minimum=2 * len(jobs) + 2
    )
    assert all(scene["signed_urls"]["chosen_video_url"] for scene in current["scenes"])
    assert all(version["signed_urls"]["video_url"] for scene in current["scenes"] for version in scene["versions"])
    scene = current["scenes"][0]["id"]
    again = await check(
        "regenerate",
        await ok(
            await client.post(f"{PROJECTS}/{pid}/scenes/{scene}/clips", headers=auth, json={"generate_audio": False}),
            202,
        ),
    )
    await finals(client, again["job"]["signed_urls"]["events_url"])
    synced = await check(
        "lipsync", await ok(await client.post(f"{PROJECTS}/{pid}/scenes/{scene}/lipsync", headers=auth, json={}), 202)
    )
    await finals(client, synced["job"]["signed_urls"]["events_url"])
    await check("timeline", await ok(await client.get(f"{PROJECTS}/{pid}/timeline", headers=auth), 200))
    assembly = await check(
        "assemble", await ok(await client.post(f"{PROJECTS}/{pid}/assemble", headers=auth, json={}), 202)
    )
    final = await finals(client, assembly["signed_urls"]["events_url"])
    video = await check("final video", final[assembly["job_id"]]["data"])
    async with client.get(video["signed_urls"]["video_url"], headers={"Range": "bytes=0-99"}) as part:
        assert part.status == 206
    await check("job", await ok(await client.get(f"/api/mv/jobs/{assembly['job_id']}", headers=auth), 200))
    await check(
        "listing", await ok(await client.get("/api/mv/jobs?limit=100", headers=auth), 200), minimum=3 * (len(jobs) + 3)
    )
    await check(
        "scenes",
        await ok(
            await client.post(
                "/api/mv/create_scenes",
                headers=auth,
                json={"idea": "a night train", "character_description": "a singer", "number_of_scenes": 1},
            ),
            200,
        ),
        minimum=2,
    )


async def test_a_replayed_answer_carries_fresh_links_and_keys_off_answers_carry_none(
    keyed: tuple[TestClient, dict[str, str], str], make_client: AppClient, sim: Simulator
) -> None:
    client, auth, key_id = keyed
    sim.video_latency = 30
    body = {"prompt": "a heron learns the trumpet", "duration": 4}
    headers = {**auth, "Idempotency-Key": "fresh-links"}
    first = await ok(await client.post("/api/mv/generate_video", json=body, headers=headers), 202)
    replay = await client.post("/api/mv/generate_video", json=body, headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    again = await ok(replay, 202)
    assert again["job_id"] == first["job_id"]
    await Checker(client, key_id).check("replay", again, minimum=3)  # kept unsigned, signed on the way out

    plain = await make_client()
    answer = await ok(await plain.post("/api/mv/generate_video", json=body), 202)
    assert answer["video_url"] and "signed_urls" not in answer
    assert await ok(await plain.get("/api/mv/me"), 200) == {
        "key_id": None,
        "name": None,
        "limits": None,
        "tokens": None,
        "jobs": None,
    }
