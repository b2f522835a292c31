"""Prometheus metrics (``MV_METRICS=true``): every metric of the service, in one registry per app.

A per-app :class:`~prometheus_client.CollectorRegistry` (never the global default one) lets several apps live in one
process, as in tests. Handlers and the job engine reach the metrics with ``request.app.get(METRICS)`` /
``app.get(METRICS)`` (None when metrics are off) and count on the objects below, e.g.
``metrics.jobs_finished.labels(kind="video", backend="replicate", status="succeeded").inc()``.

Labels are bounded: routes are route templates (never raw paths), statuses and codes are our own small sets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mvserver.appkeys import METRICS

if TYPE_CHECKING:
    from mvserver.jobs.census import Census

log = logging.getLogger("mvserver")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CENSUS_TIMEOUT_SECONDS = 5.0  # a job census that takes longer answers "unknown" (NaN) rather than hold the scrape
# accepted: handed to its job; duplicate: a webhook-id seen before; unknown_job / job_finished / other_prediction:
# verified but for no running job or another prediction (acknowledged, ignored); the rest were refused
WEBHOOK_OUTCOMES = (
    "accepted",
    "duplicate",
    "unknown_job",
    "job_finished",
    "other_prediction",
    "bad_signature",
    "not_enabled",
    "malformed",
    "too_large",
    "error",
)


class Metrics:
    """The metric objects of one app."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # HTTP
        self.http_requests = Counter(
            "mv_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_latency = Histogram(
            "mv_http_request_duration_seconds",
            "Time from the request reaching the app to the handler's return (an SSE stream counts its whole length)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Providers
        self.provider_latency = Histogram(
            "mv_provider_call_duration_seconds",
            "Provider API calls (create, get, cancel, generate...) by outcome",
            ["provider", "operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.provider_errors = Counter(
            "mv_provider_errors",
            "Failed provider API calls by our error code",
            ["provider", "operation", "code"],
            registry=registry,
        )
        # Access
        self.rate_limit_refusals = Counter(
            "mv_rate_limit_refusals",
            "Requests refused with 429 by the key quotas",
            ["bucket", "code"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "mv_auth_failures", "Requests refused for a missing or bad key or link", ["code"], registry=registry
        )
        # Job engine (wired by the job engine): the gauges of unfinished jobs are a census of the job store taken at
        # each scrape (jobs/census.py), the same cluster-wide values on every process sharing a Redis
        self.jobs = Gauge(
            "mv_jobs",
            "Unfinished jobs (queued, running) by status, kind and backend, counted in the "
            "job store at each scrape; on Redis every process reports the whole cluster "
            "(aggregate with max, not sum); no series while the store cannot be read; "
            "finished jobs: mv_jobs_finished_total",
            ["status", "kind", "backend"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            "mv_jobs_finished",
            "Jobs this process finished, by final status, kind and backend",
            ["status", "kind", "backend"],
            registry=registry,
        )
        self.job_cost = Counter(
            "mv_job_cost_micros",
            "Estimated cost of the jobs this process finished, in "
            "millionths of settings/pricing.yaml's currency, by model and "
            "basis (price_table, sandbox, local)",
            ["model", "basis"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "mv_job_queue_depth",
            "Unfinished jobs no process is running: waiting for a free "
            "slot (jobs.max_concurrent per process); cluster-wide like "
            "mv_jobs; NaN when the store cannot be read",
            registry=registry,
        )
        self.sse_subscribers = Gauge(
            "mv_sse_subscribers", "Open Server-Sent Events connections of this process", registry=registry
        )
        self.webhook_deliveries = Counter(
            "mv_webhook_deliveries",
            "Provider webhook deliveries received by this process, by outcome",
            ["provider", "outcome"],
            registry=registry,
        )
        self.census: Callable[[], Awaitable[Census]] | None = None  # plugged in by the job engine
        self._census_labels: set[tuple[str, str, str]] = set()
        self._census_task: asyncio.Future[None] | None = None

    def http_children(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        """The request counter and latency histogram of one (method, route, status); looked up once, then cached
        (bounded: route templates and statuses are finite sets)."""
        key = (method, route, status)
        children = self._http_children.get(key)
        if children is None:
            children = (self.http_requests.labels(method, route, str(status)), self.http_latency.labels(method, route))
            self._http_children[key] = children
        return children

    def observe_provider_call(self, provider: str, operation: str, seconds: float, error_code: str | None) -> None:
        """Record one provider call (the hook the provider clients call around each API request)."""
        outcome = "ok" if error_code is None else "error"
        self.provider_latency.labels(provider, operation, outcome).observe(seconds)
        if error_code is not None:
            self.provider_errors.labels(provider, operation, error_code).inc()

    def set_census(self, census: Census | None) -> None:
        """Show a job census; series seen before and now empty go to 0. None (the store could not be read): the
        job series are dropped and the queue depth is NaN, so an outage never reads as an empty queue."""
        if census is None:
            self.jobs.clear()
            self._census_labels.clear()
            self.queue_depth.set(float("nan"))
            return
        for labels in self._census_labels - census.jobs.keys():
            self.jobs.labels(*labels).set(0)
        for labels, count in census.jobs.items():
            self.jobs.labels(*labels).set(count)
        self._census_labels |= census.jobs.keys()
        self.queue_depth.set(census.waiting)

    async def refresh(self) -> None:
        """Take a job census (if the job engine plugged one in). Scrapes that arrive while one is being taken share
        it, so a burst of scrapes costs one census."""
        if self.census is None:
            return
        if self._census_task is None or self._census_task.done():
            self._census_task = asyncio.ensure_future(self._take_census(self.census))
        await asyncio.shield(self._census_task)

    async def _take_census(self, census: Callable[[], Awaitable[Census]]) -> None:
        try:
            async with asyncio.timeout(CENSUS_TIMEOUT_SECONDS):
                self.set_census(await census())
        except Exception as exc:  # the store is down or slow: the other metrics are still worth serving
            log.warning("job census for /metrics failed: %r", exc)
            self.set_census(None)

    def webhook_delivery(self, provider: str, outcome: str) -> None:
        self.webhook_deliveries.labels(provider, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count every answer by route template and status, and time it (outside the error middleware)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        counter, histogram = request.app[METRICS].http_children(request.method, route_name(request), status)
        counter.inc()
        histogram.observe(time.perf_counter() - started)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text exposition of this app's registry, after a census of the job store."""
    metrics = request.app[METRICS]
    await metrics.refresh()
    body = metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
