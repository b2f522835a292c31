"""Artefacts in object storage through the HTTP routes (moto's S3 server): a job's output is in the bucket when it
succeeds, artefact routes answer a redirect to a presigned link only after their access checks (or stream the
object, ``MV_STORAGE_DELIVERY=proxy``), and nothing is written to the output directory's artefact folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, events_of, submit, two_key_client
from object_store import S3Server

from mvserver.appkeys import ARTEFACTS, ASSEMBLY_DEPS, JOBS
from mvserver.assembly.service import AssemblyDriver
from mvserver.core.config import ConfigError
from mvserver.core.object_artefacts import ObjectArtefacts

pytestmark = pytest.mark.both_backends


def bucket_keys(server: S3Server, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in server.client.list_objects_v2(Bucket=bucket).get("Contents", []))


def artefact_files(outputs: Path) -> list[str]:
    """Files under the output directory's artefact folders (records and heartbeats are not artefacts)."""
    return sorted(
        str(path.relative_to(outputs))
        for kind in ("videos", "images", "scenes", "audio")
        for path in (outputs / kind).glob("*")
        if path.is_file()
    )


async def submit_as(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = await client.post(
        "/api/mv/generate_video",
        json={"prompt": "A lighthouse keeper waltzes with the beam.", "duration": 4},
        headers=headers,
    )
    assert response.status == 202, await response.text()
    return await response.json()


@pytest.mark.artefact_backends("s3")
async def test_a_clip_is_in_the_bucket_when_its_job_succeeds_and_get_video_redirects(
    client: TestClient, s3_server: S3Server, s3_bucket: str, live_env: dict[str, str]
) -> None:
    assert isinstance(client.app[ARTEFACTS], ObjectArtefacts)
    accepted = await submit(client)
    events = await events_of(client, accepted["job_id"])
    assert events[-1]["event"] == "succeeded"
    key = f"mv/videos/{accepted['job_id']}.mp4"
    assert key in bucket_keys(s3_server, s3_bucket)
    head = s3_server.client.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == events[-1]["data"]["video_bytes"]

    answer = await client.get(accepted["video_url"], allow_redirects=False)
    assert answer.status == 302 and answer.headers["Cache-Control"] == "no-store"
    link = urlsplit(answer.headers["Location"])
    assert link.path == f"/{s3_bucket}/{key}"
    assert dict(parse_qsl(link.query))["X-Amz-Expires"] == "21600"
    followed = await client.get(accepted["video_url"], headers={"Range": "bytes=0-7"})  # as a <video> starts
    assert followed.status == 206 and (await followed.read())[4:8] == b"ftyp"
    assert artefact_files(Path(live_env["MV_OUTPUT_DIR"])) == []  # no artefact on this node's disk


@pytest.mark.artefact_backends("s3")
async def test_the_access_checks_come_before_the_redirect(make_client: AppClient, tmp_path: Path) -> None:
    client, alice, bob = await two_key_client(make_client, tmp_path)
    accepted = await submit_as(client, {"Authorization": f"Bearer {alice}"})
    async with client.get(
        f"/api/mv/jobs/{accepted['job_id']}/events", headers={"Authorization": f"Bearer {alice}"}
    ) as response:
        assert response.status == 200
        await response.read()
    url = accepted["video_url"]
    anonymous = await client.get(url, allow_redirects=False)
    assert anonymous.status == 401 and "Location" not in anonymous.headers
    other = await client.get(url, headers={"Authorization": f"Bearer {bob}"}, allow_redirects=False)
    assert other.status == 404 and "Location" not in other.headers
    owner = await client.get(url, headers={"Authorization": f"Bearer {alice}"}, allow_redirects=False)
    assert owner.status == 302 and owner.headers["Cache-Control"] == "no-store"
    signed = accepted["signed_urls"]["video_url"]
    by_link = await client.get(signed, allow_redirects=False)  # a signed link, no key: the page's <video>
    assert by_link.status == 302 and by_link.headers["Location"].startswith("http://127.0.0.1:")


@pytest.mark.artefact_backends("s3-proxy")
async def test_proxy_delivery_streams_the_object_through_the_server(client: TestClient) -> None:
    accepted = await submit(client)
    assert (await events_of(client, accepted["job_id"]))[-1]["event"] == "succeeded"
    whole = await client.get(accepted["video_url"], allow_redirects=False)
    assert whole.status == 200 and whole.headers["Content-Type"] == "video/mp4"
    body = await whole.read()
    part = await client.get(accepted["video_url"], headers={"Range": "bytes=4-7"}, allow_redirects=False)
    assert part.status == 206 and await part.read() == body[4:8] == b"ftyp"
    cached = await client.get(accepted["video_url"], headers={"If-None-Match": whole.headers["ETag"]})
    assert cached.status == 304


@pytest.mark.artefact_backends("local", "s3", "s3-proxy")
@pytest.mark.parametrize("page", ["/", "/single"])
async def test_the_pages_allow_media_and_images_from_where_artefact_routes_redirect(
    client: TestClient, s3_server: S3Server, artefact_backend: str, page: str
) -> None:
    """A <video> follows get_video's 302 to the bucket, and the browser checks the target against the page's policy:
    with redirects on, the bucket's origin is allowed for media and images (and nothing else); otherwise only 'self'."""
    answer = await client.get(page)
    assert answer.status == 200
    policy = dict(part.strip().split(" ", 1) for part in answer.headers["Content-Security-Policy"].split(";"))
    bucket = s3_server.endpoint if artefact_backend == "s3" else None
    assert policy["media-src"] == " ".join(filter(None, ["'self'", bucket]))
    assert policy["img-src"] == " ".join(filter(None, ["'self'", bucket, "data:"]))
    assert policy["default-src"] == policy["connect-src"] == "'self'"


@pytest.mark.artefact_backends("s3")
async def test_a_busy_scratch_directory_stops_the_start_up(make_client: AppClient, tmp_path: Path) -> None:
    await make_client()  # holds MV_SCRATCH_DIR
    with pytest.raises(ConfigError, match="MV_SCRATCH_DIR"):
        await make_client()


async def test_an_assembly_run_again_keeps_the_film_its_earlier_run_stored(client: TestClient) -> None:
    """The film is stored create-only: a run of the same job again (its node lost after the put, before the job's
    record said so) assembles, finds the film there and keeps it, so nobody ever sees it replaced."""
    clip = await submit(client)
    assert (await events_of(client, clip["job_id"]))[-1]["event"] == "succeeded"
    response = await client.post("/api/mv/assemble", json={"clips": [{"job_id": clip["job_id"]}]})
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    assert (await events_of(client, job_id))[-1]["event"] == "succeeded"
    store, key = client.app[ARTEFACTS], f"videos/{job_id}.mp4"
    before = await store.stat(key)
    assert before is not None
    job = await client.app[JOBS].store.get(job_id)
    assert job is not None

    async def progress(fraction: float | None, stage: str) -> None:
        pass

    size = await AssemblyDriver(client.app[ASSEMBLY_DEPS]).run(job, key, progress)
    after = await store.stat(key)
    assert after is not None and size == before.size and (after.etag, after.mtime) == (before.etag, before.mtime)
