"""Webhooks out: a job with a ``webhook_url`` tells the client's backend about its status changes, signed per
Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``, with the ``standardwebhooks``
library), retried with exponential backoff for ``jobs.webhook_retry_seconds`` (a day), at least once and in order
per job, from the job store (:mod:`mvserver.jobs.outbox`), so a restart or a killed node loses none.

The secret is the job's key's ``webhook_secret`` (``whsec_...``, printed once by ``keys create``); with keys off, or
for a key without one, ``MV_WEBHOOK_SECRET``. A URL whose host is, or resolves to, a loopback, private, link-local
or otherwise non-public address is refused (at submit for an address, and at every connection through the
resolver below, so a name that changes its address later is caught), unless ``MV_WEBHOOK_ALLOWED_NETWORKS``
allows it; sandbox mode allows loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from standardwebhooks import Webhook

from mvserver.appkeys import CONFIG, JOBS, KEYRING, STORE, WEBHOOK_SENDER
from mvserver.core.config import EnvSettings, JobsSettings
from mvserver.core.errors import ApiError
from mvserver.jobs import JobEngine
from mvserver.jobs.model import FINAL_STATUSES, Event, Job
from mvserver.jobs.outbox import FileOutbox, Outbox, Record, RedisOutbox

log = logging.getLogger("mvserver.webhooks_out")

EVENT_FILTERS = ("completed", "all")
STATUS_EVENTS = frozenset({"queued", "running", *FINAL_STATUSES})  # "all": every status change, not progress
SAFETY_SECONDS = 30.0  # a scheduled record with nothing to send looks at its job again this often
CONCURRENCY = 16  # jobs whose deliveries are sent at once, per node
ATTEMPTS_KEPT = 20  # attempts shown per delivery (the first and the last ones)
KEEP_SECONDS = 30 * 86400  # a finished record (Redis) is kept this long for GET .../deliveries
USER_AGENT = "mvserver-webhooks/1"


# -- which addresses may be reached ------------------------------------------------------------------------------


def allowed_networks(env: EnvSettings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = [ipaddress.ip_network(item, strict=False) for item in env.webhook_allowed_networks]
    if env.sandbox:
        networks += [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    return networks


def refused_address(address: str, allowed: list[Any]) -> bool:
    """True for an address webhooks may not reach: anything not globally routable, unless allow-listed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allowed):
        return False
    return not ip.is_global or ip.is_multicast


class RefusedAddress(OSError):
    """A webhook host resolved to an address webhooks may not reach."""


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing hosts that resolve to a non-public address (checked at connect time, so a
    DNS answer that changed since the submit is caught too)."""

    def __init__(self, allowed: list[Any]):
        self.allowed = allowed
        self.inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            if refused_address(result["host"], self.allowed):
                raise RefusedAddress(f"refused: {host} resolves to {result['host']}, not a public address")
        return results

    async def close(self) -> None:
        await self.inner.close()


def check_url(url: str, allowed: list[Any]) -> str:
    """A webhook URL: http(s), a host, no credentials, and not an address webhooks may not reach; else
    ValueError (pydantic turns it into a 400 naming the field)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http or https URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials")
    try:
        refused = refused_address(parts.hostname, allowed)
    except ValueError:  # a name, not an address: checked when connecting
        return url
    if refused:
        raise ValueError(f"{parts.hostname} is not a public address (MV_WEBHOOK_ALLOWED_NETWORKS allows more)")
    return url


# -- the sender --------------------------------------------------------------------------------------------------


def _now_iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, tz=UTC).isoformat().replace("+00:00", "Z")


def wanted(event: Event, events: str) -> bool:
    """Whether an event passes a record's filter: ``completed`` (the final event) or ``all`` status changes."""
    return event.final if events == "completed" else event.event in STATUS_EVENTS


def payload(job_id: str, event: Event) -> str:
    """The body: ``{"type": "job.<event>", "timestamp", "data": <the event's job state>}``."""
    stamp = event.data.get("event_time") or time.time()
    return json.dumps(
        {
            "type": f"job.{event.event}",
            "timestamp": _now_iso(stamp),
            "job_id": job_id,
            "event_id": event.id,
            "data": event.data,
        },
        separators=(",", ":"),
    )


def new_record(job: Job) -> Record:
    return {
        "job_id": job.id,
        "url": job.webhook_url,
        "events": job.webhook_events or "completed",
        "owner": job.owner,
        "cursor": 0,
        "deliveries": [],
    }


class WebhookSender:
    """Sends the deliveries of every job with a webhook: claims due records, one task per job, in order."""

    def __init__(self, app: web.Application, engine: JobEngine, outbox: Outbox, settings: JobsSettings):
        self.app = app
        self.engine = engine
        self.outbox = outbox
        self.settings = settings
        self.env: EnvSettings = app[CONFIG].env
        self.allowed = allowed_networks(self.env)
        self.session: aiohttp.ClientSession | None = None
        self.running: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._wakeup = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._pokes: set[asyncio.Task[None]] = set()
        self._due_again: set[str] = set()
        self._closing = False
        # A claimed record is due again after this, should its claimer die: the job lease's length, and always
        # longer than an attempt, so a live sender keeps it.
        self.lease = max(settings.lease_seconds, 3 * settings.webhook_timeout_seconds)

    async def start(self) -> None:
        await self.outbox.open()
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allowed), limit=CONCURRENCY * 2)
        self.session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT})
        self._loop = asyncio.get_running_loop().create_task(self._run(), name="webhooks-out")

    async def close(self) -> None:
        """Stop sending; records stay scheduled. Tasks are cancelled again until they end: redis-py on Python
        3.11 can swallow a cancellation that lands as a command returns (see the job engine's ``close``)."""
        self._closing = True
        pending = {task for task in (self._loop, *self.running.values(), *self._pokes) if task is not None}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        if self.session is not None:
            await self.session.close()

    # engine hooks

    async def before_create(self, job: Job) -> None:
        """Apply the key's default webhook, then write the job's record before the job exists: no event of it
        can be missed."""
        keyring = self.app.get(KEYRING)
        key = keyring.get(job.owner) if keyring is not None and job.owner is not None else None
        if job.webhook_url is None and key is not None and key.webhook_url:
            job.webhook_url = key.webhook_url
            job.webhook_events = job.webhook_events or key.webhook_events
        if not job.webhook_url:
            return
        if self._secret(job.owner) is None:
            raise ApiError(
                400,
                "webhooks_not_configured",
                "webhook_url: this server has no signing secret for "
                "this key's webhooks (a key from keys create, or MV_WEBHOOK_SECRET)",
                field="webhook_url",
            )
        await self.outbox.put(job.id, new_record(job), time.time())

    def published(self, job: Job, event: Event) -> None:
        """A job wrote an event: if it may be delivered, look at the job's record now rather than later."""
        if not job.webhook_url or not wanted(event, job.webhook_events or "completed"):
            return
        task = asyncio.get_running_loop().create_task(self._poke(job.id))
        self._pokes.add(task)
        task.add_done_callback(self._pokes.discard)

    async def _poke(self, job_id: str) -> None:
        with contextlib.suppress(Exception):  # the safety re-check delivers it anyway
            await self.outbox.wake(job_id)
        self._wakeup.set()

    async def redeliver(self, job: Job, event_id: int | None) -> int:
        """Send again from ``event_id`` (default: the job's last wanted event) on: that event and every later
        wanted one go out again, in order, as new deliveries. Returns the event id."""
        record = await self.outbox.get(job.id)
        if record is None:
            raise ApiError(404, "not_found", f"job {job.id} has no webhook", field="job_id")
        if event_id is None:
            events = [e.id for e in await self.engine.events(job.id, 0) if wanted(e, record["events"])]
            if not events:
                raise ApiError(409, "nothing_to_redeliver", "the job has no event its webhook sends yet")
            event_id = events[-1]
        if not 1 <= event_id <= job.last_event_id:
            raise ApiError(400, "invalid_field", f"event_id: from 1 to {job.last_event_id}", field="event_id")
        await self.outbox.ask_again(job.id, event_id)
        self._wakeup.set()
        return event_id

    # the loop

    async def _run(self) -> None:
        while not self._closing:
            try:
                ids = await self.outbox.claim(CONCURRENCY, self.lease)
            except Exception:
                log.exception("claiming webhook deliveries failed")
                ids = []
            for job_id in ids:
                if job_id in self.running:  # due again while being worked on: once more when that ends
                    self._due_again.add(job_id)
                    continue
                await self._slots.acquire()
                task = asyncio.get_running_loop().create_task(self._work(job_id), name=f"webhooks-{job_id}")
                self.running[job_id] = task

                def worked(_: asyncio.Task[None], job_id: str = job_id) -> None:
                    self._worked(job_id)

                task.add_done_callback(worked)
            if len(ids) == CONCURRENCY:
                continue
            await self._sleep()

    def _worked(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        self._slots.release()
        if job_id in self._due_again:
            self._due_again.discard(job_id)
            task = asyncio.get_running_loop().create_task(self._poke(job_id))
            self._pokes.add(task)
            task.add_done_callback(self._pokes.discard)

    async def _sleep(self) -> None:
        """Until the next record is due (at most a second: other nodes schedule records too), or a wake-up."""
        due = None
        with contextlib.suppress(Exception):
            due = await self.outbox.next_due()
        wait = 1.0 if due is None else min(1.0, max(0.0, due - time.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), wait)
        self._wakeup.clear()

    async def _work(self, job_id: str) -> None:
        try:
            await self._deliver_job(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # the record stays leased and comes back due after the lease
            log.exception("job %s: webhook deliveries failed", job_id)

    async def _deliver_job(self, job_id: str) -> None:
        record = await self.outbox.get(job_id)
        if record is None:
            return
        job = await self.engine.get(job_id)
        if job is None:  # its create failed (or it expired): nothing will come
            await self.outbox.put(job_id, record, None)
            return
        again = await self.outbox.take_ask(job_id)
        if again is not None:  # redeliver: from that event on, as new deliveries after the ones pending
            record["cursor"] = min(record["cursor"], again - 1)
            record["deliveries"] = [
                d for d in record["deliveries"] if d["status"] != "pending" or d["event_id"] < again
            ]
        for event in await self.engine.events(job_id, record["cursor"]):
            if wanted(event, record["events"]):
                record["deliveries"].append(
                    {
                        "webhook_id": f"msg_{job_id}_{event.id}",
                        "event_id": event.id,
                        "type": f"job.{event.event}",
                        "status": "pending",
                        "attempts": [],
                        "attempt_count": 0,
                        "body": payload(job_id, event),
                    }
                )
            record["cursor"] = event.id
        for delivery in record["deliveries"]:
            if delivery["status"] != "pending":
                continue
            next_at = await self._attempt(record, delivery)
            if next_at is not None:  # not delivered yet: later ones wait behind it (in order per job)
                await self.outbox.put(job_id, record, next_at)
                self._wakeup.set()  # the loop may be sleeping towards a later time
                return
            await self.outbox.put(job_id, record, time.time() + self.lease)  # done: shown at once; still ours
        done = job.final and record["cursor"] >= job.last_event_id
        await self.outbox.put(job_id, record, None if done else time.time() + SAFETY_SECONDS)

    def _secret(self, owner: str | None) -> str | None:
        keyring = self.app.get(KEYRING)
        if owner is not None and keyring is not None:
            key = keyring.get(owner)
            if key is not None and key.webhook_secret:
                return key.webhook_secret
        return self.env.webhook_signing_key

    async def _attempt(self, record: Record, delivery: dict[str, Any]) -> float | None:
        """POST one delivery; None once it is done (delivered, or given up), else when to try again."""
        assert self.session is not None
        now = time.time()
        delivery.setdefault("first_attempt_at", now)
        result: dict[str, Any] = {"at": now, "http_status": None, "error": None}
        secret = self._secret(record.get("owner"))
        try:
            if secret is None:
                raise RuntimeError("no signing secret (the key has no webhook_secret and MV_WEBHOOK_SECRET is unset)")
            check_url(record["url"], self.allowed)  # an address in the URL itself bypasses the resolver
            stamp = datetime.now(UTC)
            headers = {
                "webhook-id": delivery["webhook_id"],
                "webhook-timestamp": str(int(stamp.timestamp())),
                "webhook-signature": Webhook(secret).sign(delivery["webhook_id"], stamp, delivery["body"]),
                "Content-Type": "application/json",
            }
            timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds)
            async with self.session.post(
                record["url"], data=delivery["body"].encode(), headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                result["http_status"] = response.status
                await response.content.read(1024)  # a little of the answer, then the connection is let go
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused address, DNS, connection, timeout: a failed attempt like a 5xx
            cause = getattr(exc, "os_error", None)  # aiohttp wraps what the resolver raised
            shown = cause if isinstance(cause, RefusedAddress) else exc
            result["error"] = f"{shown.__class__.__name__}: {shown}"[:300]
        result["seconds"] = round(time.time() - now, 3)
        delivery["attempt_count"] += 1
        attempts = delivery["attempts"] + [result]
        delivery["attempts"] = (
            attempts if len(attempts) <= ATTEMPTS_KEPT else attempts[:1] + attempts[-ATTEMPTS_KEPT + 1 :]
        )
        status = result["http_status"]
        if status is not None and 200 <= status < 300:
            delivery["status"] = "delivered"
            return None
        if time.time() - delivery["first_attempt_at"] >= self.settings.webhook_retry_seconds:
            delivery["status"] = "failed"  # given up; the next delivery of the job may go
            log.warning(
                "job %s: webhook %s given up after %d attempts",
                record["job_id"],
                delivery["webhook_id"],
                delivery["attempt_count"],
            )
            return None
        s = self.settings
        delay = min(
            s.webhook_retry_initial_seconds * 2 ** (delivery["attempt_count"] - 1), s.webhook_retry_max_delay_seconds
        )
        return time.time() + delay * random.uniform(0.9, 1.1)


# -- routes --------------------------------------------------------------------------------------------------------


def public_record(record: Record) -> dict[str, Any]:
    """A record as ``GET .../deliveries`` shows it: every delivery and its attempts, without the bodies."""
    deliveries = [{k: v for k, v in d.items() if k != "body"} for d in record["deliveries"]]
    return {
        "job_id": record["job_id"],
        "webhook_url": record["url"],
        "webhook_events": record["events"],
        "deliveries": deliveries,
    }


async def _owned_job(request: web.Request) -> Job:
    from mvserver.jobs.routes import _job  # the job of the path, 404 unless the caller may see it

    return await _job(request)


async def job_deliveries(request: web.Request) -> web.Response:
    job = await _owned_job(request)
    record = await request.app[WEBHOOK_SENDER].outbox.get(job.id)
    if record is None:  # a job without a webhook: nothing sent
        return web.json_response({"job_id": job.id, "webhook_url": None, "webhook_events": None, "deliveries": []})
    return web.json_response(public_record(record))


async def redeliver(request: web.Request) -> web.Response:
    """Send again from ``event_id`` (optional body ``{"event_id": n}``; default the last delivery's event)."""
    job = await _owned_job(request)
    event_id = None
    if request.can_read_body:
        from mvserver.core.validation import json_object

        body = json_object(await request.read())
        unknown = set(body) - {"event_id"}
        if unknown:
            name = sorted(unknown)[0]
            raise ApiError(
                400, "unknown_field", f"{name} is not a known field (this action takes event_id)", field=name
            )
        event_id = body.get("event_id")
        if event_id is not None and (not isinstance(event_id, int) or isinstance(event_id, bool)):
            raise ApiError(400, "invalid_field", "event_id: an integer", field="event_id")
    event_id = await request.app[WEBHOOK_SENDER].redeliver(job, event_id)
    return web.json_response({"job_id": job.id, "event_id": event_id}, status=202)


async def sender_context(app: web.Application) -> AsyncIterator[None]:
    """Start sending once the job engine runs; its hooks write records and wake the sender."""
    engine = app[JOBS]
    config = app[CONFIG]
    if config.env.redis_url:
        from mvserver.jobs.redis_store import RedisJobStore  # what app.job_store makes with a Redis URL

        assert isinstance(engine.store, RedisJobStore)
        outbox: Outbox = RedisOutbox(engine.store.r, config.env.redis_prefix, KEEP_SECONDS)
    else:
        outbox = FileOutbox(app[STORE])
    sender = WebhookSender(app, engine, outbox, config.videos.jobs)
    app[WEBHOOK_SENDER] = sender
    await sender.start()
    engine.hooks.before_create = sender.before_create
    engine.hooks.published = sender.published
    try:
        yield
    finally:
        await sender.close()
