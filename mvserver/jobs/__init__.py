"""Jobs: the model, the store seam (files by default, Redis for several processes), the engine and SSE streams."""

from mvserver.core.errors import StoreUnavailable
from mvserver.jobs.file_store import FileJobStore
from mvserver.jobs.kinds import video_kind
from mvserver.jobs.model import FINAL_STATUSES, Event, Job, JobStatus, job_urls
from mvserver.jobs.runner import JobEngine
from mvserver.jobs.store import JobStore, Lease, LeaseLost
from mvserver.jobs.stream import stream_events

__all__ = [
    "FINAL_STATUSES",
    "Event",
    "FileJobStore",
    "Job",
    "JobEngine",
    "JobStatus",
    "JobStore",
    "Lease",
    "LeaseLost",
    "StoreUnavailable",
    "job_urls",
    "stream_events",
    "video_kind",
]
