"""Access control: API keys, signed links, ownership of images and scenes, quotas, CORS, request ids and logs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from helpers import PROJECT, AppClient
from imageio_ffmpeg import get_ffmpeg_exe as ffmpeg_exe

from mvserver.__main__ import keys_main
from mvserver.app import create_app
from mvserver.appkeys import CONFIG, KEYRING, SIGNER
from mvserver.core.config import ConfigError
from mvserver.core.errors import ApiError
from mvserver.core.logs import AccessLogger, JsonFormatter, RequestIdFilter, redact
from mvserver.web.access.auth import KEY_ID, KeyLimits, KeyRecord, create_key, key_id, public, read_keys, revoke_key
from mvserver.web.access.quotas import LocalRateLimiter, Quotas
from mvserver.web.access.signing import UrlSigner, signed_url

SECRET = "test-signing-secret-0123456789abcdefghij"
SCENES = {
    "idea": "a drummer on a rooftop at dusk",
    "character_description": "a tall woman in a red coat",
    "number_of_scenes": 2,
}
IMAGE = {"character_description": "a tall woman in a red coat"}
VIDEO = {"prompt": "a drummer on a rooftop", "duration": 8}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.yaml"


@pytest.fixture
def keys(keys_file: Path) -> dict[str, str]:
    """Two keys, alice and bob, with the default limits."""
    return {name: create_key(keys_file, name)[1] for name in ("alice", "bob")}


@pytest.fixture
def keyed(make_client: AppClient, keys_file: Path, keys: dict[str, str]) -> AppClient:
    """``await keyed(**env)``: a client of an app with keys on."""

    async def build(**overrides: Any) -> TestClient:
        return await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET=SECRET, **overrides)

    return build


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wrong_key(key: str) -> str:
    """The same key id with another secret: found by id, refused by the hash."""
    return key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")


# -- the keys file and CLI ---------------------------------------------------------------------------------------


def run_cli(*args: str, keys_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MV_API_KEYS_FILE": str(keys_path)}
    return subprocess.run(
        [sys.executable, "-m", "mvserver", "keys", *args],
        cwd=PROJECT,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )


def keys_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``mvserver keys ARGS`` in this process: (exit code, stdout, stderr), as the process would give them."""
    capsys.readouterr()
    code = keys_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["keys.yaml", "keys.json"])
def test_cli_creates_lists_and_revokes_keys(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new" / name
    created = run_cli("create", "frontend", "--jobs-per-minute", "3", keys_path=path)  # the real entry point
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"mv_k[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    secret = key.split("_", 2)[2]
    assert key not in text and secret not in text  # only the hash is stored
    record = read_keys(path).keys[0]
    assert record.name == "frontend" and record.limits.jobs_per_minute == 3 and record.active

    monkeypatch.setenv("MV_API_KEYS_FILE", str(path))
    code, out, err = keys_cli(capsys, "create", "ops")
    assert code == 0, err
    second = out.strip().splitlines()[-1]
    assert second != key and len(read_keys(path).keys) == 2

    code, listed, _ = keys_cli(capsys, "list")
    assert code == 0 and record.id in listed and "frontend" in listed
    assert "hmac-sha256" not in listed and secret not in listed

    code, _, err = keys_cli(capsys, "revoke", record.id)
    assert code == 0, err
    assert read_keys(path).keys[0].revoked_at is not None
    assert keys_cli(capsys, "revoke", record.id)[0] == 1  # already revoked
    assert keys_cli(capsys, "revoke", "k000000000000")[0] == 1


def test_cli_needs_the_keys_file_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MV_API_KEYS_FILE"}
    result = subprocess.run(
        [sys.executable, "-m", "mvserver", "keys", "list"],
        cwd=PROJECT,
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2 and "MV_API_KEYS_FILE" in result.stderr


def test_keys_need_a_signing_secret(live_env: dict[str, str], keys_file: Path, keys: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="MV_URL_SIGNING_SECRET"):
        create_app({**live_env, "MV_API_KEYS_FILE": str(keys_file)})
    with pytest.raises(ConfigError, match="at least 32"):
        create_app({**live_env, "MV_API_KEYS_FILE": str(keys_file), "MV_URL_SIGNING_SECRET": "short"})


def test_a_missing_or_broken_keys_file_stops_start_up(live_env: dict[str, str], tmp_path: Path) -> None:
    env = {**live_env, "MV_URL_SIGNING_SECRET": SECRET}
    with pytest.raises(ConfigError, match="keys file is missing"):
        create_app({**env, "MV_API_KEYS_FILE": str(tmp_path / "absent.yaml")})
    broken = tmp_path / "broken.yaml"
    broken.write_text("keys:\n  - id: nope\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        create_app({**env, "MV_API_KEYS_FILE": str(broken)})


# -- bearer auth ---------------------------------------------------------------------------------------------------


async def test_keys_on_need_a_bearer_key(keyed: AppClient, keys: dict[str, str]) -> None:
    client = await keyed()
    health = await client.get("/api/mv/health")
    assert health.status == 200  # health stays open, and says a key is needed
    assert (await health.json())["auth"] == {"keys_required": True}

    missing = await client.post("/api/mv/create_scenes", json=SCENES)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await missing.json())["error"]["code"] == "auth_required"

    for header in (
        bearer(wrong_key(keys["alice"])),
        bearer("mv_k000000000000_" + "A" * 43),
        bearer("nonsense"),
        {"Authorization": f"Basic {keys['alice']}"},
        bearer(""),
    ):
        wrong = await client.post("/api/mv/create_scenes", json=SCENES, headers=header)
        assert wrong.status == 401, header
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        assert (await wrong.json())["error"]["code"] == "invalid_api_key"

    ok = await client.post("/api/mv/create_scenes", json=SCENES, headers=bearer(keys["alice"]))
    assert ok.status == 200, await ok.text()
    body = await ok.json()
    assert len(body["scenes"]) == 2
    assert keys["alice"] not in json.dumps(body)
    lower = await client.post("/api/mv/create_scenes", json=SCENES, headers={"authorization": f"bearer {keys['bob']}"})
    assert lower.status == 200


async def test_a_revoked_key_stops_working_without_a_restart(
    keyed: AppClient, keys_file: Path, keys: dict[str, str]
) -> None:
    client = await keyed()
    assert (await client.get("/api/mv/openapi.json", headers=bearer(keys["bob"]))).status == 200
    kid = keys["bob"].split("_")[1]
    assert revoke_key(keys_file, kid) is not None
    deadline = time.monotonic() + 5
    while (await client.get("/api/mv/openapi.json", headers=bearer(keys["bob"]))).status == 200:
        assert time.monotonic() < deadline, "revocation not picked up"
        await asyncio.sleep(0.2)
    assert (await client.get("/api/mv/openapi.json", headers=bearer(keys["alice"]))).status == 200


async def test_keys_never_reach_the_logs(
    keyed: AppClient, keys: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await keyed(MV_DEBUG_MODE="true")
    for key in (keys["alice"], wrong_key(keys["alice"])):
        await client.post("/api/mv/create_scenes", json=SCENES, headers=bearer(key))
    assert "[MV_DEBUG]" in caplog.text  # debug output was on
    secret = keys["alice"].split("_", 2)[2]
    assert secret not in caplog.text and secret[:-4] not in caplog.text
    assert SECRET not in caplog.text
    config = client.app[CONFIG]
    assert SECRET not in repr(client.app[SIGNER]) and SECRET not in repr(config)
    assert SECRET not in json.dumps(config.summary(), default=str)


# -- every route, table-driven -----------------------------------------------------------------------------------


def concrete_paths(app: web.Application) -> list[tuple[str, str, web.AbstractRoute]]:
    """(method, path, route) for every route of the app, placeholders filled with valid-looking values."""
    result = []
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        names = re.findall(r"\{(\w+)", resource.canonical)
        values = {
            name: "json" if name == "ext" else "static.js" if name == "name" else str(uuid.uuid4()) for name in names
        }
        path = str(resource.url_for(**values)) if names else resource.canonical
        result.append((route.method, path, route))
    return result


async def public_webhook(request: web.Request) -> web.Response:
    return web.json_response({"received": True, "key_id": key_id(request)})


def with_webhook(app: web.Application) -> web.Application:
    """An app with one more route marked public, as a route that authenticates some other way would be."""
    app.router.add_post("/api/mv/public_probe", public(public_webhook))
    return app


async def test_with_keys_every_route_refuses_no_key_and_a_wrong_key(
    live_env: dict[str, str], keys_file: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    env = {**live_env, "MV_API_KEYS_FILE": str(keys_file), "MV_URL_SIGNING_SECRET": SECRET, "MV_METRICS": "true"}
    client = await aiohttp_client(with_webhook(create_app(env)))
    routes = concrete_paths(client.app)
    checked = 0
    for method, path, route in routes:
        protected = path.startswith("/api/mv/") or path == "/metrics"
        if getattr(route.handler, "mv_public", False) or not protected:
            continue
        for headers in ({}, bearer(wrong_key(keys["alice"])), bearer(keys["alice"] + "x")):
            response = await client.request(method, path, headers=headers, json={} if method == "POST" else None)
            assert response.status == 401, (method, path, headers, response.status)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        if method in ("GET", "HEAD"):
            bogus = await client.request(method, f"{path}?kid=k000000000000&exp=9999999999&sig=AAAA")
            assert bogus.status == 403, (method, path)
        checked += 1
    assert checked >= 11  # every /api/mv route but health and the webhook receiver, and /metrics
    probe = await client.post("/api/mv/public_probe", json={})
    assert probe.status == 200 and (await probe.json()) == {"received": True, "key_id": None}
    # The Replicate webhook receiver checks Replicate's signature instead of a key.
    webhook = await client.post("/api/mv/webhooks/replicate", json={})
    assert "WWW-Authenticate" not in webhook.headers
    assert (await webhook.json())["error"]["code"] == "webhook_unverified"
    assert (await client.get("/")).status == 200  # the demo page itself holds nothing
    assert (await client.get("/metrics", headers=bearer(keys["bob"]))).status == 200


async def _until_done(client: TestClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            state = await (await client.get(f"/api/mv/jobs/{job_id}", headers=headers)).json()
            if state["status"] in ("succeeded", "failed", "canceled"):
                return state
            await asyncio.sleep(0.05)


async def _alices_resources(client: TestClient, alice: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """One of each kind of resource made with alice's key: a finished clip job, a song, an image, scenes and a
    project with a scene (its id values fill the router's placeholders)."""
    wav = tmp_path / "song.wav"
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=f=440:d=6", str(wav)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    song = await client.post(
        "/api/mv/upload_audio", data=wav.read_bytes(), headers={**alice, "Content-Type": "audio/wav"}
    )
    assert song.status == 201, await song.text()
    audio_id = (await song.json())["audio_id"]
    job = await client.post(
        "/api/mv/generate_video", json={**VIDEO, "duration": 4, "generate_audio": False}, headers=alice
    )
    assert job.status == 202, await job.text()
    job_id = (await job.json())["job_id"]
    assert (await _until_done(client, job_id, alice))["status"] == "succeeded"
    image = await (await client.post("/api/mv/generate_character_reference", json=IMAGE, headers=alice)).json()
    scenes = await (await client.post("/api/mv/create_scenes", json=SCENES, headers=alice)).json()
    project = await client.post(
        "/api/mv/projects",
        json={"idea": "a drummer", "character_description": "a woman", "number_of_scenes": 1, "audio_id": audio_id},
        headers=alice,
    )
    assert project.status == 201, await project.text()
    project_body = await project.json()
    return {
        "job_id": job_id,
        "video_id": job_id,
        "audio_id": audio_id,
        "image_id": image["image_id"],
        "scenes_id": scenes["scenes_id"],
        "project_id": project_body["project_id"],
        "scene_id": project_body["scenes"][0]["id"],
        "ext": "json",
    }


async def test_with_keys_every_route_with_an_id_refuses_another_keys_resource(
    live_env: dict[str, str], keys_file: Path, keys: dict[str, str], aiohttp_client: Any, sim: Any, tmp_path: Path
) -> None:
    """Every route that takes an id answers 404 to another key, exactly as for an unknown id (never 403, so ids
    do not leak); the owner gets something else than 404 on the same request."""
    sim.video_latency = 0.2
    env = {**live_env, "MV_API_KEYS_FILE": str(keys_file), "MV_URL_SIGNING_SECRET": SECRET}
    client = await aiohttp_client(create_app(env))
    alice, bob = bearer(keys["alice"]), bearer(keys["bob"])
    ids = await _alices_resources(client, alice, tmp_path)
    checked = []
    for route in client.app.router.routes():
        resource = route.resource
        assert resource is not None
        names = re.findall(r"\{(\w+)", resource.canonical)
        if not names or not resource.canonical.startswith("/api/mv/"):
            continue
        path = str(resource.url_for(**{name: ids[name] for name in names}))
        body = {} if route.method in ("POST", "PATCH") else None
        headers = {**bob, "If-Match": "*"} if route.method == "PATCH" else bob
        theirs = await client.request(route.method, path, json=body, headers=headers)
        unknown = await client.request(
            route.method, path.replace(ids[names[0]], str(uuid.uuid4())), json=body, headers=headers
        )
        assert theirs.status == unknown.status == 404, (route.method, path, theirs.status, await theirs.text())
        if route.method != "HEAD":
            assert (await theirs.json())["error"] == {
                **(await unknown.json())["error"],
                "message": (await theirs.json())["error"]["message"],
            }
        checked.append((route.method, path))
    assert len(checked) >= 14, checked
    # The owner is not refused by the same routes (reads here; a cancel last, as it ends the job).
    for method, path in checked:
        if method == "GET" and "/events" not in path:
            mine = await client.get(path, headers=alice)
            assert mine.status == 200, (path, mine.status, await mine.text())
    # The multi-job stream: every listed job must be the caller's.
    assert (await client.get(f"/api/mv/events?jobs={ids['job_id']}", headers=bob)).status == 404
    async with client.get(f"/api/mv/events?jobs={ids['job_id']}", headers=alice) as stream:
        assert stream.status == 200
    # Using alice's things as inputs is refused as if they did not exist.
    lipsync = {"video_job_id": ids["job_id"], "audio_id": ids["audio_id"]}
    refused = await client.post("/api/mv/lipsync", json=lipsync, headers=bob)
    assert refused.status == 404 and (await refused.json())["error"]["field"] == "audio_id"
    bob_song = await client.post(
        "/api/mv/upload_audio", data=(tmp_path / "song.wav").read_bytes(), headers={**bob, "Content-Type": "audio/wav"}
    )
    refused = await client.post(
        "/api/mv/lipsync", json={**lipsync, "audio_id": (await bob_song.json())["audio_id"]}, headers=bob
    )
    assert refused.status == 400 and (await refused.json())["error"]["code"] == "clip_not_found"
    made = await client.post("/api/mv/lipsync", json=lipsync, headers=alice)
    assert made.status == 202, await made.text()
    lipsync_job = (await made.json())["job_id"]
    assert (await client.get(f"/api/mv/jobs/{lipsync_job}", headers=bob)).status == 404
    assert (await client.get(f"/api/mv/jobs/{lipsync_job}", headers=alice)).status == 200
    project = await client.post(
        "/api/mv/projects", json={"idea": "x", "character_description": "y", "audio_id": ids["audio_id"]}, headers=bob
    )
    assert project.status == 400 and (await project.json())["error"]["field"] == "audio_id"
    bobs = await (
        await client.post("/api/mv/projects", json={"idea": "x", "character_description": "y"}, headers=bob)
    ).json()
    patched = await client.patch(
        f"/api/mv/projects/{bobs['project_id']}",
        headers={**bob, "If-Match": "*"},
        json={"character_image_id": ids["image_id"]},
    )
    assert patched.status == 400 and (await patched.json())["error"]["field"] == "character_image_id"
    patched = await client.patch(
        f"/api/mv/projects/{bobs['project_id']}", headers={**bob, "If-Match": "*"}, json={"audio_id": ids["audio_id"]}
    )
    assert patched.status == 400 and (await patched.json())["error"]["field"] == "audio_id"
    canceled = await client.post(f"/api/mv/jobs/{lipsync_job}/cancel", headers=alice)
    assert canceled.status == 200


async def test_without_keys_no_route_asks_for_one(live_env: dict[str, str], aiohttp_client: Any) -> None:
    client = await aiohttp_client(with_webhook(create_app(live_env)))
    for method, path, _route in concrete_paths(client.app):
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert "WWW-Authenticate" not in response.headers, (method, path)
        if response.status in (401, 403):  # only the webhook receiver, refusing an unsigned delivery
            assert path == "/api/mv/webhooks/replicate", (method, path, response.status)
            assert (await response.json())["error"]["code"] == "webhook_unverified"
    ok = await client.post("/api/mv/create_scenes", json=SCENES)
    body = await ok.json()
    assert ok.status == 200 and "signed_urls" not in body
    record = json.loads((Path(live_env["MV_OUTPUT_DIR"]) / "scenes" / f"{body['scenes_id']}.json").read_text())
    assert "owner_key_id" not in record  # files written without keys are as before
    assert (await client.get("/metrics")).status == 404  # metrics are off unless MV_METRICS=true


# -- signed links --------------------------------------------------------------------------------------------------


async def test_signed_links_load_without_headers(keyed: AppClient, keys: dict[str, str]) -> None:
    client = await keyed()
    made = await client.post("/api/mv/generate_character_reference", json=IMAGE, headers=bearer(keys["alice"]))
    assert made.status == 200, await made.text()
    body = await made.json()
    link = body["signed_urls"]["image_url"]
    assert link.startswith(body["image_url"] + "?") and "expires_at" in body["signed_urls"]
    assert keys["alice"] not in link and keys["alice"].split("_", 2)[2] not in link
    image = await client.get(link)
    assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    assert (await image.read()).startswith(b"\x89PNG")
    assert (await client.head(link)).status == 200

    # Tampered: another signature, another path, another expiry, another key id.
    path, _, query = link.partition("?")
    params = dict(part.split("=", 1) for part in query.split("&"))
    other_kid = keys["bob"].split("_")[1]
    tampered = [
        f"{path}?kid={params['kid']}&exp={params['exp']}&sig={params['sig'][:-2]}AA",
        f"/api/mv/get_image/{uuid.uuid4()}?{query}",
        f"{path}?kid={params['kid']}&exp={int(params['exp']) + 1}&sig={params['sig']}",
        f"{path}?kid={other_kid}&exp={params['exp']}&sig={params['sig']}",
        f"{path}?kid={params['kid']}&exp=soon&sig={params['sig']}",
        f"{path}?kid={params['kid']}&exp=%C2%B2&sig={params['sig']}",  # a Unicode digit, not an ASCII one
        f"{path}?sig={params['sig']}",
    ]
    for url in tampered:
        response = await client.get(url)
        assert response.status == 403, url
        assert (await response.json())["error"]["code"] == "invalid_signature"

    # Expired.
    expired, _ = client.app[SIGNER].sign(params["kid"], path, ttl=-5)
    response = await client.get(expired)
    assert response.status == 403 and (await response.json())["error"]["code"] == "signature_expired"


async def test_a_signed_link_is_for_reading_only_and_dies_with_its_key(
    keyed: AppClient, keys: dict[str, str], keys_file: Path
) -> None:
    client = await keyed()
    started = await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(keys["alice"]))
    assert started.status == 202, await started.text()
    body = await started.json()
    signed = body["signed_urls"]
    assert set(signed) == {"status_url", "events_url", "video_url", "expires_at"}
    status = await client.get(signed["status_url"])
    assert status.status == 200 and (await status.json())["job_id"] == body["job_id"]
    # The same path signed for GET does not cancel the job.
    for method in ("DELETE", "POST"):
        url = signed["status_url"] if method == "DELETE" else signed["status_url"].replace("?", "/cancel?")
        refused = await client.request(method, url)
        assert refused.status in (401, 403), (method, refused.status)
    assert (await (await client.get(body["status_url"], headers=bearer(keys["alice"]))).json())["status"] != "canceled"

    client.app[KEYRING].reload_interval = 0  # re-read the keys file at once, not within the next second
    revoke_key(keys_file, signed["status_url"].split("kid=")[1].split("&")[0])
    gone = await client.get(signed["status_url"])
    assert gone.status == 403
    assert (await gone.json())["error"]["code"] == "invalid_signature"


async def test_signed_url_helper(keyed: AppClient, make_client: AppClient) -> None:
    keyed_client = await keyed()
    link = signed_url(keyed_client.app, "k0123456789ab", "/api/mv/jobs/x", ttl=60)
    assert re.fullmatch(r"/api/mv/jobs/x\?kid=k0123456789ab&exp=\d+&sig=[A-Za-z0-9_-]{43}", link)
    assert int(link.split("exp=")[1].split("&")[0]) - time.time() == pytest.approx(60, abs=2)
    plain = await make_client()
    assert signed_url(plain.app, None, "/api/mv/jobs/x", ttl=60) == "/api/mv/jobs/x"


def test_the_signer_verifies_a_link_and_answers_its_key_id_without_knowing_keys() -> None:
    """Signing knows nothing of keys: it checks the signature and expiry and names the key; the auth middleware
    looks the key up (a revoked key's link is refused there, test above)."""
    signer = UrlSigner(SECRET, 60)
    link, _ = signer.sign("k0123456789ab", "/api/mv/jobs/x")
    assert signer.verify(make_mocked_request("GET", link)) == "k0123456789ab"
    tampered = link.replace("/jobs/x", "/jobs/y")
    with pytest.raises(ApiError) as refused:
        signer.verify(make_mocked_request("GET", tampered))
    assert (refused.value.status, refused.value.info.code) == (403, "invalid_signature")


# -- ownership of images and scenes --------------------------------------------------------------------------------


async def test_another_keys_images_and_scenes_are_not_found(
    keyed: AppClient, keys: dict[str, str], live_env: dict[str, str]
) -> None:
    client = await keyed()
    alice, bob = bearer(keys["alice"]), bearer(keys["bob"])
    image = await (await client.post("/api/mv/generate_character_reference", json=IMAGE, headers=alice)).json()
    scenes = await (await client.post("/api/mv/create_scenes", json=SCENES, headers=alice)).json()
    alice_id = keys["alice"].split("_")[1]
    sidecar = json.loads((Path(live_env["MV_OUTPUT_DIR"]) / "images" / f"{image['image_id']}.json").read_text())
    assert sidecar["owner_key_id"] == alice_id

    for url in (image["image_url"], scenes["urls"]["json"], scenes["urls"]["markdown"]):
        assert (await client.get(url, headers=alice)).status == 200, url
        theirs = await client.get(url, headers=bob)
        assert theirs.status == 404, url
    # A link signed for bob's key on alice's image is a valid link to something bob cannot see.
    bob_link = signed_url(client.app, keys["bob"].split("_")[1], image["image_url"])
    assert (await client.get(bob_link)).status == 404
    assert (await client.get(scenes["signed_urls"]["markdown"])).status == 200

    as_reference = {**VIDEO, "reference_image_id": image["image_id"]}
    refused = await client.post("/api/mv/generate_video", json=as_reference, headers=bob)
    assert refused.status == 404
    assert (await refused.json())["error"]["field"] == "reference_image_id"
    accepted = await client.post("/api/mv/generate_video", json=as_reference, headers=alice)
    assert accepted.status == 202, await accepted.text()


async def test_images_made_without_keys_stay_readable_with_keys(
    make_client: AppClient, keyed: AppClient, keys: dict[str, str]
) -> None:
    open_client = await make_client()
    image = await (await open_client.post("/api/mv/generate_character_reference", json=IMAGE)).json()
    client = await keyed()
    assert (await client.get(image["image_url"])).status == 401
    assert (await client.get(image["image_url"], headers=bearer(keys["bob"]))).status == 200


# -- quotas --------------------------------------------------------------------------------------------------------


async def test_blocking_endpoints_are_rate_limited_per_key(keyed: AppClient, keys_file: Path) -> None:
    _, tight = create_key(keys_file, "tight", KeyLimits(blocking_per_minute=6, blocking_burst=2))
    _, other = create_key(keys_file, "other", KeyLimits(blocking_per_minute=6, blocking_burst=2))
    client = await keyed()
    for _ in range(3):  # malformed requests cost nothing
        assert (await client.post("/api/mv/create_scenes", json={}, headers=bearer(tight))).status == 400
    for _ in range(2):
        assert (await client.post("/api/mv/create_scenes", json=SCENES, headers=bearer(tight))).status == 200
    refused = await client.post("/api/mv/generate_character_reference", json=IMAGE, headers=bearer(tight))
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 10  # a token every 10 s
    assert (await client.post("/api/mv/create_scenes", json=SCENES, headers=bearer(other))).status == 200


async def test_job_creation_is_rate_limited(keyed: AppClient, keys_file: Path) -> None:
    record, key = create_key(keys_file, "jobs", KeyLimits(jobs_per_minute=1, jobs_burst=2, max_running_jobs=3))
    client = await keyed()
    for _ in range(2):
        assert (await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(key))).status == 202
    limited = await client.post("/api/mv/generate_video", json=VIDEO, headers=bearer(key))
    assert limited.status == 429 and (await limited.json())["error"]["code"] == "rate_limited"
    assert 50 <= int(limited.headers["Retry-After"]) <= 60


async def test_a_request_of_more_jobs_than_the_burst_takes_the_burst_and_a_refusal_always_says_when() -> None:
    now = [0.0]
    quotas = Quotas(LocalRateLimiter(clock=lambda: now[0]))
    key = KeyRecord(
        id="k0123456789ab",
        name="k",
        hash="hmac-sha256:" + "0" * 64,
        created_at="2026-01-01",
        limits=KeyLimits(jobs_per_minute=6, jobs_burst=5, max_running_jobs=4),
    )
    await quotas.charge(key, "jobs", cost=24)  # more jobs than the burst (and the running cap): the burst is taken
    assert (await quotas.tokens(key))["jobs"] == 0
    with pytest.raises(ApiError) as refused:
        await quotas.charge(key, "jobs", cost=6)  # needs the whole burst again: 5 tokens at one per 10 s
    assert refused.value.info.code == "rate_limited" and refused.value.retry_after == 50
    assert "needs 5 tokens" in refused.value.info.message
    now[0] += 50
    await quotas.charge(key, "jobs", cost=6)  # waiting as told is enough
    assert (await quotas.tokens(key)) == {"jobs": 0, "blocking": 10, "uploads": 5}


async def test_token_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    limiter = LocalRateLimiter(clock=lambda: now[0])
    assert [await limiter.acquire("k:jobs", 0.5, 3) for _ in range(3)] == [0, 0, 0]
    assert await limiter.acquire("k:jobs", 0.5, 3) == pytest.approx(2.0)
    now[0] += 1.0
    assert await limiter.acquire("k:jobs", 0.5, 3) == pytest.approx(1.0)  # half a token so far: nothing taken
    now[0] += 1.0
    assert await limiter.acquire("k:jobs", 0.5, 3) == 0
    now[0] += 1000
    assert [await limiter.acquire("k:jobs", 0.5, 3) for _ in range(4)][-1] > 0  # refills up to the burst only
    assert await limiter.acquire("other:jobs", 0.5, 3) == 0  # buckets are independent
    # A request of several jobs takes its tokens all or none.
    assert await limiter.acquire("many:jobs", 0.5, 3, cost=2) == 0
    assert await limiter.acquire("many:jobs", 0.5, 3, cost=2) == pytest.approx(2.0)  # 1 left: nothing taken
    assert await limiter.acquire("many:jobs", 0.5, 3, cost=1) == 0


# -- CORS ----------------------------------------------------------------------------------------------------------


async def test_cors_preflight_from_an_allowed_and_a_refused_origin(keyed: AppClient, keys: dict[str, str]) -> None:
    allowed = "https://app.example.com"
    client = await keyed(MV_CORS_ORIGINS=f"{allowed}, http://localhost:5173")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    ok = await client.options("/api/mv/create_scenes", headers={"Origin": allowed, **preflight})
    assert ok.status == 200, await ok.text()
    assert ok.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "AUTHORIZATION" in ok.headers["Access-Control-Allow-Headers"].upper()
    assert "Access-Control-Allow-Credentials" not in ok.headers

    video = await client.options(
        f"/api/mv/get_video/{uuid.uuid4()}",
        headers={
            "Origin": allowed,
            "Access-Control-Request-Method": "HEAD",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert video.status == 200 and video.headers["Access-Control-Allow-Origin"] == allowed
    refused = await client.options("/api/mv/create_scenes", headers={"Origin": "https://evil.example", **preflight})
    assert refused.status == 403
    assert "Access-Control-Allow-Origin" not in refused.headers

    # A project edit (If-Match) and an idempotent job POST may be sent cross-origin, and their headers read.
    edit = await client.options(
        f"/api/mv/projects/{uuid.uuid4()}",
        headers={
            "Origin": allowed,
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "authorization,content-type,if-match",
        },
    )
    assert edit.status == 200 and "IF-MATCH" in edit.headers["Access-Control-Allow-Headers"].upper()
    keyed_post = await client.options(
        "/api/mv/generate_video",
        headers={
            "Origin": allowed,
            **preflight,
            "Access-Control-Request-Headers": "authorization,content-type,idempotency-key",
        },
    )
    assert keyed_post.status == 200

    # The actual request from the allowed origin: the answer (even a 401) is readable by the page.
    unauthorized = await client.post("/api/mv/create_scenes", json=SCENES, headers={"Origin": allowed})
    assert unauthorized.status == 401 and unauthorized.headers["Access-Control-Allow-Origin"] == allowed
    exposed = unauthorized.headers["Access-Control-Expose-Headers"].upper()
    assert all(name.upper() in exposed for name in ("ETag", "Location", "Retry-After", "Idempotent-Replayed"))
    assert "WWW-Authenticate" in unauthorized.headers["Access-Control-Expose-Headers"]
    answered = await client.post(
        "/api/mv/create_scenes", json=SCENES, headers={"Origin": allowed, **bearer(keys["bob"])}
    )
    assert answered.status == 200 and answered.headers["Access-Control-Allow-Origin"] == allowed
    foreign = await client.post(
        "/api/mv/create_scenes", json=SCENES, headers={"Origin": "https://evil.example", **bearer(keys["bob"])}
    )
    assert "Access-Control-Allow-Origin" not in foreign.headers


async def test_without_cors_origins_no_cors_headers(make_client: AppClient) -> None:
    client = await make_client()
    response = await client.get("/api/mv/health", headers={"Origin": "https://app.example.com"})
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("origins", ["*", "https://app.example.com/", "app.example.com", "https://a.example/path"])
def test_cors_origins_must_be_exact(live_env: dict[str, str], origins: str) -> None:
    if origins.endswith(".com/"):
        assert create_app({**live_env, "MV_CORS_ORIGINS": origins}) is not None  # a trailing slash is dropped
        return
    with pytest.raises(ConfigError, match="MV_CORS_ORIGINS"):
        create_app({**live_env, "MV_CORS_ORIGINS": origins})


# -- request ids and JSON logs -------------------------------------------------------------------------------------


async def test_request_ids_in_and_out(make_client: AppClient) -> None:
    client = await make_client()
    given = await client.get("/api/mv/health", headers={"X-Request-Id": "abc-123"})
    assert given.headers["X-Request-Id"] == "abc-123"
    fresh = await client.get("/api/mv/health")
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["X-Request-Id"])
    hostile = await client.get("/api/mv/health", headers={"X-Request-Id": "x" * 500})
    assert hostile.headers["X-Request-Id"] != "x" * 500
    missing = await client.get(f"/api/mv/get_image/{uuid.uuid4()}", headers={"X-Request-Id": "r-404"})
    assert missing.status == 404 and missing.headers["X-Request-Id"] == "r-404"


@contextlib.contextmanager
def json_log_lines() -> Iterator[list[dict[str, Any]]]:
    """The JSON lines the ``mvserver`` loggers write inside the block (filled in when the block ends)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("mvserver")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        lines.extend(json.loads(line) for line in stream.getvalue().splitlines())


async def test_json_log_lines_carry_the_request_id(make_client: AppClient) -> None:
    with json_log_lines() as lines:
        client = await make_client(MV_DEBUG_MODE="true")
        response = await client.post("/api/mv/create_scenes", json=SCENES, headers={"X-Request-Id": "req-42"})
        assert response.status == 200
        logging.getLogger("mvserver").info("outside", extra={"job_id": "j-1"})
    mine = [line for line in lines if line.get("request_id") == "req-42"]
    assert mine and all(line["level"] == "INFO" and "time" in line for line in mine)
    assert any("create_scenes prompt" in line["message"] for line in mine)
    assert lines[-1]["message"] == "outside" and lines[-1]["job_id"] == "j-1" and "request_id" not in lines[-1]


async def test_json_log_lines_of_a_job_carry_its_id(make_client: AppClient, sim: Any) -> None:
    with json_log_lines() as lines:
        client = await make_client()
        sim.video_latency = 0.1
        sim.add_fault("replicate.get", "invalid_json", times=1)  # one transient failure: the job logs its retry
        response = await client.post(
            "/api/mv/generate_video", json={"prompt": "a heron", "duration": 4}, headers={"X-Request-Id": "req-7"}
        )
        job_id = (await response.json())["job_id"]
        async with asyncio.timeout(20):
            while (await (await client.get(f"/api/mv/jobs/{job_id}")).json())["status"] != "succeeded":
                await asyncio.sleep(0.05)
    retries = [line for line in lines if line["message"].startswith("transient")]
    assert retries and all(line["job_id"] == job_id and "request_id" not in line for line in retries)
    assert all("job_id" not in line for line in lines if line.get("request_id") == "req-7")


def test_signatures_are_cut_from_logged_urls() -> None:
    assert (
        redact("GET /api/mv/get_image/x?kid=k1&exp=9&sig=abc_DEF-1 HTTP/1.1")
        == "GET /api/mv/get_image/x?kid=k1&exp=9&sig=REDACTED HTTP/1.1"
    )


def test_log_format_setting(live_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="MV_LOG_FORMAT"):
        create_app({**live_env, "MV_LOG_FORMAT": "xml"})


async def test_key_id_is_on_the_request(
    live_env: dict[str, str], keys_file: Path, keys: dict[str, str], aiohttp_client: Any
) -> None:
    seen: list[Any] = []

    async def probe(request: web.Request) -> web.Response:
        seen.append((key_id(request), request[KEY_ID]))
        return web.json_response({})

    app = create_app({**live_env, "MV_API_KEYS_FILE": str(keys_file), "MV_URL_SIGNING_SECRET": SECRET})
    app.router.add_get("/api/mv/probe", probe)  # a route beside the real ones shows what handlers get
    client = await aiohttp_client(app)
    assert (await client.get("/api/mv/probe")).status == 401
    assert (await client.get("/api/mv/probe", headers=bearer(keys["alice"]))).status == 200
    kid = keys["alice"].split("_")[1]
    assert seen == [(kid, kid)]


async def test_openapi_documents_the_bearer_scheme(
    keyed: AppClient, make_client: AppClient, keys: dict[str, str]
) -> None:
    client = await keyed(MV_METRICS="true")
    doc = await (await client.get("/api/mv/openapi.json", headers=bearer(keys["alice"]))).json()
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert doc["security"] == [{"bearerAuth": []}]
    public = ("/api/mv/health", "/api/mv/health/live", "/api/mv/health/ready")  # probes carry no key
    assert [doc["paths"][path]["get"]["security"] for path in public] == [[], [], []]
    assert "/metrics" in doc["paths"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if path not in public:
                assert "401" in operation["responses"], (path, method)
    image = doc["paths"]["/api/mv/get_image/{image_id}"]["get"]
    assert {"kid", "exp", "sig"} <= {p["name"] for p in image["parameters"]} and "403" in image["responses"]
    assert "429" in doc["paths"]["/api/mv/generate_video"]["post"]["responses"]
    plain = await (await (await make_client()).get("/api/mv/openapi.json")).json()
    assert "security" not in plain and "/metrics" not in plain["paths"]
    assert "401" not in plain["paths"]["/api/mv/create_scenes"]["post"]["responses"]


async def test_access_log_lines_drop_signatures(
    live_env: dict[str, str],
    keys_file: Path,
    keys: dict[str, str],
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app({**live_env, "MV_API_KEYS_FILE": str(keys_file), "MV_URL_SIGNING_SECRET": SECRET})
    server = TestServer(app)
    await server.start_server(access_log_class=AccessLogger)  # as python -m mvserver runs it
    client = await aiohttp_client(server)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    kid = keys["alice"].split("_")[1]
    link = signed_url(app, kid, f"/api/mv/get_image/{uuid.uuid4()}")
    response = await client.get(link, headers={"X-Request-Id": "log-1"})
    assert response.status == 404
    await asyncio.sleep(0.05)
    records = [r for r in caplog.records if r.name == "aiohttp.access" and getattr(r, "request_id", None) == "log-1"]
    assert len(records) == 1
    line = records[0].getMessage()
    signature = link.split("sig=")[1]
    assert signature not in line and "sig=REDACTED" in line
    assert re.fullmatch(r"GET /api/mv/get_image/\S+ HTTP/1\.1 404 \d+ \d+\.\d{6}s", line)
