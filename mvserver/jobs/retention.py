"""Retention: a background sweeper removes finished jobs (record, events, reference copy, video, poster) and old images and
scene files after ``jobs.retention_hours``. It works in batches, off the event loop for file work, so requests
never wait for it; an expired job id keeps a tombstone (410 ``expired``) for one more retention period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from mvserver.core.artefacts import OutputStore, is_valid_id
from mvserver.jobs.store import JobStore

log = logging.getLogger("mvserver.jobs")

SWEEP_MAX_INTERVAL_SECONDS = 600.0
SWEEP_MIN_INTERVAL_SECONDS = 0.2
FILE_KINDS = ("images", "scenes")


def sweep_interval(retention_seconds: float) -> float:
    """Sweep a few times per retention period, at most every 10 minutes."""
    return min(SWEEP_MAX_INTERVAL_SECONDS, max(SWEEP_MIN_INTERVAL_SECONDS, retention_seconds / 4))


async def sweep_once(store: JobStore, outputs: OutputStore, retention_seconds: float) -> int:
    """Remove everything older than the retention period; returns how many jobs were removed."""
    now = time.time()
    before = now - retention_seconds
    total = 0
    while True:
        removed = await store.expire(before, now + retention_seconds)
        if removed:
            await asyncio.to_thread(_remove_job_files, outputs, removed)
            total += len(removed)
        if not removed:
            break
        await asyncio.sleep(0)  # batches: give requests a turn between them
    await asyncio.to_thread(_remove_old_files, outputs, before)
    if total:
        log.info("retention: removed %d finished job(s)", total)
    return total


async def sweep_forever(store: JobStore, outputs: OutputStore, retention_seconds: float) -> None:
    interval = sweep_interval(retention_seconds)
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep_once(store, outputs, retention_seconds)
        except Exception as exc:  # a store outage or an odd file must not end the sweeper
            log.warning("retention sweep failed: %s", exc)


def _remove_job_files(outputs: OutputStore, job_ids: list[str]) -> None:
    for job_id in job_ids:
        outputs.path("videos", job_id, ".mp4").unlink(missing_ok=True)
        outputs.path("videos", job_id, ".jpg").unlink(missing_ok=True)  # its poster
        outputs.path("jobs", job_id, ".ref").unlink(missing_ok=True)
        outputs.path("jobs", job_id, ".ffmpeg.lock").unlink(missing_ok=True)  # an assembly's run lock (assembly.py)


def _remove_old_files(outputs: OutputStore, before: float) -> None:
    """Images and scene files (named by their id) last written before ``before``; temporaries are left alone."""
    for kind in FILE_KINDS:
        with contextlib.suppress(FileNotFoundError), os.scandir(outputs.root / kind) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not is_valid_id(entry.name.partition(".")[0]):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file() and entry.stat().st_mtime < before:
                        os.unlink(entry.path)
