"""The job store interface: what the job engine needs from wherever jobs live (files, or Redis for several nodes).

A store keeps job records and their append-only event logs, hands queued jobs to nodes with a free slot (a claim
comes with a lease), fences every write of the owner with that lease, lets any node follow a job's events, and
carries signals (cancel, provider updates) to the node that owns a job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mvserver.jobs.model import Event, Job
from mvserver.jobs.usage_store import UsageBook
from mvserver.web.access.idempotency import Remembered

SignalHandler = Callable[[str, str, dict[str, Any]], Awaitable[None]]  # (job_id, name, data)


class LeaseLost(Exception):
    """The lease on a job ran out or was taken over: the holder must stop without writing or cancelling."""


def index_entry(stamp_us: int, job_id: str) -> str:
    """A job's entry in its owner's listing index: creation time in microseconds, then the id. Entries sort by
    creation time as text, and an entry is also the cursor of a listing page that ends at that job."""
    return f"{stamp_us:016d}-{job_id}"


def owner_slot(owner: str | None) -> str:
    """The index name of an owner: the key id, or ``-`` for jobs made with keys off."""
    return owner or "-"


@dataclass(frozen=True)
class Lease:
    """The right to run and write one job, held by one node (``token`` is ``node:epoch`` on stores that fence)."""

    job_id: str
    token: str
    ref: str = ""  # the store's handle on the claim (the dispatch entry id on Redis)


class JobStore(Protocol):
    """Where jobs live. Event ids are 1..n per job; the owner of a lease is the only writer of its job."""

    @property
    def lease_seconds(self) -> float | None:
        """How long a lease lives without renewal; None for a single-process store."""

    async def open(self) -> int:
        """Connect and recover: queue unfinished jobs again. Returns how many were queued for resumption."""

    async def close(self) -> None:
        """Stop following and claiming; leases held by this node are released so jobs resume elsewhere or later."""

    async def ping(self) -> None:
        """Raise (OSError, a Redis connection error) unless the store answers now: the node's readiness."""

    async def create(self, job: Job, event: Event) -> None:
        """Persist a new queued job with its first event and queue it for claiming; a job with a ``running_cap``
        waits (still ``queued``) while that many of its owner's jobs are admitted and unfinished, and is admitted,
        in order, as they finish."""

    async def get(self, job_id: str) -> Job | None:
        """The job as last written, or None if there is none."""

    async def claim(self, limit: int = 1) -> list[tuple[Job, Lease]]:
        """Wait for jobs to run (queued, or abandoned by a dead node) and take their leases: at least one and at
        most ``limit`` (the node's free slots), so a burst of jobs costs few round trips."""

    async def write(self, lease: Lease, job: Job, event: Event | None, *, record: bool) -> None:
        """Append ``event`` (if any) and, if ``record``, save the record; raise :class:`LeaseLost` if not the owner."""

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease; False once it is lost."""

    async def release(self, lease: Lease, *, done: bool) -> None:
        """Give the job up: ``done`` when it is final, else it stays claimable (resumed later or by another node)."""

    async def finish_unclaimed(self, job: Job, event: Event) -> bool:
        """Write a final state for a job nobody has claimed yet (cancel of a queued or held job); False if it was
        claimed."""

    async def events(self, job_id: str, after: int) -> list[Event]:
        """The job's events with id > ``after``, in order."""

    def next_event(self, job_id: str, after: int) -> asyncio.Future[None]:
        """A future done once the job has an event with id > ``after`` (or the store is closing); every subscriber
        of a job on this node shares one, so waiting costs no task or connection per subscriber."""

    async def signal(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        """Deliver a signal to the job's owner (``cancel`` also marks the record, so a later claimer sees it)."""

    def on_signal(self, handler: SignalHandler) -> None:
        """Register the engine's handler for signals to jobs this node owns."""

    async def index(self, owner: str | None, before: str | None, count: int) -> list[str]:
        """Up to ``count`` entries (:func:`index_entry`) of ``owner``'s jobs, newest first, all older than the entry
        ``before`` (from the newest when None). Removed jobs may still have entries; readers skip them."""

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        """Several records at once, in order (None for a missing one), without disturbing any cache of hot jobs."""

    async def remember(self, key: str, entry: Remembered, pending_seconds: float) -> Remembered | None:
        """Reserve ``key`` for ``entry`` (not yet answered) if nobody holds it: None when reserved, else what is
        kept. A reservation never completed lapses after ``pending_seconds`` (its request died)."""

    async def complete(self, key: str, entry: Remembered, keep_seconds: float) -> None:
        """Store the answer of the request holding the reservation (``entry.token``), kept ``keep_seconds``."""

    async def forget(self, key: str, token: str) -> None:
        """Drop the reservation held by ``token`` (its request failed: the key may be used again)."""

    async def count_active(self, owner: str) -> int:
        """How many of ``owner``'s jobs are queued or running."""

    async def count_places(self, owner: str) -> tuple[int, int]:
        """``owner``'s unfinished jobs with a ``running_cap``: (admitted: queued for a slot or running, held: waiting
        until fewer than their cap of the owner's jobs are admitted)."""

    async def expire(self, finished_before: float, tombstone_until: float) -> list[str]:
        """Remove the records and event logs of jobs finished before ``finished_before`` (a bounded batch per call),
        leave a tombstone until ``tombstone_until`` and drop older tombstones; returns the ids removed now."""

    def usage_book(self) -> UsageBook:
        """Where ended jobs' usage, keys' monthly spending and duration estimates are kept (``usage_store``)."""

    async def expired(self, job_id: str) -> bool:
        """Whether ``job_id`` belonged to a job removed by retention whose tombstone is still kept."""
