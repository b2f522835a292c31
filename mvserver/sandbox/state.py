"""The provider simulator's state: its knobs, persisted records, injected faults, and the keys of its app.

Predictions and operations are stored as JSON records under ``state_dir`` and their status is derived from the time
they were created, so they outlive a restart exactly like a remote service's would. Faults are injected per route
with :meth:`Simulator.add_fault` (in process) or ``POST /_sim/faults`` (out of process).

A leaf of the sandbox: the API modules (:mod:`~mvserver.sandbox.gemini_api`, :mod:`~mvserver.sandbox.replicate_api`,
:mod:`~mvserver.sandbox.webhooks`) read the state through these keys, and :mod:`mvserver.sandbox.app` builds the app
from them, so nothing here imports back.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web

from mvserver.core.artefacts import write_bytes_atomic

if TYPE_CHECKING:
    from mvserver.sandbox.webhooks import WebhookSender

FaultKind = Literal[
    "status",
    "reset",
    "hang",
    "truncate",
    "invalid_json",
    "stall",
    "fail_prediction",
    # webhook deliveries (route ``replicate.webhook``), see :mod:`mvserver.sandbox.webhooks`
    "duplicate",
    "out_of_order",
    "drop",
    "delay",
    "bad_signature",
    "old_timestamp",
]


@dataclass
class Fault:
    """One injected failure for requests to ``route`` (a route name such as ``replicate.get``; ``*`` for all).

    ``status``: answer ``status`` with ``body`` (and ``Retry-After`` when ``retry_after`` is set); ``reset``: drop
    the connection; ``hang``: never answer; ``truncate``: send half a body and close; ``invalid_json``: a 200 that is
    not JSON; ``stall`` (``replicate.files.get``): a whole 200 whose body pauses, the first ``after_bytes`` bytes
    then ``seconds`` of silence then the rest (a slow download, or with a long pause one that dies mid-body);
    ``fail_prediction``: the next prediction/operation created on ``route`` ends failed with ``error``.
    Webhook kinds (route ``replicate.webhook``) hit the next ``times`` deliveries of ``event`` (any event when
    unset); ``delay`` waits ``seconds``.
    """

    route: str
    kind: FaultKind = "status"
    status: int = 500
    body: Any = None
    retry_after: float | None = None
    error: Any = None
    times: int = 1
    event: str | None = None
    seconds: float = 1.0
    after_bytes: int = 0


@dataclass
class Simulator:
    """State and knobs of one simulator instance."""

    state_dir: Path
    video_latency: float = 12.0
    image_latency: float = 1.5
    scenes_latency: float = 0.5
    render_cache: bool = False  # identical video requests share one rendered MP4 (benchmarks)
    # where render_cache keeps the MP4s (default state_dir/cache); simulators, also in other processes, may share one
    render_cache_dir: Path | None = None
    output_pad_bytes: int = 0  # bytes of MP4 ``free`` box appended to each rendered video (large-file benchmarks)
    # Outputs rendered at once by one simulator app (the others wait): each may decode a reference image of up to
    # 40 MP (about 40 MB for a 1-bit or palette PNG, 160 MB for an RGB one) and runs an ffmpeg.
    max_concurrent_renders: int = 2
    faults: list[Fault] = field(default_factory=list)
    # faults as they took effect (route, kind, path; a stall once its first bytes are out, with ``bytes_sent``), for
    # tests: ``GET /_sim/faults`` lists them with the pending ones
    applied: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))
    # The Replicate token this simulator answers (any other gets 401, as on Replicate) and the only caller its webhook
    # secret is given to; None: any token is taken, and the secret is given to no one.
    api_token: str | None = field(default=None, repr=False)
    webhook_secret: str = field(
        default_factory=lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(), repr=False
    )
    webhook_retry_seconds: float = 60.0  # how long a terminal webhook that gets no 2xx is retried
    # (event, fault, HTTP status) of the latest webhook deliveries, for tests
    webhook_deliveries: collections.deque[tuple[str, str | None, int | None]] = field(
        default_factory=lambda: collections.deque(maxlen=10_000)
    )
    requests: list[tuple[str, str]] = field(default_factory=list)  # (route name, path) seen, for tests
    prompts: deque[str] = field(default_factory=lambda: deque(maxlen=100))  # last Gemini prompts received, for tests
    # the inline data parts (MIME type, size, SHA-256) of each of those Gemini requests, for tests
    inline_parts: deque[list[dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=100))

    def __post_init__(self) -> None:
        for kind in ("predictions", "operations", "files"):
            (self.state_dir / kind).mkdir(parents=True, exist_ok=True)

    # -- faults ------------------------------------------------------------------------------------------------

    def add_fault(self, route: str, kind: FaultKind = "status", **options: Any) -> Fault:
        fault = Fault(route=route, kind=kind, **options)
        self.faults.append(fault)
        return fault

    def take_fault(self, route: str, kinds: tuple[str, ...] | None = None, event: str | None = None) -> Fault | None:
        """The first pending fault for ``route`` (optionally of the given kinds, or for ``event``); it is used up."""
        for fault in self.faults:
            if fault.route in (route, "*") and (kinds is None or fault.kind in kinds) and fault.event in (None, event):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    # -- records -----------------------------------------------------------------------------------------------

    def record_path(self, kind: str, record_id: str) -> Path:
        if not record_id.replace("-", "").replace("_", "").isalnum():
            raise web.HTTPNotFound()
        return self.state_dir / kind / f"{record_id}.json"

    def save(self, kind: str, record_id: str, record: dict[str, Any]) -> None:
        write_bytes_atomic(self.record_path(kind, record_id), json.dumps(record).encode())

    def load(self, kind: str, record_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path(kind, record_id).read_text())
        except FileNotFoundError:
            return None

    @staticmethod
    def elapsed(record: dict[str, Any]) -> float:
        return time.time() - record["created_at"]


SIMULATOR: web.AppKey[Simulator] = web.AppKey("simulator")
RENDER_SLOTS: web.AppKey[asyncio.Semaphore] = web.AppKey("render_slots")  # renders (image, video, lip sync) at once
SENDER: web.AppKey[WebhookSender] = web.AppKey("webhook_sender")  # the simulated Replicate webhooks
