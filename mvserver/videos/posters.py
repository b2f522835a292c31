"""Clip posters: the first frame of every stored clip as a JPEG, and the clip's length and frame size in its job.

A storyboard grid of many clips should not load a ``<video>`` per clip to show a frame or a length. So when a job's
output is in place (a downloaded video or lip sync, an assembled video), before its ``succeeded`` event, the
engine's ``stored`` hook reads the clip's header (length, width, height) and cuts its first frame, scaled to fit
``videos.posters.max_side``, into ``videos/<job_id>.jpg``: once, in one run of the bundled ffmpeg, reading the file
as an MP4 only, with a time limit and at most ``videos.posters.concurrency`` runs at once. A clip ffmpeg cannot read in
time simply has no poster (``poster_url`` null); the job still succeeds. ``GET /api/mv/get_poster/{video_id}``
serves it with the video's own access rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from mvserver.appkeys import ARTEFACTS, CONFIG
from mvserver.core.artefacts import Artefacts, artefact_key
from mvserver.core.config import PosterSettings
from mvserver.jobs import Job
from mvserver.jobs.outputs import job_output
from mvserver.media.errors import MediaError
from mvserver.media.probe import probe_and_write

log = logging.getLogger("mvserver.jobs")
POSTER_SUFFIX = ".jpg"
POSTER_MAX_BYTES = 4 << 20  # ffmpeg stops writing past this (a 640 px JPEG is ~50 KB)
CLIP_DEMUXERS = ["mov"]  # every stored clip is an MP4; nothing else is read


def frame_args(dest: Path, max_side: int) -> list[str]:
    """ffmpeg output arguments: the input's first frame, fitted into ``max_side`` square pixels, as one JPEG."""
    fit = (
        f"scale=w='min(iw,{max_side})':h='min(ih,{max_side})':force_original_aspect_ratio=decrease:force_divisible_by=2"
    )
    return [
        "-map",
        "0:v:0",
        "-frames:v",
        "1",
        "-vf",
        fit,
        "-c:v",
        "mjpeg",
        "-q:v",
        "4",
        "-fs",
        str(POSTER_MAX_BYTES),
        "-f",
        "mjpeg",
        "-y",
        str(dest),
    ]


class _NotAClip(Exception):
    """The stored file has no video stream: no poster, and nothing to note (the scratch file is dropped)."""


async def describe(job: Job, store: Artefacts, clip_key: str, settings: PosterSettings) -> None:
    """Note the clip's length and frame size on ``job`` and store its poster next to it (``job.poster``).

    One ffmpeg run reads the clip's header and cuts the poster (:func:`~mvserver.media.probe.probe_and_write`): a
    process start is the larger part of the CPU either costs, and every finished job stores a clip."""
    try:
        async with (
            store.local_file(clip_key) as clip,
            store.writing(artefact_key("videos", job.id, POSTER_SUFFIX)) as tmp,
        ):
            info, failure = await probe_and_write(
                clip, frame_args(tmp, settings.max_side), timeout=settings.timeout_seconds, demuxers=CLIP_DEMUXERS
            )
            video = info.first_video
            if video is None:
                raise _NotAClip
            job.video_seconds = round(info.duration, 3) if info.duration is not None else None
            job.video_width, job.video_height = video.width, video.height
            if failure is not None:
                raise MediaError(f"ffmpeg could not cut the poster: {failure}")
            if (await asyncio.to_thread(os.stat, tmp)).st_size == 0:
                raise MediaError("ffmpeg wrote an empty poster")
    except _NotAClip:
        return  # not a clip: nothing to show
    job.poster = True


def stored_hook(app: web.Application) -> Callable[[Job, str], Awaitable[None]]:
    """The engine's ``stored`` hook of this app: :func:`describe`, bounded; a clip ffmpeg cannot read gets none."""
    settings = app[CONFIG].videos.posters
    slots = asyncio.Semaphore(settings.concurrency)

    async def stored(job: Job, clip: str) -> None:
        async with slots:
            try:
                await describe(job, app[ARTEFACTS], clip, settings)
            except (MediaError, FileNotFoundError) as exc:
                log.warning("job %s: no poster: %s", job.id, exc)

    return stored


async def get_poster(request: web.Request) -> web.StreamResponse:
    """The clip's first frame (JPEG), under the same rules as ``get_video``."""
    key = await job_output(request, POSTER_SUFFIX, "poster")
    return await request.app[ARTEFACTS].response(
        key, noun="poster", headers={"Content-Type": "image/jpeg", "Cache-Control": "private, max-age=3600"}
    )
