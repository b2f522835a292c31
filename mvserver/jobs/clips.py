"""A finished clip: the MP4 of a succeeded clip job, as lip sync and assembly take it as input.

The one check of such an input (it exists for the caller, it is a clip, it succeeded, its file is still there), so
both features refuse a clip the same way: 400 ``clip_not_found``, ``invalid_clip`` or ``clip_not_ready`` naming the
request's field.
"""

from __future__ import annotations

from collections.abc import Collection

from mvserver.core.artefacts import Artefacts, artefact_key
from mvserver.core.errors import ApiError
from mvserver.jobs.model import Job
from mvserver.web.access.auth import visible_to

CLIP_KINDS = frozenset({"video", "lipsync"})  # jobs whose output is a clip


async def finished_clip(
    job: Job | None,
    job_id: str,
    artefacts: Artefacts,
    field: str,
    caller: str | None,
    needs: str,
    kinds: Collection[str] | None = None,
) -> tuple[str, int]:
    """The artefact key and size of the MP4 of ``job`` (the job ``job_id``, None if the store has none) if it is a succeeded
    clip the caller may use; 400 naming ``field`` otherwise (another key's job is as unknown as a missing one).
    ``needs`` ends the message for an unfinished job; ``kinds``: the job kinds accepted (None: any)."""
    if job is None or not visible_to(job.owner, caller):
        raise ApiError(400, "clip_not_found", f"{field}: no job with id {job_id}", field=field)
    if kinds is not None and job.kind not in kinds:
        raise ApiError(400, "invalid_clip", f"{field}: job {job_id} is a {job.kind} job, not a clip", field=field)
    if job.status != "succeeded":
        raise ApiError(400, "clip_not_ready", f"{field}: job {job_id} is {job.status}; {needs}", field=field)
    key = artefact_key("videos", job_id, ".mp4")
    found = await artefacts.stat(key)
    if found is None:
        raise ApiError(400, "clip_not_found", f"{field}: the video of job {job_id} is gone", field=field)
    return key, found.size
