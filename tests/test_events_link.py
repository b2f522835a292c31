"""``GET /api/mv/events/link``: the multi-job stream's URL for an ``EventSource``, signed with keys on (the signature
covers the exact job list: tampered or expired links get 403), plain with keys off."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, read_sse

from mvserver.appkeys import SIGNER
from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import create_key

pytestmark = pytest.mark.both_stores

SECRET = "test-signing-secret-0123456789abcdefghij"
VIDEO = {"prompt": "a drummer on a rooftop", "duration": 4, "generate_audio": False}
FINAL = {"succeeded", "failed", "canceled"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def start(client: TestClient, headers: dict[str, str] | None = None) -> str:
    response = await client.post("/api/mv/generate_video", json=VIDEO, headers=headers)
    assert response.status == 202, await response.text()
    return (await response.json())["job_id"]


def with_params(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (None removes one), in their original order."""
    parts = urlsplit(url)
    pairs = [(k, changes.get(k, v)) for k, v in parse_qsl(parts.query) if changes.get(k, v) is not None]
    pairs += [(k, v) for k, v in changes.items() if v is not None and k not in dict(parse_qsl(parts.query))]
    return f"{parts.path}?{urlencode(pairs, safe=',')}"


async def error_code(response: Any) -> tuple[int, str]:
    return response.status, (await response.json())["error"]["code"]


async def test_a_signed_link_opens_the_multi_job_stream_without_a_header(
    make_client: AppClient, sim: Simulator, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.yaml"
    alice, bob = (create_key(keys_file, name)[1] for name in ("alice", "bob"))
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET)
    sim.video_latency = 0.3
    jobs = [await start(client, bearer(alice)) for _ in range(2)]
    other = await start(client, bearer(alice))
    theirs = await start(client, bearer(bob))

    query = f"jobs={','.join(jobs)}"
    assert (await client.get(f"/api/mv/events/link?{query}")).status == 401
    response = await client.get(f"/api/mv/events/link?{query}", headers=bearer(alice))
    assert response.status == 200, await response.text()
    link = await response.json()
    assert link["jobs"] == jobs and link["expires_at"]
    url = link["events_url"]
    assert url.startswith(f"/api/mv/events?{query}&kid=") and "sig=" in url and alice not in url
    # Another key's job cannot be put in a link: it is unknown to the caller.
    refused = await client.get(f"/api/mv/events/link?jobs={jobs[0]},{theirs}", headers=bearer(alice))
    assert await error_code(refused) == (404, "not_found")

    # The link alone opens the stream and carries every event of both jobs.
    async with client.get(url) as stream:
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        events = [event async for event in read_sse(stream)]
    finals = {event["data"]["job_id"] for event in events if event["event"] in FINAL}
    assert finals == set(jobs)

    # The signature covers the job list and every other parameter.
    tampered = [
        with_params(url, jobs=jobs[0]),  # fewer jobs
        with_params(url, jobs=f"{jobs[1]},{jobs[0]}"),  # reordered
        with_params(url, jobs=f"{jobs[0]},{jobs[1]},{other}"),  # more jobs, even the key's own
        with_params(url, jobs=f"{jobs[0]},{theirs}"),  # another key's job
        with_params(url, after="1.1"),  # a parameter added
        with_params(url, exp=str(int(dict(parse_qsl(urlsplit(url).query))["exp"]) + 60)),
        with_params(url, kid=bob.split("_")[1]),
        url + "&jobs=" + other,  # a second jobs parameter
        url.replace("/api/mv/events?", "/api/mv/events/link?"),  # another path
    ]
    for bad in tampered:
        assert await error_code(await client.get(bad)) == (403, "invalid_signature"), bad
    # Expired.
    expired, _ = client.app[SIGNER].sign(alice.split("_")[1], f"/api/mv/events?{query}", ttl=-5)
    assert await error_code(await client.get(expired)) == (403, "signature_expired")
    # A link with positions resumes there; its positions are signed too.
    resume = await (await client.get(f"/api/mv/events/link?{query}&after=1.1", headers=bearer(alice))).json()
    assert "&after=1.1&kid=" in resume["events_url"]
    async with client.get(resume["events_url"]) as stream:
        assert stream.status == 200
        resumed = [event async for event in read_sse(stream)]
    assert resumed and all(int(event["id"].split(".")[jobs.index(event["data"]["job_id"])]) >= 2 for event in resumed)
    assert len(resumed) == len(events) - 2  # each job's first event is not sent again
    assert await error_code(await client.get(with_params(resume["events_url"], after="0.0"))) == (
        403,
        "invalid_signature",
    )


@pytest.mark.store_independent
@pytest.mark.parametrize(("query", "field"), [("", "jobs"), ("jobs=nope", "jobs"), ("after=1", "jobs")])
async def test_bad_link_requests_name_the_field(client: TestClient, query: str, field: str) -> None:
    response = await client.get(f"/api/mv/events/link?{query}")
    assert response.status == 400 and (await response.json())["error"]["field"] == field


async def test_without_keys_the_link_is_the_plain_url(client: TestClient, sim: Simulator) -> None:
    sim.video_latency = 0.2
    jobs = [await start(client) for _ in range(2)]
    body = await (await client.get(f"/api/mv/events/link?jobs={','.join(jobs)}&after=0.1")).json()
    assert body == {"events_url": f"/api/mv/events?jobs={','.join(jobs)}&after=0.1", "expires_at": None, "jobs": jobs}
    for after in ("1", "x.y", "1.2.3"):  # one position per job
        response = await client.get(f"/api/mv/events/link?jobs={','.join(jobs)}&after={after}")
        assert response.status == 400 and (await response.json())["error"]["field"] == "after"
    async with client.get(body["events_url"]) as stream:
        assert stream.status == 200
        assert {e["data"]["job_id"] for e in [e async for e in read_sse(stream)] if e["event"] in FINAL} == set(jobs)
