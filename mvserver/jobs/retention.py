"""Retention: a background sweeper removes finished jobs (record, events, reference copy, video, poster) and old images and
scene files after ``jobs.retention_hours``. It works in batches, off the event loop for file work, so requests
never wait for it; an expired job id keeps a tombstone (410 ``expired``) for one more retention period.

An assembly's run lock is no artefact: it is a file of the output directory of the node that ran the job (with
artefacts in object storage too), so each node's sweeper removes its own locks of jobs the store no longer holds,
whichever node expired them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from mvserver.core.artefacts import Artefacts, OutputStore, artefact_key, is_valid_id
from mvserver.jobs.store import JobStore

log = logging.getLogger("mvserver.jobs")

SWEEP_MAX_INTERVAL_SECONDS = 600.0
SWEEP_MIN_INTERVAL_SECONDS = 0.2
FILE_KINDS = ("images", "scenes")
RUN_LOCK_SUFFIX = ".ffmpeg.lock"  # outputs/jobs/<job_id>.ffmpeg.lock: an assembly's run lock, on its node's disk


def sweep_interval(retention_seconds: float) -> float:
    """Sweep a few times per retention period, at most every 10 minutes."""
    return min(SWEEP_MAX_INTERVAL_SECONDS, max(SWEEP_MIN_INTERVAL_SECONDS, retention_seconds / 4))


async def sweep_once(
    store: JobStore, outputs: Artefacts, retention_seconds: float, node_dir: OutputStore | None = None
) -> int:
    """Remove everything older than the retention period, and the run locks in this node's output directory
    ``node_dir`` of jobs that are gone; returns how many jobs were removed."""
    now = time.time()
    before = now - retention_seconds
    total = 0
    while True:
        removed = await store.expire(before, now + retention_seconds)
        if removed:
            await outputs.delete(*job_files(removed))
            total += len(removed)
        if not removed:
            break
        await asyncio.sleep(0)  # batches: give requests a turn between them
    for kind in FILE_KINDS:  # images and scene files (and their sidecars) last written before the period
        await outputs.delete(*await outputs.list_old(kind, before))
    if node_dir is not None:
        await remove_run_locks(store, node_dir)
    if total:
        log.info("retention: removed %d finished job(s)", total)
    return total


async def sweep_forever(
    store: JobStore, outputs: Artefacts, retention_seconds: float, node_dir: OutputStore | None = None
) -> None:
    interval = sweep_interval(retention_seconds)
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep_once(store, outputs, retention_seconds, node_dir)
        except Exception as exc:  # a store outage or an odd file must not end the sweeper
            log.warning("retention sweep failed: %s", exc)


def job_files(job_ids: list[str]) -> list[str]:
    """The artefacts of expired jobs: the video, its poster and the reference copy."""
    suffixes = (("videos", ".mp4"), ("videos", ".jpg"), ("jobs", ".ref"))
    return [artefact_key(kind, job_id, suffix) for job_id in job_ids for kind, suffix in suffixes]


async def remove_run_locks(store: JobStore, node_dir: OutputStore) -> int:
    """Delete the run locks in ``node_dir`` whose job the store no longer holds (expired or deleted, here or on
    another node): no run of that job can start again, so the file guards nothing. How many went."""
    count = 0
    for job_id in await asyncio.to_thread(_run_lock_ids, node_dir):
        if await store.get(job_id) is None:
            await asyncio.to_thread(node_dir.path("jobs", job_id, RUN_LOCK_SUFFIX).unlink, missing_ok=True)
            count += 1
    return count


def _run_lock_ids(node_dir: OutputStore) -> list[str]:
    ids = []
    with contextlib.suppress(FileNotFoundError), os.scandir(node_dir.root / "jobs") as entries:
        for entry in entries:
            job_id = entry.name.removesuffix(RUN_LOCK_SUFFIX)
            if entry.name.endswith(RUN_LOCK_SUFFIX) and is_valid_id(job_id):
                ids.append(job_id)
    return ids
