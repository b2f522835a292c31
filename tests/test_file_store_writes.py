"""What the file job store writes for a job, and what a crash can cost: a record is rewritten only when a restart
would read something new from it; a finished job's event log and record are on disk (fsynced) before its final
event is visible to anyone."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvserver.core.artefacts import OutputStore, new_id
from mvserver.jobs import FileJobStore, Job
from mvserver.jobs.model import Event
from mvserver.jobs.store import Lease


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the files fsynced (in order) while the test runs."""
    names: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        names.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    yield names


def record_on_disk(outputs: Path, job: Job) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((outputs / "jobs" / f"{job.id}.json").read_bytes())
    return loaded


async def publish(store: FileJobStore, job: Job, name: str, *, record: bool) -> None:
    """One event as the job engine writes it (its data: the job's stage)."""
    job.last_event_id += 1
    event = Event(id=job.last_event_id, event=name, data={"stage": job.stage, "status": job.status})
    await store.write(Lease(job.id, "local"), job, event, record=record)


async def test_a_stage_change_is_not_rewritten_and_a_crash_resumes_from_the_prediction(
    tmp_path: Path, fsynced: list[str]
) -> None:
    outputs = tmp_path / "outputs"
    store = FileJobStore(OutputStore(outputs))
    await store.open()
    job = Job(id=new_id(), backend="replicate", model="m", sandbox=True, request={})
    job.last_event_id = 1
    await store.create(job, Event(id=1, event="queued", data={}))
    assert (outputs / "jobs" / "active" / job.id).exists() and len(fsynced) == 1
    assert fsynced[0].startswith(f".{job.id}.json.")  # the record's temporary, fsynced before it is renamed
    job.status, job.stage, job.started_at = "running", "submitting", 1000.0
    await publish(store, job, "running", record=True)  # started: written
    job.prediction_id, job.stage = "p-1", "generating"
    await publish(store, job, "progress", record=True)  # the prediction to poll after a crash: written
    assert record_on_disk(outputs, job)["prediction_id"] == "p-1"
    writes = len(fsynced)
    assert writes == 3
    job.progress = 0.5
    await publish(store, job, "progress", record=False)
    job.stage = "downloading"
    await publish(store, job, "progress", record=True)  # a stage change only: not rewritten
    assert len(fsynced) == writes
    assert record_on_disk(outputs, job)["stage"] == "generating"
    assert (await store.get(job.id)) is job and job.stage == "downloading"  # what readers see, from memory

    # a crash here (no shutdown write): the job resumes polling its prediction, every event still in its log
    again = FileJobStore(OutputStore(outputs))
    assert await again.open() == 1
    resumed = await again.get(job.id)
    assert resumed is not None and (resumed.prediction_id, resumed.started_at) == ("p-1", 1000.0)
    assert resumed.last_event_id == 5
    assert [e.event for e in await again.events(job.id, 0)] == ["queued", "running", "progress", "progress", "progress"]
    await again.close()
    await store.close()


async def test_a_finished_jobs_log_and_record_are_fsynced_before_its_final_event_is_seen(
    tmp_path: Path, fsynced: list[str]
) -> None:
    outputs = tmp_path / "outputs"
    store = FileJobStore(OutputStore(outputs))
    await store.open()
    job = Job(id=new_id(), backend="replicate", model="m", sandbox=True, request={})
    job.last_event_id = 1
    await store.create(job, Event(id=1, event="queued", data={}))
    job.status, job.stage, job.started_at, job.prediction_id = "running", "generating", 1000.0, "p-1"
    await publish(store, job, "running", record=True)
    seen: list[tuple[list[str], list[str]]] = []

    async def subscriber() -> None:
        while True:
            events = await store.events(job.id, 2)
            if events:
                seen.append(([e.event for e in events], list(fsynced)))
                return
            await store.next_event(job.id, 2)

    watching = asyncio.ensure_future(subscriber())
    await asyncio.sleep(0)  # the subscriber waits for the next event
    fsynced.clear()
    job.status, job.stage, job.finished_at, job.progress = "succeeded", "done", 1010.0, 1.0
    await publish(store, job, "succeeded", record=True)
    async with asyncio.timeout(5):
        await watching
    ((names, synced),) = seen
    assert names == ["succeeded"]
    assert synced[0] == f"{job.id}.events.jsonl" and synced[1].startswith(f".{job.id}.json.")  # log, then record
    assert record_on_disk(outputs, job)["status"] == "succeeded"
    assert not (outputs / "jobs" / "active" / job.id).exists()
    await store.close()
