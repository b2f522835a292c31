"""Projects through the HTTP API against the simulator, on both project stores (files, and a real redis-server)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import yaml
from aiohttp.test_utils import TestClient
from helpers import AppClient, artefact_json, artefact_keys, free_port, make_song

from mvserver.appkeys import PROJECTS
from mvserver.core.artefacts import OutputStore, new_id
from mvserver.core.errors import ApiError
from mvserver.projects.service import TimelineEntry, project_timeline, size_to_song
from mvserver.projects.store import FileProjectStore, Project, RedisProjectStore, Scene
from mvserver.sandbox.app import Simulator

BASE = "/api/mv/projects"
IDEA = "A tabby cat DJ plays a rooftop party at dusk"
CHARACTER = "an orange tabby cat in neon headphones and a silver bomber jacket"


pytestmark = pytest.mark.both_stores  # projects and their clip jobs on files, then on a private Redis


@pytest.fixture
async def app_client(make_client: AppClient, store_env: dict[str, str]) -> TestClient:
    return await make_client(**store_env)


# -- helpers -------------------------------------------------------------------------------------------------------


async def create(client: TestClient, **body: Any) -> tuple[dict[str, Any], str]:
    response = await client.post(BASE, json={"idea": IDEA, "character_description": CHARACTER, **body})
    assert response.status == 201, await response.text()
    project = await response.json()
    assert response.headers["Location"] == f"{BASE}/{project['project_id']}"
    assert response.headers["ETag"] == project["etag"] == '"1"'
    return project, response.headers["ETag"]


async def get(client: TestClient, project_id: str) -> tuple[dict[str, Any], str]:
    response = await client.get(f"{BASE}/{project_id}")
    assert response.status == 200, await response.text()
    return await response.json(), response.headers["ETag"]


async def patch(
    client: TestClient, project_id: str, body: dict[str, Any], etag: str | None, status: int = 200
) -> dict[str, Any]:
    headers = {"If-Match": etag} if etag is not None else {}
    response = await client.patch(f"{BASE}/{project_id}", json=body, headers=headers)
    assert response.status == status, await response.text()
    payload = await response.json()
    if status == 200:
        assert response.headers["ETag"] == payload["etag"]
    return payload


async def wait_jobs(client: TestClient, job_ids: list[str], timeout: float = 30.0) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            states = [await (await client.get(f"/api/mv/jobs/{job_id}")).json() for job_id in job_ids]
            if all(s["status"] in ("succeeded", "failed", "canceled") for s in states):
                return states
            await asyncio.sleep(0.05)


def error_of(payload: dict[str, Any]) -> tuple[str, str | None]:
    return payload["error"]["code"], payload["error"].get("field")


# -- pure functions ------------------------------------------------------------------------------------------------


def test_size_to_song_covers_the_song_with_the_fewest_scenes_and_least_overshoot() -> None:
    assert size_to_song(28, [4, 6, 8], 24) == [8, 8, 8, 4]
    assert size_to_song(30, [4, 6, 8], 24) == [8, 8, 8, 6]
    assert size_to_song(17, [4, 6, 8], 24) == [8, 6, 4]
    assert size_to_song(33, [4, 6, 8], 24) == [8, 8, 8, 6, 4]
    assert size_to_song(8, [4, 6, 8], 24) == [8]
    assert size_to_song(0.5, [4, 6, 8], 24) == [4]
    for length in (1, 7.5, 12, 13, 47.9, 96, 191):
        durations = size_to_song(length, [4, 6, 8], 24)
        assert sum(durations) >= length
        assert sum(durations) - length < 2 or durations == [4]  # sums are even: never 2 s more than needed
        assert len(durations) == -(-length // 8)
    with pytest.raises(ApiError) as caught:
        size_to_song(193, [4, 6, 8], 24)
    assert caught.value.info.field == "audio_id" and caught.value.info.code == "too_many_scenes"


def test_project_timeline_gives_each_scene_its_song_window_after_trims() -> None:
    from mvserver.projects.store import ClipVersion, Song

    short = ClipVersion(job_id=new_id(), duration=4)
    scenes = [
        Scene(id=new_id(), duration=8, trim_in=1.0, trim_out=7.0, chosen_job_id=None),
        Scene(id=new_id(), duration=8, trim_in=0.0, trim_out=8.0, versions=[short], chosen_job_id=short.job_id),
        Scene(id=new_id(), duration=6, trim_in=0.5, trim_out=6.0),
    ]
    project = Project(
        id=new_id(),
        idea="i",
        character_description="c",
        aspect_ratio="16:9",
        scenes=scenes,
        song=Song(audio_id=new_id(), offset=2.5, duration=60.0),
    )
    timeline = project_timeline(project)
    assert [type(e) for e in timeline] == [TimelineEntry] * 3
    assert [(e.scene.id, e.job_id) for e in timeline] == [
        (scenes[0].id, None),
        (scenes[1].id, short.job_id),
        (scenes[2].id, None),
    ]
    # the second scene's chosen clip is 4 s long: its trims are cut to the clip
    assert [(e.trim_in, e.trim_out) for e in timeline] == [(1.0, 7.0), (0.0, 4.0), (0.5, 6.0)]
    assert [e.song_start for e in timeline] == [2.5, 8.5, 12.5]
    project.song = None
    assert [e.song_start for e in project_timeline(project)] == [None, None, None]


# -- the stores ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "redis"])
async def test_store_compare_and_set_lets_exactly_one_of_concurrent_writers_win(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "file":
        store: Any = FileProjectStore(OutputStore(tmp_path / "outputs"))
    else:
        store = RedisProjectStore(redis.asyncio.from_url(request.getfixturevalue("redis_url")), prefix=f"t:{new_id()}:")
    try:
        project = Project(id=new_id(), idea="i", character_description="c", aspect_ratio="16:9")
        assert await store.put(project, 0) and project.version == 1
        assert not await store.put(project.model_copy(), 0)  # it exists already
        copies = [project.model_copy(update={"idea": f"edit {n}"}) for n in range(20)]
        results = await asyncio.gather(*(store.put(copy, 1) for copy in copies))
        assert sum(results) == 1
        stored = await store.get(project.id)
        assert stored is not None and stored.version == 2
        assert stored.idea == copies[results.index(True)].idea
        assert await store.get(new_id()) is None
    finally:
        await store.close()


# -- the whole flow ------------------------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_project_flow_from_song_to_clips_edits_regeneration_and_restart(
    make_client: AppClient, store_env: dict[str, str], sim: Simulator
) -> None:
    client = await make_client(**store_env)
    audio_id = await make_song(client, 30.0, "m4a")

    project, etag = await create(client, audio_id=audio_id, audio_offset=2.0, style="neon noir, slow dolly shots")
    pid = project["project_id"]
    assert [s["duration"] for s in project["scenes"]] == [8, 8, 8, 4]  # 28 s of song after the offset
    assert project["song"] == {
        "audio_id": audio_id,
        "offset": 2.0,
        "duration": 30.0,
        "sized_by": "length",
        "sizing_note": "song analysis is off (MV_ANALYSIS_WORKERS=0)",
        "audio_url": f"/api/mv/get_audio/{audio_id}",
    }
    assert project["character_image_url"] is None
    assert project["total_seconds"] == 28.0
    assert [s["song_start"] for s in project["scenes"]] == [2.0, 10.0, 18.0, 26.0]
    scene_ids = [s["id"] for s in project["scenes"]]

    # Gemini writes the prompts into the existing scenes; the style reaches the prompt Gemini was sent
    response = await client.post(f"{BASE}/{pid}/write_scenes", headers={"If-Match": etag})
    assert response.status == 200, await response.text()
    project = await response.json()
    assert [s["id"] for s in project["scenes"]] == scene_ids
    assert all(s["prompt"] and s["negative_prompt"] for s in project["scenes"])
    assert project["etag"] == response.headers["ETag"] == '"2"'
    scene_files = [key for key in await artefact_keys(client, "scenes") if key.endswith(".json")]
    assert len(scene_files) == 1
    assert (await artefact_json(client, scene_files[0]))["metadata"]["parameters"][
        "video_characteristics"
    ] == "neon noir, slow dolly shots"

    response = await client.post(f"{BASE}/{pid}/character", json={"output_format": "png"})
    assert response.status == 200, await response.text()
    body = await response.json()
    image_id = body["image"]["image_id"]
    assert body["project"]["character_image_id"] == image_id and "image_base64" not in body["image"]
    assert (await client.get(body["image"]["image_url"])).status == 200

    # all missing clips: one video job per scene, linked to the project
    response = await client.post(f"{BASE}/{pid}/clips")
    assert response.status == 202, await response.text()
    body = await response.json()
    jobs = body["jobs"]
    assert [j["scene_id"] for j in jobs] == scene_ids
    assert all(
        s["awaited_job_id"] == j["job_id"] and s["chosen_job_id"] is None
        for s, j in zip(body["project"]["scenes"], jobs, strict=False)
    )
    for job in jobs:
        record = await (await client.get(job["status_url"])).json()
        assert record["request"]["project_id"] == pid
        assert record["request"]["scene_id"] == job["scene_id"]
        # Replicate takes the character image only for 16:9 and 8 s; the 4 s scene goes without
        assert record["request"]["has_reference_image"] == (record["request"]["duration"] == 8)
        if record["request"]["has_reference_image"]:
            assert record["request"]["reference_image_id"] == image_id
    # the project's jobs, listed by project (newest first: the last scene's clip first)
    listed = (await (await client.get(f"/api/mv/jobs?project_id={pid}&kind=video")).json())["jobs"]
    assert [j["job_id"] for j in listed] == [j["job_id"] for j in jobs][::-1]
    assert all(j["project_id"] == pid for j in listed)
    assert {j["scene_id"] for j in listed} == set(scene_ids)
    # nothing missing any more: a second call starts nothing
    again = await (await client.post(f"{BASE}/{pid}/clips")).json()
    assert again["jobs"] == []
    states = await wait_jobs(client, [j["job_id"] for j in jobs])
    assert {s["status"] for s in states} == {"succeeded"}

    project, etag = await get(client, pid)
    for scene, job in zip(project["scenes"], jobs, strict=False):
        assert scene["chosen_job_id"] == job["job_id"]  # the awaited version became the chosen one
        assert scene["chosen_video_url"] == f"/api/mv/get_video/{job['job_id']}"
        assert [v["status"] for v in scene["versions"]] == ["succeeded"]
    assert etag == '"5"'  # write_scenes, character, clips: a job ending does not move the ETag

    # editing: PATCH needs If-Match; two editors from the same version: the second gets 412 and loses nothing
    reorder = {
        "order": [scene_ids[3], scene_ids[0], scene_ids[1], scene_ids[2]],
        "scenes": [{"id": scene_ids[0], "trim_in": 1.0, "trim_out": 7.5}],
    }
    assert error_of(await patch(client, pid, reorder, None, status=428)) == ("precondition_required", "If-Match")
    edited = await patch(client, pid, reorder, etag)
    assert [s["id"] for s in edited["scenes"]] == reorder["order"]
    assert edited["etag"] == '"6"'
    conflict = await patch(
        client, pid, {"scenes": [{"id": scene_ids[1], "prompt": "another editor"}]}, etag, status=412
    )
    assert error_of(conflict) == ("precondition_failed", "If-Match")
    project, etag = await get(client, pid)
    assert [s["id"] for s in project["scenes"]] == reorder["order"]
    assert project["scenes"][1]["prompt"] != "another editor"
    assert [s["song_start"] for s in project["scenes"]] == [2.0, 6.0, 12.5, 20.5]
    assert project["total_seconds"] == 26.5

    # regenerate scene 0: a new version, the old one stays chosen until the new one succeeds
    first = jobs[0]["job_id"]
    response = await client.post(f"{BASE}/{pid}/scenes/{scene_ids[0]}/clips", json={"seed": 7})
    assert response.status == 202, await response.text()
    body = await response.json()
    second = body["job"]["job_id"]
    assert response.headers["Location"] == f"/api/mv/jobs/{second}"
    scene = next(s for s in body["project"]["scenes"] if s["id"] == scene_ids[0])
    assert [v["job_id"] for v in scene["versions"]] == [first, second]
    assert scene["chosen_job_id"] == first and scene["awaited_job_id"] == second
    assert scene["versions"][1]["status"] in ("queued", "running")
    await wait_jobs(client, [second])
    project, etag = await get(client, pid)
    scene = next(s for s in project["scenes"] if s["id"] == scene_ids[0])
    assert scene["chosen_job_id"] == second and [v["status"] for v in scene["versions"]] == ["succeeded"] * 2
    assert (scene["trim_in"], scene["trim_out"]) == (1.0, 7.5)  # the new clip is as long: the trims stay

    # the old version can be chosen again
    chosen = await patch(client, pid, {"scenes": [{"id": scene_ids[0], "chosen_job_id": first}]}, etag)
    assert next(s for s in chosen["scenes"] if s["id"] == scene_ids[0])["chosen_job_id"] == first
    etag = chosen["etag"]

    # a regeneration while the user picks another version: the user's pick stands when it succeeds
    response = await client.post(f"{BASE}/{pid}/scenes/{scene_ids[0]}/clips")
    third = (await response.json())["job"]["job_id"]
    etag = response.headers["ETag"]
    await patch(client, pid, {"scenes": [{"id": scene_ids[0], "chosen_job_id": second}]}, etag)
    await wait_jobs(client, [third])
    project, etag = await get(client, pid)
    scene = next(s for s in project["scenes"] if s["id"] == scene_ids[0])
    assert scene["chosen_job_id"] == second and scene["awaited_job_id"] is None
    assert [v["job_id"] for v in scene["versions"]] == [first, second, third]

    # a regeneration that fails leaves the chosen clip alone
    sim.add_fault("replicate.create", "fail_prediction", error="E005: flagged")
    response = await client.post(f"{BASE}/{pid}/scenes/{scene_ids[1]}/clips")
    failed = (await response.json())["job"]["job_id"]
    assert (await wait_jobs(client, [failed]))[0]["status"] == "failed"
    project, etag = await get(client, pid)
    scene = next(s for s in project["scenes"] if s["id"] == scene_ids[1])
    assert scene["chosen_job_id"] == jobs[1]["job_id"]
    assert [v["status"] for v in scene["versions"]] == ["succeeded", "failed"]

    timeline = await (await client.get(f"{BASE}/{pid}/timeline")).json()
    assert [(e["scene_id"], e["job_id"], e["song_start"]) for e in timeline["entries"]] == [
        (scene_ids[3], jobs[3]["job_id"], 2.0),
        (scene_ids[0], second, 6.0),
        (scene_ids[1], jobs[1]["job_id"], 12.5),
        (scene_ids[2], jobs[2]["job_id"], 20.5),
    ]
    assert {e["status"] for e in timeline["entries"]} == {"succeeded"}

    # a restart: the record (and its versions' jobs) survive
    await client.close()
    client = await make_client(**store_env)
    restarted, restarted_etag = await get(client, pid)
    assert restarted_etag == etag
    assert restarted == project


@pytest.mark.both_backends
async def test_bad_input_is_a_400_naming_the_field(app_client: TestClient) -> None:
    client = app_client
    audio_id = await make_song(client, 20.0, "m4a")
    cases = [
        ({"audio_id": audio_id, "audio_offset": 20.0}, ("invalid_field", "audio_offset")),
        ({"audio_id": new_id()}, ("invalid_field", "audio_id")),
        ({"audio_offset": 3.0}, ("invalid_field", "audio_offset")),
        ({"number_of_scenes": 25}, ("invalid_field", "number_of_scenes")),
        ({"idea": "x" * 4001}, ("invalid_field", "idea")),
        ({"style": "s" * 201}, ("invalid_field", "style")),
        ({"aspect_ratio": "1:1"}, ("invalid_field", "aspect_ratio")),
        ({"colour": "red"}, ("unknown_field", "colour")),
    ]
    for extra, expected in cases:
        response = await client.post(BASE, json={"idea": IDEA, "character_description": CHARACTER, **extra})
        assert response.status == 400 and error_of(await response.json()) == expected, (extra, await response.text())
    long_song = await make_song(client, 200.0, "m4a")
    response = await client.post(BASE, json={"idea": IDEA, "character_description": CHARACTER, "audio_id": long_song})
    assert error_of(await response.json()) == ("too_many_scenes", "audio_id")

    project, etag = await create(client, audio_id=audio_id, number_of_scenes=2)
    pid, ids = project["project_id"], [s["id"] for s in project["scenes"]]
    assert [s["duration"] for s in project["scenes"]] == [8, 8]
    bad_patches = [
        ({"scenes": [{"id": new_id(), "prompt": "x"}]}, ("invalid_field", "scenes.0.id")),
        ({"scenes": [{"id": ids[0], "trim_out": 8.5}]}, ("invalid_field", "scenes.0.trim_out")),
        ({"scenes": [{"id": ids[0]}, {"id": ids[1], "trim_in": 7.8}]}, ("invalid_field", "scenes.1.trim_in")),
        ({"scenes": [{"id": ids[0], "trim_in": -1.0}]}, ("invalid_field", "scenes.0.trim_in")),
        ({"scenes": [{"id": ids[0], "duration": 5}]}, ("invalid_field", "scenes.0.duration")),
        ({"scenes": [{"id": ids[0], "chosen_job_id": new_id()}]}, ("invalid_field", "scenes.0.chosen_job_id")),
        ({"scenes": [{"id": ids[0]}, {"id": ids[0]}]}, ("invalid_field", "scenes.1.id")),
        ({"order": [ids[0]]}, ("invalid_field", "order")),
        ({"order": [ids[0], ids[0]]}, ("invalid_field", "order")),
        ({"remove_scenes": [new_id()]}, ("invalid_field", "remove_scenes.0")),
        ({"audio_offset": 20.5}, ("invalid_field", "audio_offset")),
        ({"add_scenes": [{}] * 23}, ("too_many_scenes", "add_scenes")),
        ({"character_image_id": new_id()}, ("invalid_field", "character_image_id")),
        ({"scenes": "all"}, ("invalid_field", "scenes")),
    ]
    for body, expected in bad_patches:
        payload = await patch(client, pid, body, etag, status=400)
        assert error_of(payload) == expected, (body, payload)
    assert (await get(client, pid))[1] == etag  # nothing was written

    # a scene without a prompt cannot get a clip; unknown scene ids and projects are 404
    response = await client.post(f"{BASE}/{pid}/clips")
    assert response.status == 400 and error_of(await response.json()) == ("missing_field", "scenes.0.prompt")
    response = await client.post(f"{BASE}/{pid}/scenes/{new_id()}/clips")
    assert response.status == 404
    response = await client.post(f"{BASE}/{pid}/clips", json={"prompt": "sneaky"})
    assert response.status == 400 and error_of(await response.json()) == ("unknown_field", "prompt")
    assert (await client.get(f"{BASE}/{new_id()}")).status == 404
    assert (await client.get(f"{BASE}/not-an-id")).status == 400
    response = await client.patch(f"{BASE}/{pid}", data=b"[1]", headers={"If-Match": etag})
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"

    # valid edits: remove, duration change resets trims, add, song removed
    edited = await patch(
        client,
        pid,
        {
            "remove_scenes": [ids[1]],
            "scenes": [{"id": ids[0], "duration": 6}],
            "add_scenes": [{"prompt": "an encore", "duration": 4}],
            "audio_id": None,
        },
        etag,
    )
    assert [(s["duration"], s["trim_out"], s["prompt"]) for s in edited["scenes"]] == [
        (6, 6.0, ""),
        (4, 4.0, "an encore"),
    ]
    assert edited["song"] is None and edited["scenes"][0]["song_start"] is None


async def test_write_scenes_fills_an_empty_project_and_never_drops_scenes(app_client: TestClient) -> None:
    project, etag = await create(app_client)
    pid = project["project_id"]
    assert project["scenes"] == []
    response = await app_client.post(f"{BASE}/{pid}/write_scenes", json={"number_of_scenes": 3})
    assert response.status == 200, await response.text()
    written = await response.json()
    assert [(bool(s["prompt"]), s["duration"], s["trim_out"]) for s in written["scenes"]] == [(True, 8, 8.0)] * 3
    response = await app_client.post(f"{BASE}/{pid}/write_scenes", json={"number_of_scenes": 2})
    assert response.status == 400 and error_of(await response.json()) == ("invalid_field", "number_of_scenes")
    response = await app_client.post(f"{BASE}/{pid}/write_scenes", headers={"If-Match": etag})
    assert response.status == 412  # written since: the client's version is stale
    response = await app_client.post(f"{BASE}/{pid}/write_scenes", json={"number_of_scenes": 25})
    assert response.status == 400 and error_of(await response.json()) == ("invalid_field", "number_of_scenes")


async def test_two_generate_all_requests_at_once_start_each_clip_once(app_client: TestClient) -> None:
    project, etag = await create(app_client, number_of_scenes=3)
    pid, ids = project["project_id"], [s["id"] for s in project["scenes"]]
    await patch(
        app_client, pid, {"scenes": [{"id": i, "prompt": f"scene {n}", "duration": 4} for n, i in enumerate(ids)]}, etag
    )
    responses = await asyncio.gather(*(app_client.post(f"{BASE}/{pid}/clips") for _ in range(2)))
    assert [r.status for r in responses] == [202, 202]
    started = [job for r in responses for job in (await r.json())["jobs"]]
    assert sorted(job["scene_id"] for job in started) == sorted(ids)
    project, _ = await get(app_client, pid)
    assert [len(s["versions"]) for s in project["scenes"]] == [1, 1, 1]
    assert {s["awaited_job_id"] for s in project["scenes"]} | {s["chosen_job_id"] for s in project["scenes"]} >= {
        job["job_id"] for job in started
    }
    await wait_jobs(app_client, [job["job_id"] for job in started])


async def test_twenty_generate_all_requests_at_once_create_one_set_of_predictions(
    app_client: TestClient, sim: Simulator
) -> None:
    """A double (or twentyfold) click: the scenes are claimed before any job exists, so one request starts every
    clip and the others start nothing: no duplicate job, no duplicate prediction to cancel."""
    project, etag = await create(app_client, number_of_scenes=3)
    pid, ids = project["project_id"], [s["id"] for s in project["scenes"]]
    await patch(
        app_client, pid, {"scenes": [{"id": i, "prompt": f"scene {n}", "duration": 4} for n, i in enumerate(ids)]}, etag
    )
    responses = await asyncio.gather(*(app_client.post(f"{BASE}/{pid}/clips") for _ in range(20)))
    assert [r.status for r in responses] == [202] * 20
    bodies = [await r.json() for r in responses]
    started = [job for body in bodies for job in body["jobs"]]
    assert sorted(job["scene_id"] for job in started) == sorted(ids)
    assert sorted(len(body["jobs"]) for body in bodies) == [0] * 19 + [3]
    listed = await (await app_client.get(f"/api/mv/jobs?project_id={pid}&limit=100")).json()
    assert sorted(job["job_id"] for job in listed["jobs"]) == sorted(job["job_id"] for job in started)
    finals = await wait_jobs(app_client, [job["job_id"] for job in started])
    assert [s["status"] for s in finals] == ["succeeded"] * 3
    assert len(list((sim.state_dir / "predictions").glob("*.json"))) == 3
    project, _ = await get(app_client, pid)
    assert [len(s["versions"]) for s in project["scenes"]] == [1, 1, 1]
    assert all("claim" not in s for s in project["scenes"])


async def test_a_scene_prompt_too_long_for_its_clip_is_refused_at_patch_naming_the_scene(
    app_client: TestClient,
) -> None:
    """The video rules are appended to a scene's prompt when its clip starts: a prompt that leaves them no room is
    refused when it is written (naming scenes.N.prompt), not later by the clips request."""
    project, etag = await create(app_client, number_of_scenes=2)
    pid, ids = project["project_id"], [s["id"] for s in project["scenes"]]
    long = ("a slow dolly shot across a neon rooftop " * 100).strip()  # 3,999 characters: within the text limit
    response = await app_client.patch(
        f"{BASE}/{pid}", json={"scenes": [{"id": ids[1], "prompt": long}]}, headers={"If-Match": etag}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["code"], error["field"]) == ("invalid_field", "scenes.0.prompt")
    excess = int(error["message"].rsplit(" ", 1)[1])
    response = await app_client.patch(
        f"{BASE}/{pid}", json={"add_scenes": [{"prompt": long}]}, headers={"If-Match": etag}
    )
    assert error_of(await response.json()) == ("invalid_field", "add_scenes.0.prompt")
    assert (await get(app_client, pid))[1] == etag  # nothing was written

    fitting = long[: len(long) - excess].rstrip()  # the longest prompt that leaves the rules their room
    patched = await patch(app_client, pid, {"scenes": [{"id": i, "prompt": fitting} for i in ids]}, etag)
    assert [s["prompt"] for s in patched["scenes"]] == [fitting, fitting]
    started = await app_client.post(f"{BASE}/{pid}/clips")
    assert started.status == 202, await started.text()
    await wait_jobs(app_client, [job["job_id"] for job in (await started.json())["jobs"]])

    # A record written before this check existed: its clip request names the scene too.
    stored = await app_client.app[PROJECTS].get(pid)
    stored.scenes[1].prompt, stored.scenes[1].chosen_job_id = long, None
    assert await app_client.app[PROJECTS].put(stored, stored.version)
    response = await app_client.post(f"{BASE}/{pid}/scenes/{ids[1]}/clips")
    assert response.status == 400 and error_of(await response.json()) == ("invalid_field", "scenes.1.prompt")


def test_a_prompt_the_server_writes_is_cut_to_leave_the_rules_their_room() -> None:
    from mvserver.core.config import EnvSettings, load_config
    from mvserver.projects.service import check_scene_prompt, fit_scene_prompt

    config = load_config(EnvSettings.from_env({}))
    project = Project(id=new_id(), idea="i", character_description="c", aspect_ratio="9:16")
    scene = Scene(id=new_id(), prompt="rain on a platform " * 220, duration=4, trim_out=4.0)
    with pytest.raises(ApiError):
        check_scene_prompt(config, project, scene, "scenes.0.prompt")
    fit_scene_prompt(config, project, scene)
    check_scene_prompt(config, project, scene, "scenes.0.prompt")
    assert scene.prompt.startswith("rain on a platform") and len(scene.prompt) > 3500


async def test_concurrent_patches_with_one_etag_exactly_one_wins(app_client: TestClient) -> None:
    project, etag = await create(app_client, number_of_scenes=3)
    pid, ids = project["project_id"], [s["id"] for s in project["scenes"]]
    bodies = [{"scenes": [{"id": ids[n % 3], "prompt": f"editor {n}"}]} for n in range(12)]
    responses = await asyncio.gather(
        *(app_client.patch(f"{BASE}/{pid}", json=b, headers={"If-Match": etag}) for b in bodies)
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] + [412] * 11
    winner = bodies[[r.status for r in responses].index(200)]["scenes"][0]
    project, etag = await get(app_client, pid)
    assert etag == '"2"'
    assert [s["prompt"] for s in project["scenes"] if s["id"] == winner["id"]] == [winner["prompt"]]
    # "*" matches any version
    await patch(app_client, pid, {"idea": "a new idea"}, "*")


async def test_versions_are_bounded_pruning_the_oldest_unchosen(
    make_client: AppClient, store_env: dict[str, str], settings_dir: Path
) -> None:
    path = settings_dir / "projects.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["limits"]["versions_per_scene_max"] = 2
    path.write_text(yaml.safe_dump(settings))
    client = await make_client(**store_env)
    project, etag = await create(client, number_of_scenes=1)
    pid, sid = project["project_id"], project["scenes"][0]["id"]
    await patch(client, pid, {"scenes": [{"id": sid, "prompt": "a cat on a roof", "duration": 4}]}, etag)

    async def regenerate(status: int = 202) -> dict[str, Any]:
        response = await client.post(f"{BASE}/{pid}/scenes/{sid}/clips")
        assert response.status == status, await response.text()
        return await response.json()

    v1 = (await regenerate())["job"]["job_id"]
    await wait_jobs(client, [v1])
    v2 = (await regenerate())["job"]["job_id"]
    # v1 chosen, v2 running and awaited: no room for a third
    assert error_of(await regenerate(409)) == ("too_many_versions", "scenes.0")
    await wait_jobs(client, [v2])
    v3 = (await regenerate())["job"]["job_id"]
    scene = (await get(client, pid))[0]["scenes"][0]
    assert [v["job_id"] for v in scene["versions"]] == [v2, v3]  # v1 (succeeded, no longer chosen) was pruned
    assert scene["chosen_job_id"] == v2
    await wait_jobs(client, [v3])


@pytest.mark.store_independent
async def test_the_openapi_document_describes_the_project_requests(app_client: TestClient) -> None:
    document = await (await app_client.get("/api/mv/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert {"CreateProjectRequest", "PatchProjectRequest", "ScenePatch", "NewScene"} <= set(schemas)
    patch_op = document["paths"]["/api/mv/projects/{project_id}"]["patch"]
    assert {"412", "428"} <= set(patch_op["responses"])
    assert any(p["name"] == "If-Match" and p["required"] for p in patch_op["parameters"])


async def test_an_unreachable_redis_is_a_503_not_a_crash() -> None:
    store = RedisProjectStore(redis.asyncio.from_url(f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(ApiError) as caught:
            await store.get(new_id())
        assert (caught.value.status, caught.value.info.code) == (503, "store_unavailable")
        project = Project(id=new_id(), idea="i", character_description="c", aspect_ratio="16:9")
        with pytest.raises(ApiError):
            await store.put(project, 0)
        assert project.version == 0
    finally:
        await store.close()
