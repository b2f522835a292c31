"""The job engine: claims queued jobs while it has a free slot, drives each to its end, and answers handlers.

A job is driven by the driver of its kind. A *remote* driver (a provider prediction: ``start``, ``poll``,
``download``, ``cancel``) is created once (never twice: its id is saved first), polled (or woken early by a provider
update such as a webhook) and downloaded. A *local* driver (``run``: work done on this machine, e.g. ffmpeg) is
simply run again after a restart. Every change is an event written through the store, fenced by the job's lease:
a node that lost its lease stops without writing or cancelling anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from mvserver.core.artefacts import ArtefactExists, Artefacts, artefact_key
from mvserver.core.config import JobsSettings, PricingSettings
from mvserver.core.errors import ApiError, ErrorInfo
from mvserver.core.logs import bind_job
from mvserver.jobs.eta import EtaEstimate, duration_key
from mvserver.jobs.model import Event, Job, JobStatus, clip_text
from mvserver.jobs.store import JobStore, Lease, LeaseLost
from mvserver.jobs.updates import PushedUpdates
from mvserver.jobs.usage import MICROS, currency, estimate_micros, ledger_entry, measure, month_of
from mvserver.providers import Snapshot

log = logging.getLogger("mvserver.jobs")
T = TypeVar("T")

CANCEL_WAIT_SECONDS = 15.0
CLAIM_BATCH = 8  # jobs claimed in one go at most: few round trips for a burst, and a burst still spreads over nodes
CANCEL_RETRY_SECONDS = 0.5
LOCAL_PROGRESS_MIN_SECONDS = 0.25  # at most four progress events a second from a local driver
LOG_TAIL_LINES = 3
DEADLINE_SLACK_SECONDS = 1.0  # a provider that cancels at the deadline may do so this much before our own timer
UNLIMITED_MICROS = 1 << 62  # the spending cap of a key without a monthly_budget: its spending is still counted


class RemoteDriver(Protocol):
    """Runs a job as a provider prediction."""

    async def start(self, job: Job, webhook: str | None) -> str:
        """Create the prediction (asking the provider to push updates to ``webhook`` when given); return its id,
        saved before anything else, so a restart never creates another."""

    async def poll(self, prediction_id: str) -> Snapshot: ...

    async def download(
        self, snapshot: Snapshot, prediction_id: str, dest: str
    ) -> int: ...  # an artefact key, written create-only

    async def cancel(self, prediction_id: str) -> Snapshot | None:
        """Stop the prediction; the ended prediction if the provider answers with it (its metrics: usage)."""


Progress = Callable[[float | None, str], Awaitable[None]]  # (fraction 0..1 or None, stage)


@runtime_checkable
class LocalDriver(Protocol):
    """Runs a job on this machine; after a restart it simply runs again."""

    async def run(self, job: Job, dest: str, progress: Progress) -> int:
        """Store the output as the artefact ``dest`` (a key) atomically and return its size; report progress as it
        goes."""


DriverFactory = Callable[[Job], "RemoteDriver | LocalDriver"]


def _ignore(_: Any) -> None:
    return None


def _ignore_event(_: Job, __: Event) -> None:
    return None


async def _nothing(_: Job) -> None:
    return None


async def _nothing_stored(_: Job, __: str) -> None:
    return None


class EngineHooks:
    """What the engine reports as it happens (the app plugs metrics in): ``finished(job)`` once per job this node
    finished, ``subscribers(delta)`` as event streams open (+1) and close (-1); ``stored(job, key)`` when a job's
    output is in place, before its ``succeeded`` event (it may note facts about the file on the job: the poster);
    ``before_create(job)`` is awaited before a new job is stored (webhooks out write their record there) and
    ``published(job, event)`` follows every event written."""

    def __init__(self) -> None:
        self.finished: Callable[[Job], None] = _ignore
        self.subscribers: Callable[[int], None] = _ignore
        self.stored: Callable[[Job, str], Awaitable[None]] = _nothing_stored
        self.before_create: Callable[[Job], Awaitable[None]] = _nothing
        self.published: Callable[[Job, Event], None] = _ignore_event


class JobEngine:
    """The jobs of one app: submit, cancel, read and follow them; run the ones this node claims."""

    def __init__(
        self,
        store: JobStore,
        kinds: Mapping[str, DriverFactory],
        outputs: Artefacts,
        settings: JobsSettings,
        *,
        max_concurrent: int,
    ):
        self.store = store
        self.kinds = kinds
        self.outputs = outputs
        self.settings = settings
        self.max_concurrent = max_concurrent
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_concurrent)
        self._cancel_requested: set[str] = set()
        self._deadlines: dict[str, float] = {}  # when each running job's timeout (or its client's deadline) ends it
        self._lost: set[str] = set()
        self._started: set[str] = set()
        self.pushed = PushedUpdates(settings.webhook_safety_poll_seconds)  # provider webhooks of jobs run here
        self._dispatcher: asyncio.Task[None] | None = None
        self.closing: asyncio.Future[None] | None = None
        self.hooks = EngineHooks()
        # The running-jobs cap of an owner (an API key's max_running_jobs; None: none), plugged in with keys on.
        self.running_cap: Callable[[str], int | None] | None = None
        self.book = store.usage_book()
        self.pricing: PricingSettings | None = None  # the price table (the app sets it): usage and budgets
        self.budget_of: Callable[[str], float | None] = lambda owner: None  # a key's monthly limit (keys file)
        self._eta: dict[str, EtaEstimate] = {}  # job id -> the duration estimate of a job running here

    # -- life cycle -------------------------------------------------------------------------------------------

    async def start(self) -> int:
        """Open the store (it queues unfinished jobs again) and start claiming; returns how many will resume."""
        self.closing = asyncio.get_running_loop().create_future()
        self.store.on_signal(self._on_signal)
        resumed = await self.store.open()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="job-dispatcher")
        return resumed

    def begin_shutdown(self) -> None:
        """End every event stream now, so a server with open streams stops at once."""
        if self.closing is not None and not self.closing.done():
            self.closing.set_result(None)

    async def close(self) -> None:
        """Stop every task without marking jobs canceled: they resume at the next start (or on another node)."""
        self.begin_shutdown()
        # Cancelled again until done, like the job tasks below: a claim's store call can drop the cancellation
        # (Python 3.11's asyncio.wait_for in redis-py, see _poll_until_done), and the claim loop would go on.
        while self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()
            await asyncio.wait({self._dispatcher}, timeout=CANCEL_RETRY_SECONDS)
        if self._dispatcher is not None:
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        pending = set(self.tasks.values())
        while pending:
            # Cancelled again until done: a cancel that lands inside the HTTP client's shielded clean-up can be
            # lost, and the job would otherwise run on to its end while the server waits.
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_SECONDS)
        await self.store.close()

    # -- what handlers call -----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        return await self.store.get(job_id)

    async def ping(self) -> None:
        """Raise unless the job store answers now (the node's readiness)."""
        await self.store.ping()

    async def running_jobs(self, owner: str) -> int:
        """How many jobs of the key ``owner`` are queued or running, on every node."""
        return await self.store.count_active(owner)

    async def places(self, owner: str) -> tuple[int, int]:
        """The key ``owner``'s jobs that hold one of its running places (queued for a slot or running), and those
        waiting for one, on every node."""
        return await self.store.count_places(owner)

    async def submit(self, job: Job) -> Job:
        """Hold the job's estimated cost on its key's monthly budget (402 ``budget_exceeded`` past it, before any
        prediction exists), then persist it with its ``queued`` event and queue it for a slot; a job of a key with
        a running-jobs cap waits (``queued``) while that many of the key's jobs are unfinished, and starts as they
        end."""
        if job.owner is not None and self.running_cap is not None:
            job.running_cap = self.running_cap(job.owner)
        await self._hold_budget(job)
        job.last_event_id = 1
        await self.hooks.before_create(job)
        event = Event(id=1, event="queued", data=_event_data(job))
        try:
            await self.store.create(job, event)
        except BaseException:
            if job.held_micros and job.owner is not None:
                await self.book.adjust(job.owner, month_of(job.created_at), -job.held_micros)
            raise
        self.hooks.published(job, event)
        return job

    async def _hold_budget(self, job: Job) -> None:
        """Every key's spending is counted (so a budget set mid-month knows what was spent); only a key with a
        ``monthly_budget`` can be refused."""
        if self.pricing is None or job.owner is None:
            return
        limit = self.budget_of(job.owner)
        micros, month = estimate_micros(job, self.pricing), month_of(job.created_at)
        limit_micros = UNLIMITED_MICROS if limit is None else round(limit * MICROS)
        left = await self.book.hold(job.owner, month, micros, limit_micros)
        if left is None:
            job.held_micros = micros
            return
        money = currency(self.pricing)
        assert limit is not None
        raise ApiError(
            402,
            "budget_exceeded",
            f"this job would cost about {micros / MICROS:g} {money}, more than is left of this key's "
            f"budget for {month} ({left / MICROS:g} of {limit:g} {money})",
            budget={
                "month": month,
                "limit": limit,
                "spent": (limit_micros - left) / MICROS,
                "remaining": left / MICROS,
                "job_estimate": micros / MICROS,
                "currency": money,
            },
        )

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a job and its provider prediction, from any node; a finished job is returned unchanged."""
        job = await self.store.get(job_id)
        if job is None or job.final:
            return job
        if job.status == "queued" and await self._cancel_unclaimed(job):
            return await self.store.get(job_id)
        await self.store.signal(job_id, "cancel", {})
        task = self.tasks.get(job_id)
        if task is not None:  # running here: wait for its task to end, not just for the final event
            await asyncio.wait({task}, timeout=CANCEL_WAIT_SECONDS)
            return await self.store.get(job_id)
        return await self._wait_final(job_id)

    async def _cancel_unclaimed(self, job: Job) -> bool:
        final = Job.from_record(job.record())
        _mark_final(final, "canceled", _canceled())
        await self._account(final)
        final.last_event_id += 1
        event = Event(final.last_event_id, "canceled", _event_data(final))
        done = await self.store.finish_unclaimed(final, event)
        if done:
            await self._settle(final)
            self.hooks.finished(final)
            self.hooks.published(final, event)
        return done

    async def _wait_final(self, job_id: str) -> Job | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                while True:
                    job = await self.store.get(job_id)
                    if job is None or job.final:
                        return job
                    await self.store.next_event(job_id, job.last_event_id)
        return await self.store.get(job_id)

    async def events(self, job_id: str, after: int) -> list[Event]:
        return await self.store.events(job_id, after)

    async def expired(self, job_id: str) -> bool:
        """Whether the id belonged to a job removed by retention (answered 410 while its tombstone is kept)."""
        return await self.store.expired(job_id)

    def next_event(self, job_id: str, after: int) -> asyncio.Future[None]:
        return self.store.next_event(job_id, after)

    async def provider_update(self, job_id: str, prediction_id: str, snapshot: Snapshot) -> None:
        """A provider pushed news of a job's prediction (a verified webhook): hand it to the job's owner, wherever
        it runs; its poll loop applies it exactly like a poll result."""
        await self.store.signal(job_id, "update", {"prediction_id": prediction_id, "snapshot": snapshot.to_dict()})

    async def _on_signal(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        task = self.tasks.get(job_id)
        if task is None:
            return
        if name == "cancel" and job_id not in self._cancel_requested:
            self._cancel_requested.add(job_id)
            if job_id in self._started:  # a task not yet started sees the request when it does
                task.cancel()
        elif name == "update":
            self.pushed.push(job_id, data["prediction_id"], Snapshot.from_dict(data["snapshot"]))

    # -- claiming ---------------------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Claim jobs whenever slots are free (all free slots at once, up to a small batch), so a node never takes
        more than it can run."""
        while True:
            await self._slots.acquire()
            free = 1
            while free < CLAIM_BATCH and not self._slots.locked():
                await self._slots.acquire()  # free: returns at once
                free += 1
            try:
                claimed = await self.store.claim(free)
            except BaseException:
                for _ in range(free):
                    self._slots.release()
                raise
            for _ in range(free - len(claimed)):
                self._slots.release()
            for job, lease in claimed:
                await self._start(job, lease)

    async def _start(self, job: Job, lease: Lease) -> None:
        previous = self.tasks.get(job.id)
        if previous is not None:  # this node lost the lease and claimed the job again: the old task ends first
            previous.cancel()
            await asyncio.wait({previous})
        task = asyncio.get_running_loop().create_task(self._run(job, lease), name=f"job-{job.id}")
        self.tasks[job.id] = task
        task.add_done_callback(lambda _: self._task_done(job.id))

    def _task_done(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)
        self._eta.pop(job_id, None)
        self._cancel_requested.discard(job_id)
        self._lost.discard(job_id)
        self._started.discard(job_id)
        self.pushed.forget(job_id)
        self._deadlines.pop(job_id, None)
        self._slots.release()

    async def _keep_lease(self, lease: Lease, stopped: asyncio.Event) -> None:
        """Renew the lease well before it lapses; once it is lost, stop the job without a word. ``stopped`` (set when
        the run ends) ends the renewals even when the cancel that came with it was swallowed by the store call (a
        Redis call can lose one, see :meth:`close`): a keeper that went on would renew a stopped node's lease for
        ever, and no other node could take the job over."""
        assert self.store.lease_seconds is not None
        while not stopped.is_set():
            await asyncio.sleep(self.store.lease_seconds / 3)
            try:
                renewed = await self.store.renew(lease)
            except Exception:  # a store bug must not stop the renewals silently
                log.exception("job %s: renewing the lease failed", lease.job_id)
                continue
            if stopped.is_set():
                return
            if not renewed:
                log.warning("job %s: lease lost; another node takes it over", lease.job_id)
                self._lost.add(lease.job_id)
                task = self.tasks.get(lease.job_id)
                if task is not None:
                    task.cancel()
                return

    # -- running ----------------------------------------------------------------------------------------------

    async def _run(self, job: Job, lease: Lease) -> None:
        bind_job(job.id)
        self._started.add(job.id)
        keeper = None
        stopped = asyncio.Event()
        if self.store.lease_seconds is not None:
            keeper = asyncio.get_running_loop().create_task(self._keep_lease(lease, stopped), name=f"lease-{job.id}")
        driver = self.kinds[job.kind](job)
        try:
            await self._run_owned(job, lease, driver)
        except LeaseLost:
            log.warning("job %s: lease lost before a write; stopping here", job.id)
        finally:
            stopped.set()
            if keeper is not None:
                keeper.cancel()
            if job.id not in self._lost:
                with contextlib.suppress(Exception):
                    await self.store.release(lease, done=job.final)

    async def _run_owned(self, job: Job, lease: Lease, driver: Any) -> None:
        try:
            if job.cancel_requested or job.id in self._cancel_requested:
                raise asyncio.CancelledError()
            if job.started_at is None:
                job.started_at = time.time()  # the timeout runs from here, not from the time in the queue
            job.status = "running"
            deadline = job.started_at + self.settings.timeout_seconds
            if job.deadline_at is not None:  # the client's deadline, when it comes first, ends the job instead
                deadline = min(deadline, job.deadline_at)
            self._deadlines[job.id] = deadline
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                if isinstance(driver, LocalDriver):
                    await self._drive_local(job, lease, driver)
                else:
                    await self._drive_remote(job, lease, driver)
        except asyncio.CancelledError:
            if job.id in self._lost:
                raise
            if job.id in self._cancel_requested or job.cancel_requested:
                await self._cancel_provider(job, driver)
                await self._finish(job, lease, "canceled", _canceled())
                return
            # shutdown: keep the record as it is so the job resumes at the next start
            await self.store.write(lease, job, None, record=True)
            raise
        except TimeoutError:
            await self._cancel_provider(job, driver)
            await self._finish(job, lease, "failed", self._timed_out(job))
        except LeaseLost:
            raise
        except ApiError as exc:
            await self._finish(job, lease, "failed", exc.info)
        except Exception as exc:  # a bug must still end the job, not leave it running forever
            log.exception("job %s crashed", job.id)
            await self._finish(job, lease, "failed", ErrorInfo("internal_error", f"{exc.__class__.__name__}: {exc}"))

    def _timed_out(self, job: Job) -> ErrorInfo:
        """``deadline_exceeded`` when the client's deadline ended the job, else ``job_timeout``."""
        assert job.started_at is not None
        if job.deadline_at is not None and job.deadline_at <= job.started_at + self.settings.timeout_seconds:
            return _deadline_exceeded(job)
        return ErrorInfo(
            "job_timeout",
            f"the job was not done after {self.settings.timeout_seconds:g} s",
            provider=job.backend,
            provider_status=job.stage,
        )

    async def _drive_remote(self, job: Job, lease: Lease, driver: RemoteDriver) -> None:
        """Create (unless resuming) the prediction, poll it to the end, download the output."""
        await self._load_estimate(job)
        if job.prediction_id is None:
            job.stage = "submitting"
            await self._publish(job, lease, "running", record=True)
            webhook = self.pushed.webhook_url(job.id, job.backend)
            job.prediction_id = await self._retry(lambda: driver.start(job, webhook), create=True, job=job)
            job.stage = "generating"
            await self._publish(job, lease, "progress", record=True)
        else:
            job.stage = job.stage if job.stage in ("generating", "downloading") else "generating"
            await self._publish(job, lease, "running", record=True)
        snapshot = await self._poll_until_done(job, lease, driver)
        if snapshot.status == "canceled" and _past_deadline(job):  # the provider's own deadline came first
            await self._finish(job, lease, "failed", _deadline_exceeded(job))
            return
        if snapshot.status != "succeeded":
            error = snapshot.error or ErrorInfo(
                "provider_prediction_failed",
                f"prediction {snapshot.status}",
                provider=job.backend,
                provider_status=snapshot.status,
            )
            await self._finish(job, lease, "failed", error)
            return
        job.stage = "downloading"
        await self._publish(job, lease, "progress", record=True)
        dest = artefact_key("videos", job.id, ".mp4")
        prediction_id = job.prediction_id
        try:
            job.video_bytes = await self._retry(lambda: driver.download(snapshot, prediction_id, dest), job=job)
        except ArtefactExists:  # an earlier run of this job stored it, then lost its lease: that one stays
            stored = await self.outputs.stat(dest)
            job.video_bytes = stored.size if stored is not None else None
        job.progress = 1.0
        await self._finish(job, lease, "succeeded", None)

    async def _poll_until_done(self, job: Job, lease: Lease, driver: RemoteDriver) -> Snapshot:
        prediction_id = job.prediction_id
        assert prediction_id is not None
        pushed: Snapshot | None = None  # a webhook's snapshot, applied exactly like a poll result
        shown_logs: str | None = None  # a progress event carries the log tail only when it changed
        while True:
            if job.id in self._cancel_requested:
                # The cancel reached the task but was swallowed on the way (in the HTTP client's shielded clean-up,
                # or by Python 3.11's asyncio.wait_for, which redis-py uses for its socket timeout and which can
                # return a result and drop a cancellation that arrives as it finishes): act on it here, before the
                # first poll and after every wait.
                raise asyncio.CancelledError()
            if time.time() >= self._deadlines.get(job.id, math.inf):
                # The same for the timeout: its cancel can be swallowed the same way, and the job would outlive it.
                raise TimeoutError()
            snapshot = pushed or self.pushed.polled(
                job.id, await self._retry(lambda: driver.poll(prediction_id), job=job)
            )
            if snapshot.done:
                job.provider_metrics = snapshot.metrics
                return snapshot
            estimate, now = self._eta.get(job.id), time.time()  # the event's time is the ETA's "now"
            guessed = None
            if snapshot.progress is not None:
                job.progress = round(snapshot.progress, 4)
            elif estimate is not None:
                guessed = job.progress = estimate.progress(job, now)
            job.stage = "generating"
            tail = _tail(snapshot.logs) if job.provider_logs else None  # only for a job that asked (polled too)
            extra = {
                "logs": tail if tail != shown_logs else None,
                "event_time": now,
                "eta_seconds": estimate.eta_seconds(job, now) if estimate is not None else None,
                "progress_estimated": True if guessed is not None else None,
            }
            await self._publish(job, lease, "progress", extra=extra)
            shown_logs = tail or shown_logs
            # +-10% jitter keeps jobs that started together (or resumed together) from polling in lockstep; a job
            # whose provider pushes updates waits the long safety interval instead, woken by each push.
            pushed = await self.pushed.wait(
                job.id, prediction_id, self.settings.poll_interval_seconds * random.uniform(0.9, 1.1)
            )

    async def _drive_local(self, job: Job, lease: Lease, driver: LocalDriver) -> None:
        job.stage = "running"
        job.progress = 0.0
        await self._publish(job, lease, "running", record=True)
        last = 0.0

        async def progress(fraction: float | None, stage: str) -> None:
            nonlocal last
            now = time.monotonic()
            if stage == job.stage and now - last < LOCAL_PROGRESS_MIN_SECONDS:
                return
            last = now
            stage_changed = stage != job.stage
            job.stage = stage
            if fraction is not None:
                job.progress = round(min(1.0, max(0.0, fraction)), 4)
            await self._publish(job, lease, "progress", record=stage_changed)

        if job.id in self._cancel_requested:  # a cancel swallowed during the write above (see _poll_until_done)
            raise asyncio.CancelledError()
        job.video_bytes = await driver.run(job, artefact_key("videos", job.id, ".mp4"), progress)
        job.progress = 1.0
        await self._finish(job, lease, "succeeded", None)

    async def _retry(self, call: Callable[[], Awaitable[T]], *, create: bool = False, job: Job | None = None) -> T:
        """Retry transient provider errors with capped exponential backoff and jitter, honouring Retry-After.

        A create is retried only when the provider certainly did not accept it (rate limit or 503).
        """
        delay = self.settings.retry_initial_delay_seconds
        for attempt in range(self.settings.retry_attempts + 1):
            try:
                return await call()
            except ApiError as exc:
                retryable = exc.transient and (not create or exc.info.provider_status in (429, 503))
                if not retryable or attempt == self.settings.retry_attempts:
                    raise
                wait = exc.retry_after if exc.retry_after else delay * (1 + random.random() / 2)
                if job is not None:
                    job.retries += 1
                log.info(
                    "transient %s (%s), retry %d in %.1f s", exc.info.code, exc.info.provider_status, attempt + 1, wait
                )
                await asyncio.sleep(min(wait, self.settings.retry_max_delay_seconds))
                delay = min(delay * 2, self.settings.retry_max_delay_seconds)
        raise AssertionError("unreachable")

    async def _cancel_provider(self, job: Job, driver: Any) -> None:
        """Ask the provider to stop; only a real failure is logged, with its reason."""
        if job.prediction_id is None or isinstance(driver, LocalDriver):
            return
        call = asyncio.ensure_future(driver.cancel(job.prediction_id))
        try:
            ended = await asyncio.shield(call)
            if isinstance(ended, Snapshot) and ended.metrics:
                job.provider_metrics = ended.metrics
        except ApiError as exc:
            log.warning("could not cancel %s prediction %s: %s", job.backend, job.prediction_id, exc.info.message)
        except asyncio.CancelledError:
            # cancelled again while waiting (shutdown): let the provider call finish on its own
            pass

    async def _finish(self, job: Job, lease: Lease, status: JobStatus, error: ErrorInfo | None) -> None:
        if status == "succeeded":
            try:
                await self.hooks.stored(job, artefact_key("videos", job.id, ".mp4"))
            except Exception:  # a poster is a nicety: the clip is there, the job succeeds without it
                log.exception("job %s: describing the stored output failed", job.id)
        _mark_final(job, status, error)
        await self._account(job)
        await self._publish(job, lease, status, record=True)
        await self._settle(job)
        self.hooks.finished(job)

    async def _account(self, job: Job) -> None:
        """Measure an ended job's usage and enter it in the ledger before its final event: a node that dies in
        between leaves the job to run again, and its second entry replaces the first."""
        if self.pricing is None:
            return
        job.usage = measure(job, self.pricing)
        try:
            await self.book.record(ledger_entry(job))
        except Exception:
            log.exception("job %s: usage not entered in the ledger", job.id)

    async def _settle(self, job: Job) -> None:
        """After the final event: correct the budget hold by the final cost, and learn the run's duration. Neither
        may fail the job (they are estimates)."""
        try:
            if job.owner is not None and job.held_micros and job.usage is not None:
                delta = job.usage["cost"]["amount_micros"] - job.held_micros
                await self.book.adjust(job.owner, month_of(job.created_at), delta)
            if job.status == "succeeded" and job.started_at is not None and job.finished_at is not None:
                await self.book.learn(duration_key(job), job.finished_at - job.started_at)
        except Exception:
            log.exception("job %s: usage not settled", job.id)
        finally:
            self._eta.pop(job.id, None)

    async def _load_estimate(self, job: Job) -> None:
        """This job's model's running estimate of its duration, read once as it starts (ETA, progress)."""
        try:
            found = await self.book.estimate(duration_key(job))
        except Exception:
            log.warning("job %s: no duration estimate", job.id, exc_info=True)
            return
        if found is not None:
            self._eta[job.id] = EtaEstimate(found)

    async def _publish(
        self, job: Job, lease: Lease, name: str, *, record: bool = False, extra: dict[str, Any] | None = None
    ) -> None:
        """Write one event: a status or stage change (``record``) carries the full state, a per-poll ``progress``
        event only what moves."""
        full = record or name != "progress"
        data = _event_data(job) if full else {**job.progress_state(), "event_time": time.time()}
        if extra:
            data.update({k: v for k, v in extra.items() if v is not None})
        event = Event(id=job.last_event_id + 1, event=name, data=data)
        job.last_event_id = event.id
        await self.store.write(lease, job, event, record=record)
        self.hooks.published(job, event)


def _event_data(job: Job) -> dict[str, Any]:
    return {**job.state(), "event_time": time.time()}


def _mark_final(job: Job, status: JobStatus, error: ErrorInfo | None) -> None:
    job.status = status
    job.stage = "done"
    job.error = error.to_dict() if error else None
    job.finished_at = time.time()


def _past_deadline(job: Job) -> bool:
    """Whether the client's deadline has come (within the provider's rounding of it to whole seconds)."""
    return job.deadline_at is not None and time.time() >= job.deadline_at - DEADLINE_SLACK_SECONDS


def _deadline_exceeded(job: Job) -> ErrorInfo:
    return ErrorInfo(
        "deadline_exceeded",
        f"the job was not done within its deadline_seconds ({job.deadline_seconds:g} s from submission)",
        provider=job.backend,
        provider_status=job.stage,
    )


def _canceled() -> ErrorInfo:
    return ErrorInfo("job_canceled", "canceled by the client")


def _tail(logs: str | None, lines: int = LOG_TAIL_LINES) -> str | None:
    """The last few log lines, clipped: enough for a progress display, never the whole log."""
    if not logs or not logs.strip():
        return None
    return clip_text("\n".join(logs.strip().splitlines()[-lines:]), 500)
