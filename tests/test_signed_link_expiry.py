"""A signed link cannot renew itself: what a request admitted by a signed link hands out expires no later than
that link. Run against a real ``python -m mvserver`` with keys on and a signed-link lifetime of a few seconds."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from helpers import running_server

from mvserver.web.access.auth import create_key

TTL_SECONDS = 4
SECRET = "expiry-test-signing-secret-0123456789abcdef"


def fetch(base: str, path: str, key: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        base + path, headers=headers, data=None if body is None else json.dumps(body).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def expiry(link: str) -> int:
    return int(parse_qs(urlsplit(link).query)["exp"][0])


def wait_finished(base: str, key: str, job_id: str) -> None:
    """Read the job's event stream (with the key) until its final event."""
    request = urllib.request.Request(f"{base}/api/mv/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as stream:
        for raw in stream:
            if raw.startswith(b"event: ") and raw[7:].strip() in (b"succeeded", b"failed", b"canceled"):
                assert raw.strip() == b"event: succeeded", raw
                return


def test_links_handed_out_through_a_signed_link_expire_with_it(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    _, key = create_key(keys_file, "frontend")
    env = {
        "MV_API_KEYS_FILE": str(keys_file),
        "MV_URL_SIGNING_SECRET": SECRET,
        "MV_SIGNED_URL_TTL_SECONDS": str(TTL_SECONDS),
        "MV_SANDBOX_VIDEO_SECONDS": "0.5",
    }
    with running_server(tmp_path, signal.SIGTERM, **env) as (port, log, _):
        base = f"http://127.0.0.1:{port}"
        status, job = fetch(base, "/api/mv/generate_video", key, {"prompt": "a lighthouse at dusk", "duration": 4})
        assert status == 202, job
        wait_finished(base, key, job["job_id"])
        status, first = fetch(base, f"/api/mv/jobs/{job['job_id']}", key)  # with the key: a fresh set of links
        assert status == 200 and first["signed_urls"]["video_url"], first
        deadline = expiry(first["signed_urls"]["status_url"])
        assert deadline >= time.time() + TTL_SECONDS - 2

        # Follow the chain a leaked link allows: each signed GET of status_url answers new links.
        link, hops = first["signed_urls"]["status_url"], 0
        while time.time() < deadline:
            status, body = fetch(base, link)
            if status == 403:  # the clock passed the deadline between the check and the request
                break
            assert status == 200, body
            signed = body["signed_urls"]
            links = [value for name, value in signed.items() if name != "expires_at"]
            assert {"status_url", "events_url", "video_url"} <= set(signed), signed
            assert all(expiry(value) <= deadline for value in links), (deadline, signed)
            assert signed["expires_at"] == first["signed_urls"]["expires_at"]
            link, hops = signed["status_url"], hops + 1
            time.sleep(0.5)  # a later request: a renewing link would expire later each time
        assert hops >= 2

        while time.time() <= deadline + 0.5:  # expiry is checked in whole seconds
            time.sleep(deadline + 0.6 - time.time())
        for value in (link, first["signed_urls"]["video_url"], signed["video_url"], signed["events_url"]):
            status, body = fetch(base, value)
            assert status == 403 and body["error"]["code"] == "signature_expired", (value, body)
        status, again = fetch(base, f"/api/mv/jobs/{job['job_id']}", key)  # the key itself still gets fresh links
        assert status == 200 and expiry(again["signed_urls"]["status_url"]) > deadline
