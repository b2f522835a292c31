"""Retention: a background sweeper removes finished jobs (record, events, reference copy, video, poster) and old images and
scene files after ``jobs.retention_hours``. It works in batches, off the event loop for file work, so requests
never wait for it; an expired job id keeps a tombstone (410 ``expired``) for one more retention period."""

from __future__ import annotations

import asyncio
import logging
import time

from mvserver.core.artefacts import Artefacts, artefact_key
from mvserver.jobs.store import JobStore

log = logging.getLogger("mvserver.jobs")

SWEEP_MAX_INTERVAL_SECONDS = 600.0
SWEEP_MIN_INTERVAL_SECONDS = 0.2
FILE_KINDS = ("images", "scenes")


def sweep_interval(retention_seconds: float) -> float:
    """Sweep a few times per retention period, at most every 10 minutes."""
    return min(SWEEP_MAX_INTERVAL_SECONDS, max(SWEEP_MIN_INTERVAL_SECONDS, retention_seconds / 4))


async def sweep_once(store: JobStore, outputs: Artefacts, retention_seconds: float) -> int:
    """Remove everything older than the retention period; returns how many jobs were removed."""
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
    if total:
        log.info("retention: removed %d finished job(s)", total)
    return total


async def sweep_forever(store: JobStore, outputs: Artefacts, retention_seconds: float) -> None:
    interval = sweep_interval(retention_seconds)
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep_once(store, outputs, retention_seconds)
        except Exception as exc:  # a store outage or an odd file must not end the sweeper
            log.warning("retention sweep failed: %s", exc)


def job_files(job_ids: list[str]) -> list[str]:
    """The artefacts of expired jobs: the video, its poster, the reference copy and an assembly's run lock."""
    suffixes = (("videos", ".mp4"), ("videos", ".jpg"), ("jobs", ".ref"), ("jobs", ".ffmpeg.lock"))
    return [artefact_key(kind, job_id, suffix) for job_id in job_ids for kind, suffix in suffixes]
