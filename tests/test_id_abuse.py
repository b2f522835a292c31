"""Path and id abuse on every route that takes an id: traversal, encodings, NUL, overlong and look-alike ids.

Requests are written byte for byte on a raw socket, so no client library normalises or re-encodes the path. Every
answer must be a 400 or 404 (a JSON error once the request reaches the app), and files planted next to and inside the
output directory under look-alike names must never be served.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient
from helpers import PROJECT, AppClient
from PIL import Image

from mvserver.jobs import Job

SECRET = f"SECRET-{secrets.token_hex(16)}"
ROUTES = [
    ("GET", "/api/mv/get_video/{}"),
    ("GET", "/api/mv/get_image/{}"),
    ("GET", "/api/mv/get_scenes/{}.json"),
    ("GET", "/api/mv/get_scenes/{}.md"),
    ("GET", "/api/mv/jobs/{}"),
    ("GET", "/api/mv/jobs/{}/events"),
    ("DELETE", "/api/mv/jobs/{}"),
    ("POST", "/api/mv/jobs/{}/cancel"),
]


class Answer:
    """One raw HTTP/1.1 answer."""

    def __init__(self, raw: bytes):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")

    def json(self) -> Any:
        return json.loads(self.body)


async def send(client: TestClient, method: str, target: bytes) -> Answer:
    """Send ``method target`` exactly as given and read the whole answer (the connection is closed after it)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            method.encode() + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    return Answer(raw)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(buffer, "PNG")
    return buffer.getvalue()


def variants(good: str) -> list[str]:
    """Ways to spell, bend or wrap a valid id, as they appear in a request target (percent-encoded where needed)."""
    digit = next(i for i, c in enumerate(good) if c.isdigit())
    fullwidth = good[:digit] + chr(0xFF10 + int(good[digit])) + good[digit + 1 :]
    version = lambda v: good[:14] + v + good[15:]  # noqa: E731
    return [
        version("1"),
        version("3"),
        version("5"),
        "00000000-0000-0000-0000-000000000000",
        good.upper(),
        good[:19] + "c" + good[20:],
        good.replace("-", ""),
        good + "0",
        good[:-1],
        "%7B" + good + "%7D",
        "{" + good + "}",
        "urn:uuid:" + good,
        "urn%3Auuid%3A" + good,
        good + ".mp4",
        good + ".json",
        good + "%2Emp4",
        good + "%00",
        good + "%00.mp4",
        "%00" + good,
        good + "%0A",
        "%20" + good,
        good + "%2F",
        good + "%5C",
        good + "%3B",
        good + ";x",
        good + "%3F",
        quote(fullwidth),
        quote(good.replace("-", "\u2010", 1)),
        quote(good.replace("-", "\u2212", 1)),
    ]


TRAVERSALS = [
    "..",
    ".",
    "%2e",
    "%2e%2e",
    "..%2Fsecret.txt",
    "..%2F..%2Fsecret.txt",
    "%2e%2e%2fsecret.txt",
    "%2E%2E%2F%2E%2E%2Fsecret.txt",
    "..%252F..%252Fsecret.txt",
    "%252e%252e%252fsecret.txt",
    "....%2F%2Fsecret.txt",
    "..%5C..%5Csecret.txt",
    "..\\..\\secret.txt",
    "%2Fetc%2Fpasswd",
    "a%2Fb",
    "%2F",
    "%00",
    "..%00",
    "%C0%AE%C0%AE%2F",
    "%E2%80%A5%2Fsecret.txt",
    "..%2F" * 40 + "etc%2Fpasswd",
    "a" * 4000,
    "%41" * 1300,
    str(uuid.uuid1()),
    str(uuid.uuid3(uuid.NAMESPACE_URL, "mvserver")),
    str(uuid.uuid5(uuid.NAMESPACE_URL, "mvserver")),
    str(uuid.UUID(int=0)),
    str(uuid.uuid4()).upper(),
    uuid.uuid4().urn,
    "{" + str(uuid.uuid4()) + "}",
]


@pytest.fixture
def ids() -> dict[str, str]:
    return {kind: str(uuid.uuid4()) for kind in ("video", "image", "scenes", "job")}


@pytest.fixture
def planted(tmp_path: Path, live_env: dict[str, str], ids: dict[str, str]) -> Path:
    """Real artefacts under their canonical names, and the secret under every look-alike name and beside outputs."""
    outputs = Path(live_env["MV_OUTPUT_DIR"])
    for kind in ("videos", "images", "scenes", "jobs"):
        (outputs / kind).mkdir(parents=True, exist_ok=True)
    secret = SECRET.encode()
    video, image, scenes, job = ids["video"], ids["image"], ids["scenes"], ids["job"]

    (outputs / "videos" / f"{video}.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    (outputs / "images" / f"{image}.png").write_bytes(png())
    (outputs / "images" / f"{image}.json").write_text(json.dumps({"image_id": image, "mime_type": "image/png"}))
    (outputs / "scenes" / f"{scenes}.json").write_text(json.dumps({"scenes_id": scenes, "scenes": []}))
    (outputs / "scenes" / f"{scenes}.md").write_text("# scenes\n")
    record = Job(
        id=job,
        backend="replicate",
        model="google/veo-3.1",
        sandbox=True,
        request={"prompt": "x"},
        status="canceled",
        stage="done",
        finished_at=time.time(),
        error={"code": "job_canceled", "message": "canceled by the client"},
    ).record()
    (outputs / "jobs" / f"{job}.json").write_text(json.dumps(record))

    for folder in (tmp_path, outputs, outputs / "videos", outputs / "images", outputs / "scenes", outputs / "jobs"):
        (folder / "secret.txt").write_bytes(secret)
        (folder / "passwd").write_bytes(secret)
    canonical = {f"{video}.mp4", f"{image}.png", f"{image}.json", f"{scenes}.json", f"{scenes}.md"}
    folders = {
        outputs / "videos": (".mp4",),
        outputs / "images": (".png", ".json"),
        outputs / "scenes": (".json", ".md"),
        tmp_path: (".mp4", ".png", ".json", ".md"),
    }
    for name in (video, image, scenes, job):
        for lookalike in {*variants(name), name}:
            if "/" in lookalike or "%" in lookalike:
                continue
            for folder, suffixes in folders.items():
                for target in {lookalike + suffix for suffix in suffixes} - canonical:
                    (folder / target).write_bytes(secret)
    for upper in (image.upper(),):  # a look-alike image with a sidecar that would make it servable
        (outputs / "images" / f"{upper}.json").write_text(json.dumps({"image_id": upper, "mime_type": "image/png"}))
        (outputs / "images" / f"{upper}.png").write_bytes(secret)
    return outputs


@pytest.fixture
def project_secret() -> Any:
    """A secret file in the project directory, removed afterwards."""
    path = PROJECT / f".id-abuse-{secrets.token_hex(6)}.txt"
    path.write_text(SECRET)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
async def client(make_client: AppClient, planted: Path, project_secret: Path) -> TestClient:
    return await make_client()


def check_refused(answer: Answer, target: bytes) -> None:
    assert answer.status in (400, 404), (target[:120], answer.status, answer.body[:200])
    assert SECRET.encode() not in answer.body
    assert b"Traceback" not in answer.body and b'File "' not in answer.body
    assert answer.is_json, (target[:120], answer.headers, answer.body[:200])
    error = answer.json()["error"]
    assert error["code"] in ("invalid_id", "not_found") and error["message"], error


async def test_canonical_ids_are_served(client: TestClient, ids: dict[str, str]) -> None:
    """The control: the planted artefacts are reachable under their real ids, so a refusal below means something."""
    expected = {
        "/api/mv/get_video/{}": (ids["video"], b"ftyp"),
        "/api/mv/get_image/{}": (ids["image"], b"\x89PNG"),
        "/api/mv/get_scenes/{}.json": (ids["scenes"], ids["scenes"].encode()),
        "/api/mv/get_scenes/{}.md": (ids["scenes"], b"# scenes"),
        "/api/mv/jobs/{}": (ids["job"], ids["job"].encode()),
    }
    for template, (good, content) in expected.items():
        answer = await send(client, "GET", template.format(good).encode())
        assert answer.status == 200 and content in answer.body, (template, answer.status, answer.body[:200])
        assert SECRET.encode() not in answer.body
    events = await send(client, "GET", f"/api/mv/jobs/{ids['job']}/events".encode())
    assert events.status == 200 and events.headers["content-type"].startswith("text/event-stream")
    canceled = await send(client, "DELETE", f"/api/mv/jobs/{ids['job']}".encode())
    assert canceled.status == 200 and canceled.json()["status"] == "canceled"


async def test_traversal_and_malformed_ids_are_refused(client: TestClient, project_secret: Path) -> None:
    deep = "..%2F" * 40 + quote(str(project_secret).lstrip("/"), safe="")
    for method, template in ROUTES:
        for bad in [*TRAVERSALS, deep, quote(str(project_secret), safe="")]:
            target = template.format(bad).encode()
            check_refused(await send(client, method, target), target)


async def test_lookalikes_of_existing_ids_are_refused(client: TestClient, ids: dict[str, str]) -> None:
    for method, template in ROUTES:
        for good in ids.values():
            for bad in variants(good):
                target = template.format(bad).encode()
                check_refused(await send(client, method, target), target)


async def test_a_valid_but_unknown_uuid_is_404(client: TestClient) -> None:
    for method, template in ROUTES:
        target = template.format(uuid.uuid4()).encode()
        answer = await send(client, method, target)
        assert answer.status == 404 and answer.is_json, (target, answer.status)
        assert answer.json()["error"]["code"] == "not_found"


async def test_requests_the_http_parser_rejects_leak_nothing(client: TestClient, ids: dict[str, str]) -> None:
    """A 10 000-character id, or raw non-ASCII bytes in the path, never reach the app: aiohttp's parser answers 400."""
    fullwidth = ids["video"].replace("4", "\uff14", 1)
    for method, template in ROUTES:
        for target in (template.format("a" * 10_000).encode(), template.format(fullwidth).encode()):
            answer = await send(client, method, target)
            assert answer.status == 400, (target[:80], answer.status)
            assert SECRET.encode() not in answer.body and b"Traceback" not in answer.body


async def test_planted_secrets_are_still_on_disk(planted: Path, project_secret: Path, ids: dict[str, str]) -> None:
    """The look-alike files really exist, so the refusals above were not merely misses."""
    assert (planted / "videos" / f"{ids['video'].upper()}.mp4").read_text() == SECRET
    assert (planted / "videos" / f"{ids['video']}.mp4.mp4").read_text() == SECRET
    assert (planted.parent / "secret.txt").read_text() == SECRET
    assert project_secret.read_text() == SECRET
