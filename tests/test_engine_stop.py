"""The job engine stops a job even when a provider call swallows the task's cancellation (it happens: a cancel that
lands in the HTTP client's shielded connection clean-up is lost). Shutdown must not wait for the job to end, and a
client's cancel must still end the job as canceled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from mvserver.core.artefacts import LocalArtefacts, OutputStore, new_id
from mvserver.core.config import EnvSettings, load_config
from mvserver.jobs import FileJobStore, Job, JobEngine
from mvserver.jobs.store import Lease
from mvserver.providers import Snapshot


class SwallowingDriver:
    """A remote driver whose ``start`` loses one cancellation, as an SDK call can; the prediction never ends."""

    def __init__(self) -> None:
        self.swallowed = asyncio.Event()
        self.cancels: list[str] = []

    async def start(self, job: Job, webhook: str | None) -> str:
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            self.swallowed.set()  # lost, and the call completes normally
        return "prediction-1"

    async def poll(self, prediction_id: str) -> Snapshot:
        return Snapshot(status="processing", progress=0.1)

    async def download(self, snapshot: Snapshot, prediction_id: str, dest: Path) -> int:
        raise AssertionError("never reached")

    async def cancel(self, prediction_id: str) -> None:
        self.cancels.append(prediction_id)


def engine_with(driver: SwallowingDriver, tmp_path: Path, settings_dir: Path) -> JobEngine:
    config = load_config(
        EnvSettings.from_env({"MV_SETTINGS_DIR": str(settings_dir), "MV_OUTPUT_DIR": str(tmp_path / "outputs")})
    )
    outputs = OutputStore(tmp_path / "outputs")
    return JobEngine(
        FileJobStore(outputs), {"video": lambda job: driver}, outputs, config.videos.jobs, max_concurrent=2
    )


def new_job() -> Job:
    return Job(id=new_id(), backend="replicate", model="google/veo-3.1", sandbox=False, request={"prompt": "p"})


async def running(engine: JobEngine, job_id: str) -> None:
    async with asyncio.timeout(10):
        while job_id not in engine.tasks:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # inside the driver's start


async def test_shutdown_stops_a_job_whose_cancel_was_swallowed(tmp_path: Path, settings_dir: Path) -> None:
    driver = SwallowingDriver()
    engine = engine_with(driver, tmp_path, settings_dir)
    await engine.start()
    job = await engine.submit(new_job())
    await running(engine, job.id)
    async with asyncio.timeout(5):  # before the fix: as long as the prediction (forever here)
        await engine.close()
    assert driver.swallowed.is_set()
    assert not engine.tasks
    assert (await FileJobStore(OutputStore(tmp_path / "outputs")).get(job.id)).status == "running"  # resumes later


async def test_a_cancel_swallowed_by_a_provider_call_still_cancels_the_job(tmp_path: Path, settings_dir: Path) -> None:
    driver = SwallowingDriver()
    engine = engine_with(driver, tmp_path, settings_dir)
    await engine.start()
    try:
        job = await engine.submit(new_job())
        await running(engine, job.id)
        await engine.cancel(job.id)
        async with asyncio.timeout(10):
            while (await engine.get(job.id)).status != "canceled":
                await asyncio.sleep(0.02)
        assert driver.swallowed.is_set() and driver.cancels == ["prediction-1"]
    finally:
        await engine.close()


class SwallowingLeaseStore(FileJobStore):
    """A store with leases whose ``renew`` loses one cancellation, as a Redis call can on Python 3.11 (redis-py's
    ``asyncio.wait_for``): the renewal completes and the keeper would go on renewing the lease of a stopped node,
    so no other node could ever take the job over."""

    lease_seconds = 0.06

    def __init__(self, outputs: OutputStore) -> None:
        super().__init__(outputs)
        self.swallowed = asyncio.Event()
        self.renewing = asyncio.Event()

    async def renew(self, lease: Lease) -> bool:
        self.renewing.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            if self.swallowed.is_set():
                raise
            self.swallowed.set()  # lost, and the renewal completes normally
        return True


class WaitingDriver:
    """A local driver that runs until it is cancelled."""

    async def run(self, job: Job, dest: str, progress: Callable[[float | None, str], Awaitable[None]]) -> int:
        await asyncio.Event().wait()
        raise AssertionError("never reached")


async def test_shutdown_stops_a_lease_keeper_whose_cancel_was_swallowed(tmp_path: Path, settings_dir: Path) -> None:
    config = load_config(
        EnvSettings.from_env({"MV_SETTINGS_DIR": str(settings_dir), "MV_OUTPUT_DIR": str(tmp_path / "outputs")})
    )
    outputs = OutputStore(tmp_path / "outputs")
    store = SwallowingLeaseStore(outputs)
    engine = JobEngine(
        store, {"local": lambda job: WaitingDriver()}, LocalArtefacts(outputs), config.videos.jobs, max_concurrent=2
    )
    await engine.start()
    job = Job(id=new_id(), backend="ffmpeg", model="concat", sandbox=False, request={}, kind="local")
    job = await engine.submit(job)
    async with asyncio.timeout(10):
        await store.renewing.wait()  # the keeper is inside a renewal: where the cancel lands
    async with asyncio.timeout(5):
        await engine.close()
    assert store.swallowed.is_set()
    keepers = [t for t in asyncio.all_tasks() if t.get_name() == f"lease-{job.id}" and not t.done()]
    assert keepers == []  # before the fix: the keeper renewed the stopped node's lease on and on


async def test_a_timeout_whose_cancel_was_swallowed_still_ends_the_job(tmp_path: Path, settings_dir: Path) -> None:
    """The timeout's cancel lands in the provider call that swallows it (as a Redis call can on Python 3.11): the poll
    loop still ends the job as timed out instead of letting it run on to the prediction's end (forever here)."""
    driver = SwallowingDriver()  # its start takes 0.5 s and loses the one cancel that arrives meanwhile
    config = load_config(
        EnvSettings.from_env({"MV_SETTINGS_DIR": str(settings_dir), "MV_OUTPUT_DIR": str(tmp_path / "outputs")})
    )
    outputs = OutputStore(tmp_path / "outputs")
    settings = config.videos.jobs.model_copy(update={"timeout_seconds": 0.2})
    engine = JobEngine(FileJobStore(outputs), {"video": lambda job: driver}, outputs, settings, max_concurrent=2)
    await engine.start()
    try:
        job = await engine.submit(new_job())
        async with asyncio.timeout(10):  # before the fix: never (the prediction never ends)
            while (await engine.get(job.id)).status in ("queued", "running"):
                await asyncio.sleep(0.02)
        ended = await engine.get(job.id)
        assert driver.swallowed.is_set()  # the timeout's cancel was really lost in the provider call
        assert ended.status == "failed" and ended.error is not None and ended.error["code"] == "job_timeout"
        assert driver.cancels == ["prediction-1"]  # and the prediction was canceled at the provider
    finally:
        await engine.close()
