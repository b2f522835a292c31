"""Simulated Replicate webhooks: signed deliveries of a prediction's ``start``, ``logs`` and ``completed`` events.

Replicate signs deliveries the Standard Webhooks way: ``webhook-id`` (one per event; a retry or duplicate keeps it),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``,
keyed with the base64 part of the ``whsec_...`` secret that ``GET /v1/webhooks/default/secret`` returns. The body
is the prediction exactly as ``GET /v1/predictions/{id}`` returns it at that moment. ``logs`` deliveries are
throttled to one per 500 ms; only the terminal ``completed`` one is retried (backoff, for about a minute) when it
gets no 2xx, as Replicate documents.

One task per prediction (owned by :class:`WebhookSender`, cancelled at shutdown) sleeps until each transition; a
prediction gets at most :data:`MAX_DELIVERIES` POSTs. Faults: a :class:`~.state.Fault` on route
``replicate.webhook`` (optionally for one ``event``) hits the next deliveries; the prompt marker
``[sandbox:webhook-<kind>]`` hits every delivery of that prediction.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

import aiohttp
from aiohttp import web

from mvserver.sandbox.predictions import STARTING_SHARE, TERMINAL, deadline_end, phase
from mvserver.sandbox.state import Simulator

log = logging.getLogger("mvserver.sandbox.webhooks")

ROUTE = "replicate.webhook"
EVENTS = ("start", "output", "logs", "completed")
DEFAULT_EVENTS = ("output", "completed")  # Replicate's default: new outputs and the end (outputs come at the end here)
FAULT_KINDS = ("duplicate", "out_of_order", "drop", "delay", "bad_signature", "old_timestamp")
LOGS_THROTTLE_SECONDS = 0.5
MAX_DELIVERIES = 64  # POSTs per prediction, retries and duplicates included
DELIVERY_TIMEOUT_SECONDS = 5.0  # "respond with a 2xx within a few seconds"
REPLAY_AGE_SECONDS = 600  # how old an ``old_timestamp`` delivery claims to be
_RETRY_SHARES = (1, 2, 4, 8, 16, 29)  # waits between terminal attempts, in sixtieths of the retry window
_MARKER = re.compile(r"\[sandbox:webhook-(" + "|".join(FAULT_KINDS) + r")\]")

Current = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Render = Callable[[dict[str, Any]], dict[str, Any]]


def fault_marker(prompt: str) -> str | None:
    """The webhook fault a prompt asks for with ``[sandbox:webhook-<kind>]``, if any."""
    match = _MARKER.search(prompt)
    return match.group(1) if match else None


def invalid_webhook_fields(body: dict[str, Any]) -> list[dict[str, str]]:
    """Problems with the create body's ``webhook`` / ``webhook_events_filter``, worded like Replicate's validator."""
    problems = []
    url = body.get("webhook")
    if url is not None and not (isinstance(url, str) and re.match(r"^https?://[^\s]+$", url)):
        problems.append({"type": "format", "field": "webhook", "description": "Does not match format 'uri'"})
    events = body.get("webhook_events_filter")
    if events is not None and not (isinstance(events, list) and all(e in EVENTS for e in events)):
        allowed = ", ".join(json.dumps(e) for e in EVENTS)
        problems.append(
            {
                "type": "enum",
                "field": "webhook_events_filter",
                "description": f"webhook_events_filter items must be one of the following: {allowed}",
            }
        )
    return problems


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<signature>`` for ``body`` under ``secret`` (``whsec_<base64 key>``)."""
    key = base64.b64decode(secret.partition("_")[2])
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass
class _Delivery:
    """One event of one prediction: its id and body never change across retries and duplicates."""

    event: str
    webhook_id: str
    body: bytes
    fault: str | None = None
    delay: float = 1.0


@dataclass
class _Stream:
    """The deliveries of one prediction so far."""

    url: str
    sent: int = 0
    held: list[_Delivery] = field(default_factory=list)  # out-of-order deliveries waiting for the next one


class WebhookSender:
    """Delivers the webhooks of every prediction created with a ``webhook`` URL on one simulator app."""

    def __init__(self, sim: Simulator):
        self.sim = sim
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wakers: dict[str, asyncio.Event] = {}
        self.session: aiohttp.ClientSession | None = None

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """Own the HTTP session and the delivery tasks for the app's lifetime."""
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_SECONDS))
        try:
            yield
        finally:
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.session.close()

    def schedule(self, record: dict[str, Any], render: Render, current: Current) -> None:
        """Start delivering ``record``'s webhooks (``render`` gives its JSON now, ``current`` brings it to its end)."""
        if not record.get("webhook") or self.session is None:
            return
        prediction_id = record["id"]
        self.wakers[prediction_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._run(record, render, current), name=f"webhooks-{prediction_id}"
        )
        self.tasks[prediction_id] = task
        task.add_done_callback(lambda _: (self.tasks.pop(prediction_id, None), self.wakers.pop(prediction_id, None)))

    def wake(self, prediction_id: str) -> None:
        """The prediction changed out of turn (canceled): look at it now."""
        waker = self.wakers.get(prediction_id)
        if waker is not None:
            waker.set()

    async def _run(self, record: dict[str, Any], render: Render, current: Current) -> None:
        events = set(record.get("webhook_events_filter") or DEFAULT_EVENTS)
        stream = _Stream(record["webhook"])
        prediction_id, created, latency = record["id"], record["created_at"], record["latency"]
        if "start" in events:
            await self._deliver(stream, record, "start", render(record))
        last_logs = None
        while True:
            stage = phase(record)
            if stage in TERMINAL or stage == "ended":
                break
            wake_at = min(created + latency, deadline_end(record) or math.inf)
            if stage == "starting":
                wake_at = created + latency * STARTING_SHARE
            elif "logs" in events:
                body = render(record)
                if body["logs"] != last_logs:
                    await self._deliver(stream, record, "logs", body)
                    last_logs = body["logs"]
                wake_at = min(wake_at, time.time() + LOGS_THROTTLE_SECONDS)
            if await self._sleep_until(prediction_id, wake_at):
                stored = await asyncio.to_thread(self.sim.load, "predictions", prediction_id)
                record = stored or record
        record = await current(record)
        if "completed" in events or "output" in events:
            await self._deliver(stream, record, "completed", render(record), terminal=True)
        for held in stream.held:
            await self._post_all(stream, held, terminal=False)

    async def _sleep_until(self, prediction_id: str, when: float) -> bool:
        """Sleep until ``when``; True when woken early by :meth:`wake`."""
        waker = self.wakers[prediction_id]
        try:
            await asyncio.wait_for(waker.wait(), max(0.0, when - time.time()))
        except TimeoutError:
            return False
        waker.clear()
        return True

    async def _deliver(
        self, stream: _Stream, record: dict[str, Any], event: str, body: dict[str, Any], *, terminal: bool = False
    ) -> None:
        fault = self.sim.take_fault(ROUTE, FAULT_KINDS, event)
        delivery = _Delivery(
            event,
            "msg_" + secrets.token_urlsafe(18),
            json.dumps(body).encode(),
            fault=fault.kind if fault else record.get("webhook_fault"),
            delay=fault.seconds if fault else 1.0,
        )
        if delivery.fault == "drop":
            self._note(delivery, None)
            return
        if delivery.fault == "out_of_order" and not terminal:
            stream.held.append(delivery)  # goes out after the next delivery
            return
        if delivery.fault == "delay":
            await asyncio.sleep(delivery.delay)
        await self._post_all(stream, delivery, terminal=terminal)
        held, stream.held = stream.held, []
        for late in held:
            await self._post_all(stream, late, terminal=False)

    async def _post_all(self, stream: _Stream, delivery: _Delivery, *, terminal: bool) -> None:
        """POST the delivery (twice for ``duplicate``); a terminal one is retried with backoff until a 2xx."""
        waits = [share * self.sim.webhook_retry_seconds / 60 for share in _RETRY_SHARES] if terminal else []
        for wait in [0.0, *waits]:
            await asyncio.sleep(wait)
            ok = False
            for _ in range(2 if delivery.fault == "duplicate" else 1):
                ok = await self._post(stream, delivery) or ok
            if ok or stream.sent >= MAX_DELIVERIES:
                return

    async def _post(self, stream: _Stream, delivery: _Delivery) -> bool:
        if stream.sent >= MAX_DELIVERIES:
            return False
        stream.sent += 1
        timestamp = int(time.time()) - (REPLAY_AGE_SECONDS if delivery.fault == "old_timestamp" else 0)
        secret = self.sim.webhook_secret
        if delivery.fault == "bad_signature":
            secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Replicate-Webhook/1.0",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.webhook_id, timestamp, delivery.body),
        }
        status = None
        assert self.session is not None
        try:
            async with self.session.post(stream.url, data=delivery.body, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("webhook %s to %s failed: %s", delivery.event, stream.url, exc)
        self._note(delivery, status)
        return status is not None and 200 <= status < 300

    def _note(self, delivery: _Delivery, status: int | None) -> None:
        """Record (event, fault, HTTP status or None) for tests; ``None`` means nothing was answered or sent."""
        self.sim.webhook_deliveries.append((delivery.event, delivery.fault, status))
