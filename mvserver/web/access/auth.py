"""API keys (off unless ``MV_API_KEYS_FILE`` is set): the keys file, bearer authentication and the request's key id.

A key reads ``mv_<key id>_<secret>``: the id finds the record, the secret (32 random bytes) is checked against the
stored HMAC-SHA256 of it, keyed by the id, with a constant-time comparison. The file holds only that hash, so a
leaked keys file grants nothing. A fast hash is enough because the secret is 256 random bits (nothing to guess,
unlike a password), and it keeps authentication cheap on every request.

Handlers read the caller's key id with :func:`key_id` (``request.get(KEY_ID)``); it is ``None`` when keys are off.
A route opts out of bearer auth with the :func:`public` marker (health; a webhook that authenticates by signature).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from mvserver.appkeys import KEYRING, SIGNER
from mvserver.core.artefacts import Artefacts, write_bytes_atomic
from mvserver.core.config import ConfigError
from mvserver.core.errors import ApiError
from mvserver.web.access.signing import links_expire_by

log = logging.getLogger("mvserver")

KEY_ID_PATTERN = r"k[0-9a-f]{12}"
_TOKEN = re.compile(rf"mv_({KEY_ID_PATTERN})_([A-Za-z0-9_-]{{43}})")
RELOAD_INTERVAL = 1.0  # seconds between checks of the keys file for changes (revocations apply without restart)
REALM = 'Bearer realm="mvserver"'


class KeyLimits(BaseModel):
    """Per-key quotas; ``None`` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    jobs_per_minute: float | None = Field(default=10, gt=0)
    jobs_burst: PositiveInt = 5
    blocking_per_minute: float | None = Field(default=30, gt=0)
    blocking_burst: PositiveInt = 10
    max_running_jobs: PositiveInt | None = 4
    uploads_per_minute: float | None = Field(default=10, gt=0)  # upload_audio requests (a token each)
    uploads_burst: PositiveInt = 5
    max_concurrent_uploads: PositiveInt | None = 2  # of this key at once, per process
    # Spending per calendar month (UTC), in the price table's currency (settings/pricing.yaml); None: no limit
    monthly_budget: float | None = Field(default=None, ge=0)


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=rf"^{KEY_ID_PATTERN}$")
    name: str = Field(min_length=1, max_length=100)
    hash: str = Field(pattern=r"^hmac-sha256:[0-9a-f]{64}$")
    created_at: str
    revoked_at: str | None = None
    limits: KeyLimits = KeyLimits()
    # Webhooks out: the secret that signs this key's deliveries (printed once by ``keys create``), and the
    # webhook_url / webhook_events its jobs get when a request names none.
    webhook_secret: str | None = Field(default=None, pattern=r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$")
    webhook_url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    webhook_events: Literal["completed", "all"] | None = None
    admin: bool = False  # may read every key's usage (GET /api/mv/usage)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyRecord] = []


def hash_secret(key_id: str, secret: str) -> str:
    return "hmac-sha256:" + hmac.digest(key_id.encode(), secret.encode(), "sha256").hex()


def read_keys(path: Path) -> KeysFile:
    """Parse a keys file (JSON if it ends in ``.json``, YAML otherwise); ConfigError naming the file if invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: keys file is missing (create a key with: python -m mvserver keys create NAME)"
        ) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return KeysFile.model_validate(data if data is not None else {})
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a valid keys file: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def write_keys(path: Path, keys: KeysFile) -> None:
    """Write the keys file atomically with mode 0600 (temporary file in the same directory, fsync, rename)."""
    data = keys.model_dump(mode="json")
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    write_bytes_atomic(path, text.encode("utf-8"), mode=0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise edits of the keys file between concurrent CLI runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_key(path: Path, name: str, limits: KeyLimits | None = None, *, admin: bool = False) -> tuple[KeyRecord, str]:
    """Add a key to the file (created if missing); return its record and the key itself, which is not stored."""
    with _locked(path):
        keys = read_keys(path) if path.exists() else KeysFile()
        taken = {k.id for k in keys.keys}
        key_id = "k" + secrets.token_hex(6)
        while key_id in taken:
            key_id = "k" + secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(
            id=key_id,
            name=name,
            hash=hash_secret(key_id, secret),
            created_at=_now(),
            limits=limits or KeyLimits(),
            admin=admin,
            webhook_secret=new_webhook_secret(),
        )
        keys.keys.append(record)
        write_keys(path, keys)
    return record, f"mv_{key_id}_{secret}"


def revoke_key(path: Path, key_id: str) -> KeyRecord | None:
    """Mark a key revoked (kept in the file so its id is never reused); None if there is no such active key."""
    with _locked(path):
        keys = read_keys(path)
        for i, record in enumerate(keys.keys):
            if record.id == key_id and record.active:
                keys.keys[i] = record.model_copy(update={"revoked_at": _now()})
                write_keys(path, keys)
                return keys.keys[i]
    return None


class KeyRing:
    """The active keys of the keys file, re-read when the file changes (checked at most every ``reload_interval``
    seconds, :data:`RELOAD_INTERVAL` by default)."""

    def __init__(self, path: Path, reload_interval: float = RELOAD_INTERVAL):
        self.path = path
        self.reload_interval = reload_interval
        self._keys: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        stat = self.path.stat() if self.path.exists() else None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat else None
        if stamp == self._stamp and self._stamp is not None:
            return
        keys = read_keys(self.path)
        self._keys = {k.id: k for k in keys.keys if k.active}
        self._stamp = stamp

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_interval:
            return
        self._checked = now
        try:
            self._load()
        except (ConfigError, OSError) as exc:  # a half-edited file: keep the keys we have
            log.warning("keys file not reloaded: %s", exc)

    def get(self, key_id: str) -> KeyRecord | None:
        """The active key with this id, or None."""
        self._refresh()
        return self._keys.get(key_id)

    def authenticate(self, token: str) -> KeyRecord | None:
        """The active key matching ``token``; the hash comparison takes the same time whatever the input."""
        match = _TOKEN.fullmatch(token)
        key_id, secret = match.groups() if match else ("k000000000000", "")
        record = self.get(key_id)
        expected = record.hash if record else "hmac-sha256:" + "0" * 64
        ok = hmac.compare_digest(hash_secret(key_id, secret).encode(), expected.encode())
        return record if ok and record is not None and match is not None else None


KEY_ID = web.RequestKey("key_id", str)
API_KEY = web.RequestKey("api_key", KeyRecord)

Handler = TypeVar("Handler", bound=Callable[..., Any])


def public(handler: Handler) -> Handler:
    """Mark a route as reachable without a key (it authenticates some other way, or exposes nothing)."""
    handler.mv_public = True  # type: ignore[attr-defined]
    return handler


def key_id(request: web.Request) -> str | None:
    """The caller's key id, or None when keys are off (or the route is public)."""
    return request.get(KEY_ID)


def protected(request: web.Request) -> bool:
    """Every ``/api/mv/*`` route and ``/metrics`` needs a key, except public routes and CORS preflights."""
    path = request.path
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else path  # the route matched, however it was spelled
    if not any(p.startswith("/api/mv/") or p == "/metrics" for p in (path, canonical)):
        return False
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return False
    return not getattr(request.match_info.handler, "mv_public", False)


def _unauthorized(code: str, message: str, challenge: str, metrics_hook: Callable[[str], None] | None) -> web.Response:
    if metrics_hook is not None:
        metrics_hook(code)
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=401, headers={"WWW-Authenticate": challenge}
    )


def make_auth_middleware(on_failure: Callable[[str], None] | None = None) -> Callable[..., Any]:
    """The middleware that admits a request with a valid bearer key or signed link (installed only with keys on)."""

    @web.middleware
    async def auth_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not protected(request):
            return await handler(request)
        keyring = request.app[KEYRING]
        header = request.headers.get("Authorization")
        if header is None and "sig" in request.query:
            try:
                record = keyring.get(request.app[SIGNER].verify(request))
                if record is None:
                    raise ApiError(403, "invalid_signature", "the key this link was made for has been revoked")
            except ApiError as exc:  # 403: tampered, expired, or the key is revoked
                if on_failure is not None:
                    on_failure(exc.info.code)
                raise
            request[KEY_ID] = record.id
            request[API_KEY] = record
            with links_expire_by(int(request.query["exp"])):  # what it hands out must not outlive this link
                return await handler(request)
        elif header is None:
            return _unauthorized("auth_required", "this route needs Authorization: Bearer <API key>", REALM, on_failure)
        else:
            scheme, _, token = header.partition(" ")
            found = keyring.authenticate(token.strip()) if scheme.lower() == "bearer" else None
            if found is None:
                return _unauthorized(
                    "invalid_api_key",
                    "the API key is not valid (or has been revoked)",
                    f'{REALM}, error="invalid_token"',
                    on_failure,
                )
            record = found
        request[KEY_ID] = record.id
        request[API_KEY] = record
        return await handler(request)

    return auth_middleware


# -- ownership -------------------------------------------------------------------------------------------------------


def visible_to(owner_key_id: Any, caller: str | None) -> bool:
    """Whether the caller may see or use a resource: keys off (``caller`` None), an unowned resource (made with
    keys off), or its owner. The one ownership rule of every route (jobs, projects, songs, images, scenes)."""
    return caller is None or owner_key_id is None or owner_key_id == caller


async def owned_sidecar(artefacts: Artefacts, key: str, caller: str | None) -> dict[str, Any] | None:
    """The JSON sidecar ``key`` of a saved artefact (a song's, an image's, a scene list's) if it is there, is an
    object and ``caller`` may see it (:func:`visible_to`); None otherwise: a missing, an unreadable and another key's
    artefact look the same."""
    sidecar = await artefacts.get_json(key)
    if not isinstance(sidecar, dict) or not visible_to(sidecar.get("owner_key_id"), caller):
        return None
    return sidecar


def owned(request: web.Request, owner_key_id: Any) -> bool:
    """:func:`visible_to` for the caller of ``request``."""
    return visible_to(owner_key_id, key_id(request))


def require_owner(owner_key_id: Any, caller: str | None, not_found: ApiError) -> None:
    """Raise ``not_found`` (the exact error an unknown id gets: never 403, so ids do not leak) unless the caller
    may see the resource."""
    if not visible_to(owner_key_id, caller):
        raise not_found
