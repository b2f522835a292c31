"""Jobs: the model, the store seam (files by default, Redis for several processes), the engine and SSE streams."""

from aiohttp import web

from .file_store import FileJobStore
from .kinds import video_kind
from .model import FINAL_STATUSES, Event, Job, JobStatus, job_urls
from .runner import JobEngine
from .store import JobStore, Lease, LeaseLost, StoreUnavailable
from .stream import stream_events

JOBS = web.AppKey("jobs", JobEngine)

__all__ = ["FINAL_STATUSES", "JOBS", "Event", "FileJobStore", "Job", "JobEngine", "JobStatus", "JobStore", "Lease",
           "LeaseLost", "StoreUnavailable", "job_urls", "stream_events", "video_kind"]
