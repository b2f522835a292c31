"""``GET /api/mv/get_video/{video_id}``: ranges, the JSON 416, caching headers, conditional requests and the 409s."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from helpers import LiveApp, events_of, module_loop, submit

from mvserver.sandbox.app import Simulator

pytestmark = [pytest.mark.both_stores, module_loop]


@pytest.fixture
def client(module_live: LiveApp) -> TestClient:
    """One app per job store for the module: each test makes its own jobs, or only reads the shared video."""
    return module_live[0]


@pytest.fixture
def sim(module_live: LiveApp) -> Simulator:
    return module_live[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def video(module_app: LiveApp) -> dict[str, Any]:
    """A finished job's final state and the bytes of its video (made once; the tests only read it)."""
    client = module_app[0]
    accepted = await submit(client)
    assert (await events_of(client, accepted["job_id"]))[-1]["event"] == "succeeded"
    final = await (await client.get(accepted["status_url"])).json()
    body = await (await client.get(final["video_url"])).read()
    assert len(body) == final["video_bytes"] > 1000
    return {"url": final["video_url"], "body": body, "size": len(body)}


async def test_the_video_is_served_with_cache_control_ranges_and_validators(
    client: TestClient, video: dict[str, Any]
) -> None:
    response = await client.get(video["url"])
    assert response.status == 200
    assert response.headers["Content-Type"] == "video/mp4"
    assert response.headers["Cache-Control"] == "private, max-age=3600"
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"] and response.headers["Last-Modified"]
    tail = await client.get(video["url"], headers={"Range": "bytes=-10"})
    assert tail.status == 206 and await tail.read() == video["body"][-10:]
    assert tail.headers["Content-Range"] == f"bytes {video['size'] - 10}-{video['size'] - 1}/{video['size']}"
    assert tail.headers["Cache-Control"] == "private, max-age=3600"


@pytest.mark.parametrize(
    "range_header",
    [
        "bytes={size}-",  # starts at the end
        "bytes={size_plus}-{size_plus2}",  # entirely past the end
        "bytes=0-1,5-9",  # multi-range: not served (RFC 9110 lets a server reject it)
        "bytes=9-2",  # last before first
    ],
)
async def test_an_unsatisfiable_range_is_a_json_416_with_the_size(
    client: TestClient, video: dict[str, Any], range_header: str
) -> None:
    size = video["size"]
    header = range_header.format(size=size, size_plus=size + 100, size_plus2=size + 200)
    response = await client.get(video["url"], headers={"Range": header})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{size}"
    assert response.headers["Content-Type"].startswith("application/json")
    error = (await response.json())["error"]
    assert error["code"] == "range_not_satisfiable" and error["field"] == "Range"
    assert error["message"] == f"the Range header must be one byte range inside the {size}-byte video"
    assert int(response.headers["Content-Length"]) == len(await response.read())


async def test_a_head_request_for_an_unsatisfiable_range_has_no_body(client: TestClient, video: dict[str, Any]) -> None:
    response = await client.head(video["url"], headers={"Range": f"bytes={video['size']}-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{video['size']}"
    assert await response.read() == b""


async def test_a_matching_etag_is_answered_304_without_the_video(client: TestClient, video: dict[str, Any]) -> None:
    etag = (await client.get(video["url"])).headers["ETag"]
    cached = await client.get(video["url"], headers={"If-None-Match": etag})
    assert cached.status == 304 and await cached.read() == b""
    assert cached.headers["ETag"] == etag
    assert cached.headers["Cache-Control"] == "private, max-age=3600"
    # A conditional request is decided before the range (RFC 9110 section 13.2.2): still 304, not 416.
    cached_range = await client.get(video["url"], headers={"If-None-Match": etag, "Range": f"bytes={video['size']}-"})
    assert cached_range.status == 304
    stale = await client.get(video["url"], headers={"If-None-Match": '"something-else"'})
    assert stale.status == 200 and await stale.read() == video["body"]


async def test_a_failed_job_answers_409_with_the_provider_fields(client: TestClient, sim: Simulator) -> None:
    sim.add_fault("replicate.create", "fail_prediction", error="E005: the input was flagged as sensitive")
    accepted = await submit(client)
    await events_of(client, accepted["job_id"])
    final = await (await client.get(accepted["status_url"])).json()
    response = await client.get(f"/api/mv/get_video/{accepted['job_id']}")
    assert response.status == 409
    error = (await response.json())["error"]
    assert error["code"] == "job_failed"
    assert error["provider"] == "replicate"
    assert error["provider_status"] == "failed"
    assert error["provider_error"] == "E005: the input was flagged as sensitive"
    assert final["error"]["message"] == "replicate prediction failed: E005: the input was flagged as sensitive"
    assert error["message"] == f"job {accepted['job_id']} is failed: {final['error']['message']}"


async def test_a_rejected_create_keeps_the_numeric_provider_status_in_the_409(
    client: TestClient, sim: Simulator
) -> None:
    sim.add_fault(
        "replicate.create",
        status=422,
        body={"title": "Input validation failed", "detail": "prompt too long", "status": 422},
    )
    accepted = await submit(client)
    await events_of(client, accepted["job_id"])
    error = (await (await client.get(f"/api/mv/get_video/{accepted['job_id']}")).json())["error"]
    assert error["code"] == "job_failed" and error["provider"] == "replicate" and error["provider_status"] == 422
    assert error["provider_error"]["detail"] == "prompt too long"


async def test_a_canceled_or_unfinished_job_answers_409_without_provider_fields(
    client: TestClient, sim: Simulator
) -> None:
    sim.video_latency = 30
    accepted = await submit(client)
    job_id = accepted["job_id"]
    not_ready = await client.get(f"/api/mv/get_video/{job_id}")
    assert not_ready.status == 409
    error = (await not_ready.json())["error"]
    assert error["code"] == "video_not_ready"
    assert error["message"].startswith(f"job {job_id} is ") and error["message"].endswith(")")  # "(<stage>)"
    assert not {"provider", "provider_status", "provider_error"} & set(error)
    await client.delete(accepted["status_url"])
    canceled = await client.get(f"/api/mv/get_video/{job_id}")
    assert canceled.status == 409
    error = (await canceled.json())["error"]
    assert error == {"code": "job_canceled", "message": f"job {job_id} is canceled: canceled by the client"}
