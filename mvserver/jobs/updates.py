"""Provider updates pushed to running jobs (Replicate webhooks), and when a job polls instead.

A job's poll loop asks :meth:`PushedUpdates.wait` for its next look at the prediction: a pushed snapshot as soon as
one arrives; otherwise ``None`` after the poll interval (or, for a job whose prediction pushes webhooks, after the
much longer safety interval), and the loop polls. A pushed snapshot is applied by the same loop exactly like a poll
result, so event order and ids stay as they are. Snapshots are ranked (``starting`` < ``processing`` with more logs <
the end); one that is not newer than what the job has already seen is dropped, so a duplicated, late or reordered
delivery never moves a job backwards.

Polling stays the safety net: if a safety poll finds the prediction already running while no webhook has reached
the job, webhooks are not getting through; that is logged once, and from then on new jobs poll at the normal rate.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

from mvserver.providers import Snapshot
from mvserver.providers.base import WEBHOOK_PATH

log = logging.getLogger("mvserver.webhooks")

WEBHOOK_BACKENDS = frozenset({"replicate"})  # Vertex Veo (google-genai) has no webhooks: it keeps polling

Rank = tuple[int, float, int]


def rank(snapshot: Snapshot) -> Rank:
    """How far along a snapshot is: by status, then (while processing) by progress and the length of its logs
    (Replicate's logs only grow)."""
    if snapshot.done:
        return (2, 0.0, 0)
    if snapshot.status == "starting":
        return (0, 0.0, 0)
    return (1, snapshot.progress or 0.0, len(snapshot.logs or ""))


@dataclass
class _Inbox:
    """One job's pushed update waiting for its poll loop."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending: tuple[str, Snapshot] | None = None  # (prediction id from the body, snapshot)
    seen: Rank = (-1, 0.0, 0)  # the newest rank applied or pending
    reached: bool = False  # a webhook has reached this job
    safety_poll: bool = False  # the next poll is a safety poll (the wait for a webhook timed out)


class PushedUpdates:
    """The pushed updates of every running job of one :class:`~mvserver.jobs.JobEngine`."""

    def __init__(self, safety_poll_seconds: float):
        self.base_url: str | None = None  # set when webhooks are on: where the provider reaches this server
        self.safety_poll_seconds = safety_poll_seconds
        self.unreachable = False  # a safety poll proved webhooks do not reach us: new jobs poll normally
        self._inboxes: dict[str, _Inbox] = {}
        self._webhook_jobs: set[str] = set()

    def webhook_url(self, job_id: str, backend: str) -> str | None:
        """The webhook URL for a new prediction of ``job_id``, or None when it must be polled."""
        if self.base_url is None or self.unreachable or backend not in WEBHOOK_BACKENDS:
            return None
        self._webhook_jobs.add(job_id)
        return f"{self.base_url}{WEBHOOK_PATH}?job={job_id}"

    def push(self, job_id: str, prediction_id: str, snapshot: Snapshot) -> bool:
        """Hand a verified provider update to the job's loop; False when it is not newer than what it has seen."""
        inbox = self._inbox(job_id)
        inbox.reached = True
        if rank(snapshot) <= inbox.seen:
            return False
        inbox.seen = rank(snapshot)
        inbox.pending = (prediction_id, snapshot)
        inbox.wake.set()
        return True

    def polled(self, job_id: str, snapshot: Snapshot) -> Snapshot:
        """Note a poll result (returned unchanged): it supersedes older pushed ones, and a safety poll that finds
        the prediction running with no webhook received switches new jobs back to normal polling."""
        inbox = self._inbox(job_id)
        if inbox.pending is not None and rank(inbox.pending[1]) <= rank(snapshot):
            inbox.pending = None
        inbox.seen = max(inbox.seen, rank(snapshot))
        if inbox.safety_poll and not inbox.reached and snapshot.status != "starting" and job_id in self._webhook_jobs:
            if not self.unreachable:
                log.warning(
                    "no webhook reached job %s although its prediction is %s: webhooks to %s do not get "
                    "through; new jobs poll every poll_interval_seconds",
                    job_id,
                    snapshot.status,
                    self.base_url,
                )
            self.unreachable = True
            self._webhook_jobs.discard(job_id)  # this job polls normally too
        inbox.safety_poll = False
        return snapshot

    async def wait(self, job_id: str, prediction_id: str | None, poll_delay: float) -> Snapshot | None:
        """The next pushed snapshot of ``prediction_id``, or None when it is time to poll."""
        inbox = self._inbox(job_id)
        if inbox.pending is None:
            webhooks = job_id in self._webhook_jobs
            delay = self.safety_poll_seconds * random.uniform(0.9, 1.1) if webhooks else poll_delay
            inbox.wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await inbox.wake.wait()
            except TimeoutError:
                inbox.safety_poll = webhooks
                return None
        pending, inbox.pending = inbox.pending, None
        if pending is None:
            return None
        if pending[0] != prediction_id:
            log.warning(
                "job %s: ignored a pushed update of prediction %s (the job's is %s)", job_id, pending[0], prediction_id
            )
            return None
        return pending[1]

    def forget(self, job_id: str) -> None:
        """The job's loop is over (finished, canceled or stopped)."""
        self._inboxes.pop(job_id, None)
        self._webhook_jobs.discard(job_id)

    def _inbox(self, job_id: str) -> _Inbox:
        inbox = self._inboxes.get(job_id)
        if inbox is None:
            inbox = self._inboxes[job_id] = _Inbox()
        return inbox
