"""``POST /api/mv/webhooks/replicate?job=<job_id>``: Replicate's prediction webhooks, verified and handed to the job.

Replicate reaches this route only when the server tells it where it is: ``MV_PUBLIC_BASE_URL`` (live), or, in
sandbox mode, the server's own loopback address (learnt from the first request it serves, since the port is known
only once it is bound; ``MV_SANDBOX_WEBHOOKS=false`` turns that off). The signature is checked with the replicate
client's ``Webhooks.validate`` with a timestamp tolerance, against ``MV_REPLICATE_WEBHOOK_SECRET`` or the secret
fetched once from the API at start-up. The route needs no API key (Replicate has none of ours); the signature is its
authentication. It answers at once: the job's own loop applies the update (:mod:`mvserver.jobs.updates`).
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from replicate.prediction import Prediction
from replicate.webhook import Webhooks, WebhookSigningSecret

from mvserver.appkeys import CONFIG, JOBS, METRICS, PROVIDERS, WEBHOOK_RECEIVER
from mvserver.core.artefacts import is_valid_id
from mvserver.core.config import ConfigError, EnvSettings
from mvserver.core.errors import ApiError
from mvserver.providers.base import WEBHOOK_PATH
from mvserver.providers.replicate import snapshot
from mvserver.web.access.auth import public
from mvserver.web.metrics import WEBHOOK_OUTCOMES

log = logging.getLogger("mvserver.webhooks")

TOLERANCE_SECONDS = 300  # a delivery whose timestamp is further from now than this is refused (replays)
MAX_BODY_BYTES = 2 * 1024 * 1024  # a prediction with its logs; larger bodies get 413
SEEN_IDS_MAX = 20_000  # webhook-ids remembered for deduplication (~2 MB at most)
SEEN_IDS_SECONDS = 2 * TOLERANCE_SECONDS  # older ids need not be kept: their timestamps fail the tolerance
_CHUNK = 64 * 1024
PREDICTION_STATUSES = frozenset({"starting", "processing", "succeeded", "failed", "canceled", "aborted"})


class SeenIds:
    """A bounded set of recently seen ``webhook-id`` values: oldest out first, and none kept past its TTL."""

    def __init__(self, max_size: int = SEEN_IDS_MAX, ttl: float = SEEN_IDS_SECONDS):
        self.max_size, self.ttl = max_size, ttl
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, key: str) -> bool:
        """Remember ``key``; False when it was already there."""
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values())) < now - self.ttl:
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        self._seen[key] = now
        if len(self._seen) > self.max_size:
            self._seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class WebhookReceiver:
    """Webhook state of one app: the signing secret (None: webhooks off) and the ids already seen."""

    loopback: bool = False  # sandbox mode: the base URL is taken from the first request served
    secret: str | None = None
    seen: SeenIds = field(default_factory=SeenIds)


def check_secret(secret: str) -> str:
    """A ``whsec_<base64>`` signing secret, or ConfigError."""
    prefix, _, key = secret.partition("_")
    try:
        if prefix != "whsec" or not base64.b64decode(key, validate=True):
            raise ValueError
    except (ValueError, binascii.Error):
        raise ConfigError("environment: MV_REPLICATE_WEBHOOK_SECRET is not a whsec_<base64> signing secret") from None
    return secret


def setup(app: web.Application, env: EnvSettings, replicate_sandboxed: bool) -> None:
    """Add the route and state; webhooks are on with ``MV_PUBLIC_BASE_URL`` or a sandboxed Replicate."""
    if env.replicate_webhook_signing_key:
        check_secret(env.replicate_webhook_signing_key)
    loopback = env.public_base_url is None and replicate_sandboxed and env.sandbox_webhooks
    app[WEBHOOK_RECEIVER] = WebhookReceiver(loopback=loopback)
    if METRICS in app:  # every outcome shows from the start (at 0), so a rate over it is defined
        for outcome in WEBHOOK_OUTCOMES:
            app[METRICS].webhook_deliveries.labels("replicate", outcome)
    if loopback:
        app.middlewares.append(loopback_base_middleware)
    if env.public_base_url or loopback:
        app.cleanup_ctx.append(webhooks_context)


async def webhooks_context(app: web.Application) -> AsyncIterator[None]:
    """Get the signing secret (from the environment, else once from the API); then new jobs ask for webhooks."""
    env, receiver = app[CONFIG].env, app[WEBHOOK_RECEIVER]
    secret = env.replicate_webhook_signing_key
    if secret is None:
        try:
            secret = check_secret(await app[PROVIDERS].replicate.webhook_secret())
        except (ApiError, ConfigError) as exc:
            log.error("could not get the Replicate webhook signing secret (%s); jobs poll instead", exc)
    receiver.secret = secret
    if secret is not None and env.public_base_url:
        app[JOBS].pushed.base_url = env.public_base_url
        log.info("Replicate webhooks on: %s%s", env.public_base_url, WEBHOOK_PATH)
    yield


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def loopback_base_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sandbox mode: the first request tells the server its own address, where the simulator sends webhooks."""
    pushed = request.app[JOBS].pushed
    if pushed.base_url is None and request.app[WEBHOOK_RECEIVER].secret is not None and request.transport is not None:
        host, port = request.transport.get_extra_info("sockname")[:2]
        pushed.base_url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("sandbox webhooks on: %s%s", pushed.base_url, WEBHOOK_PATH)
    return await handler(request)


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """The body, read chunk by chunk and refused with 413 as soon as it exceeds ``limit``."""
    too_large = ApiError(413, "request_too_large", f"a webhook body may be at most {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _prediction(body: str) -> Prediction:
    """The signed body as the replicate client's ``Prediction``. The fields we read are checked, the rest taken as
    sent: full pydantic validation would cost a quarter of a millisecond per delivery."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("id"), str)
        and data.get("status") in PREDICTION_STATUSES
        and isinstance(data.get("logs"), (str, type(None)))
    ):
        raise ApiError(400, "invalid_body", "the webhook body is not a prediction")
    if data["status"] == "aborted":  # a Cancel-After deadline reached before it ran: it ended unfinished
        data["status"] = "canceled"
    return Prediction.construct(**data)


def _ack(status: str, outcome: str | None = None) -> tuple[web.Response, str]:
    return web.json_response({"status": status}), outcome or status


def _refusal(error: ApiError, receiver: WebhookReceiver) -> str:
    """The ``mv_webhook_deliveries`` outcome of a refused delivery."""
    status = error.status
    if status == 401:
        return "not_enabled" if receiver.secret is None else "bad_signature"
    return "too_large" if status == 413 else "malformed" if status < 500 else "error"


@public  # authenticated by Replicate's signature, not by an API key
async def receive_replicate(request: web.Request) -> web.Response:
    """Verify a delivery; hand a new, matching update to its job; acknowledge anything verified with 200. With
    metrics on, every delivery is counted by outcome (``mv_webhook_deliveries_total``)."""
    outcome = "error"
    try:
        response, outcome = await _receive(request)
        return response
    except ApiError as exc:
        outcome = _refusal(exc, request.app[WEBHOOK_RECEIVER])
        raise
    finally:
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.webhook_delivery("replicate", outcome)


async def _receive(request: web.Request) -> tuple[web.Response, str]:
    receiver = request.app[WEBHOOK_RECEIVER]
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "a webhook body must be application/json", field="Content-Type")
    raw = await _read_capped(request, MAX_BODY_BYTES)
    if receiver.secret is None:
        raise ApiError(401, "webhook_unverified", "Replicate webhooks are not enabled on this server")
    try:
        body = raw.decode("utf-8")
        Webhooks.validate(
            headers=dict(request.headers),
            body=body,
            secret=WebhookSigningSecret(key=receiver.secret),
            tolerance=TOLERANCE_SECONDS,
        )
    except ValueError as exc:  # every WebhookValidationError, bad base64, a non-numeric timestamp, bad UTF-8
        log.warning("refused a webhook (%s) from %s", exc.__class__.__name__, request.remote)
        raise ApiError(401, "webhook_unverified", "missing or invalid webhook signature, or stale timestamp") from None
    job_id = request.query.get("job", "")
    if not is_valid_id(job_id):
        raise ApiError(400, "invalid_field", "job must be a job id", field="job")
    if not receiver.seen.add(request.headers["webhook-id"]):
        return _ack("duplicate")
    prediction = _prediction(body)
    engine = request.app[JOBS]
    job = await engine.get(job_id)
    if job is None or job.final or (job.prediction_id is not None and job.prediction_id != prediction.id):
        log.info(
            "webhook for job %s, prediction %s: no such running job or prediction; acknowledged", job_id, prediction.id
        )
        return _ack("ignored", "unknown_job" if job is None else "job_finished" if job.final else "other_prediction")
    await engine.provider_update(job_id, prediction.id, snapshot(prediction))
    return _ack("accepted")
