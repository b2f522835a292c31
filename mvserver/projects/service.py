"""Projects (the storyboard): a song, scenes in display order and, per scene, its clip versions (video jobs).

Endpoints under ``/api/mv/projects``. Every change is a compare-and-set on the record's ``version`` (the ``ETag``);
``PATCH`` must send ``If-Match`` (428 without, 412 when someone else wrote first), actions may.

Versions: generating a scene's clip adds a version (a normal video job whose request holds ``project_id`` and
``scene_id``) and makes it the scene's *awaited* version. Nothing else changes until that job ends: if it succeeds
while it is still awaited it becomes the chosen clip; if the user chooses another version meanwhile (``PATCH``
``chosen_job_id``) the awaited mark is dropped and the user's choice stands; if it fails, the old choice stays.
Older versions stay (and can be chosen again) until the per-scene limit prunes the oldest finished ones that are
neither chosen nor awaited, failed ones first. Job states are read from the job engine, never copied into the
record, so a job ending does not change the ``ETag``; the effect is folded in at the next write (:func:`settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, create_model

from mvserver.analysis import SongAnalysis
from mvserver.core.artefacts import Artefacts, artefact_key, check_id, new_id
from mvserver.core.config import Config
from mvserver.core.errors import ApiError
from mvserver.core.validation import validate
from mvserver.images.service import saved_image
from mvserver.jobs import Job, JobEngine
from mvserver.projects import song as project_song
from mvserver.projects.store import CharacterCandidate, Claim, ClipVersion, Project, ProjectStore, Scene, Song
from mvserver.scenes.service import SongBrief
from mvserver.videos.service import check_reference_shape, whole_prompt
from mvserver.web.access.auth import owned_sidecar, visible_to

if TYPE_CHECKING:  # the request models are built by openapi/, a layer above: the service only reads them
    from mvserver.openapi.schemas import RequestModels

BASE = "/api/mv/projects"
CAS_ATTEMPTS = 20
CLAIM_SECONDS = 60.0  # a scene claimed by a clips request that died is free again after this long

JobStates = dict[str, Job | None]


@dataclass(frozen=True)
class ProjectDeps:
    """What the project service works with, so that it never sees a request or the app (the routes build it:
    :func:`mvserver.app.project_deps`): the settings, the project and job stores, the artefacts, the
    request models a clip or scene request is checked with, and the other features it calls."""

    config: Config
    projects: ProjectStore
    jobs: JobEngine
    artefacts: Artefacts
    models: RequestModels
    submit_video: Callable[..., Awaitable[Job]]  # videos: a clip job (body, defaulted, links, owner=, job_id=)
    write_scenes: Callable[..., Awaitable[dict[str, Any]]]  # scenes: a scene list (params, defaulted, caller=, ...)
    load_analysis: Callable[..., Awaitable[tuple[SongAnalysis | None, str | None]]]  # (audio_id, wait=)
    song_brief: Callable[..., Awaitable[SongBrief | None]]  # (project, analysis, timeline, count)
    generate_reference: Callable[..., Awaitable[dict[str, Any]]]  # images: (params, defaulted, abandoned, owner=)


# -- the song ------------------------------------------------------------------------------------------------------


async def song_duration(deps: ProjectDeps, audio_id: str, field: str, caller: str | None = None) -> float:
    """The duration of an uploaded song, from its sidecar ``audio/<id>.json`` (written last by the upload); another
    key's song than ``caller``'s is unknown."""
    sidecar = await owned_sidecar(deps.artefacts, artefact_key("audio", check_id(audio_id, field), ".json"), caller)
    try:
        if sidecar is None:
            raise KeyError("song")
        duration = float(sidecar["duration"])
        if not (math.isfinite(duration) and duration > 0):
            raise ValueError("no duration")
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        raise ApiError(400, "invalid_field", f"{field}: no uploaded song with id {audio_id}", field=field) from None
    return duration


def size_to_song(length: float, allowed: Iterable[int], scenes_max: int) -> list[int]:
    """Scene durations that cover ``length`` seconds with the fewest scenes and the least overshoot: the longest
    allowed duration everywhere, then the last scenes shortened as far as the total still covers the song."""
    allowed = sorted(allowed)
    longest = allowed[-1]
    count = max(1, math.ceil(length / longest - 1e-9))
    if count > scenes_max:
        raise ApiError(
            400,
            "too_many_scenes",
            f"audio_id: the song needs {count} scenes of {longest} s from the "
            f"offset, more than the limit of {scenes_max}",
            field="audio_id",
        )
    durations = [longest] * count
    total = longest * count
    for index in reversed(range(count)):
        shortest = next(d for d in allowed if total - durations[index] + d >= length - 1e-9)
        total += shortest - durations[index]
        durations[index] = shortest
    return durations


# -- versions ------------------------------------------------------------------------------------------------------


async def job_states(deps: ProjectDeps, project: Project) -> JobStates:
    """The job of every version of the project (None if the job store no longer has it)."""
    engine = deps.jobs
    ids = list({v.job_id for scene in project.scenes for v in scene.versions})
    return dict(zip(ids, await asyncio.gather(*(engine.get(job_id) for job_id in ids)), strict=False))


def _version(scene: Scene, job_id: str | None) -> ClipVersion | None:
    return next((v for v in scene.versions if v.job_id == job_id), None) if job_id else None


def _choose(scene: Scene, version: ClipVersion | None) -> None:
    """Make ``version`` the chosen clip; trims that do not fit its length are reset to the whole clip."""
    scene.chosen_job_id = version.job_id if version else None
    if version is not None and scene.trim_out > version.duration:
        scene.trim_in, scene.trim_out = 0.0, float(version.duration)


def settle(project: Project, jobs: JobStates) -> None:
    """Fold finished awaited versions into the record: a success becomes the chosen clip, a failure is dropped."""
    for scene in project.scenes:
        job = jobs.get(scene.awaited_job_id) if scene.awaited_job_id else None
        if scene.awaited_job_id is None or (job is not None and not job.final):
            continue
        if job is not None and job.status == "succeeded":
            _choose(scene, _version(scene, scene.awaited_job_id))
        scene.awaited_job_id = None


def _prunable(scene: Scene, jobs: JobStates) -> list[ClipVersion]:
    """Versions that may go, in the order they go: failed (or forgotten) ones oldest first, then succeeded ones."""
    keep = {scene.chosen_job_id, scene.awaited_job_id}
    finished = [
        v for v in scene.versions if v.job_id not in keep and ((job := jobs.get(v.job_id)) is None or job.final)
    ]

    def succeeded(version: ClipVersion) -> bool:
        job = jobs.get(version.job_id)
        return job is not None and job.status == "succeeded"

    return sorted(finished, key=lambda v: (succeeded(v), v.created_at))


def check_room(scene: Scene, jobs: JobStates, limit: int, field: str) -> None:
    if len(scene.versions) >= limit and not _prunable(scene, jobs):
        raise ApiError(
            409,
            "too_many_versions",
            f"{field}: the scene has {len(scene.versions)} clip versions still "
            "running or chosen (the limit); wait for one to finish",
            field=field,
        )


def add_version(scene: Scene, version: ClipVersion, jobs: JobStates, limit: int) -> None:
    """Append a version (awaited from now on), pruning the oldest prunable ones beyond ``limit``."""
    check_room(scene, jobs, limit, "scene_id")
    excess = len(scene.versions) + 1 - limit
    gone = {v.job_id for v in _prunable(scene, jobs)[: max(0, excess)]}
    scene.versions = [v for v in scene.versions if v.job_id not in gone] + [version]
    scene.awaited_job_id = version.job_id


# -- the timeline (what assembly and lip sync read) ----------------------------------------------------------------


class TimelineEntry(NamedTuple):
    """One scene in display order: its chosen clip (None if there is none yet), the part of the clip kept
    (clip seconds), and where that part starts in the song (None without a song)."""

    scene: Scene
    job_id: str | None
    trim_in: float
    trim_out: float
    song_start: float | None

    @property
    def seconds(self) -> float:
        return self.trim_out - self.trim_in


def project_timeline(project: Project) -> list[TimelineEntry]:
    """The scenes in display order with their chosen clips, trims and song window: scene *i* plays the song from
    ``offset + sum of the kept seconds of the scenes before it``. Call :func:`settle` with the current job states
    first (as :func:`load_settled` does) so a just-finished awaited clip counts as chosen."""
    position = project.song.offset if project.song else None
    entries = []
    for scene in project.scenes:
        version = _version(scene, scene.chosen_job_id)
        length = float(version.duration) if version else float(scene.duration)
        trim_out = min(scene.trim_out, length)
        trim_in = min(scene.trim_in, trim_out)
        entries.append(TimelineEntry(scene, scene.chosen_job_id, trim_in, trim_out, position))
        if position is not None:
            position = round(position + trim_out - trim_in, 6)
    return entries


def chosen_clip(entry: TimelineEntry, jobs: JobStates, field: str) -> Job:
    """The succeeded job of the scene's chosen clip (what assembly and lip sync take); 400 ``clip_not_ready`` naming
    ``field`` when the scene has none."""
    job = jobs.get(entry.job_id) if entry.job_id else None
    if job is None or job.status != "succeeded":
        raise ApiError(
            400, "clip_not_ready", f"{field}: scene {entry.scene.id} has no finished chosen clip", field=field
        )
    return job


async def load_settled(deps: ProjectDeps, project_id: str) -> tuple[Project, JobStates]:
    """The project with finished awaited versions folded in (in memory), and the jobs of its versions."""
    return await settled(deps, await load(deps, project_id))


async def settled(deps: ProjectDeps, project: Project) -> tuple[Project, JobStates]:
    """A project the request has loaded, with finished awaited versions folded in (in memory; the record is the
    same object), and the jobs of its versions."""
    jobs = await job_states(deps, project)
    settle(project, jobs)
    return project, jobs


# -- reading and writing records -----------------------------------------------------------------------------------


async def load(deps: ProjectDeps, project_id: str, caller: str | None = None) -> Project:
    """The project (404 if there is none, or it belongs to another key than ``caller``)."""
    project = await deps.projects.get(check_id(project_id, "project_id"))
    if project is None or not visible_to(project.owner, caller):
        raise ApiError(404, "not_found", f"no project with id {project_id}")
    return project


def etag(project: Project) -> str:
    return f'"{project.version}"'


def _matches(if_match: str, project: Project) -> bool:
    tags = {tag.strip() for tag in if_match.split(",")}
    return "*" in tags or etag(project) in tags


def check_if_match(project: Project, if_match: str | None, advice: str = "") -> None:
    """412 ``precondition_failed`` when the client named a version (``If-Match``) that the project is no longer at;
    ``advice`` follows the message. The one ``If-Match`` check of every project write."""
    if if_match is not None and not _matches(if_match, project):
        raise ApiError(
            412, "precondition_failed", f"the project is at version {etag(project)}{advice}", field="If-Match"
        )


Change = Callable[[Project, JobStates], Awaitable[None] | None]


async def update(deps: ProjectDeps, project_id: str, change: Change, if_match: str | None = None) -> Project:
    """Read, check ``If-Match``, settle, apply ``change`` (which may raise ApiError: nothing is written) and
    compare-and-set; a write that lost a race is redone on the new record unless the client named a version."""
    project, _ = await _update(deps, project_id, change, if_match)
    return project


async def update_loaded(
    deps: ProjectDeps, project: Project, jobs: JobStates, change: Change
) -> tuple[Project, JobStates]:
    """:func:`update` of a project the request has loaded and settled already (``jobs``: its versions' jobs): the
    first compare-and-set writes it without reading it again; one that lost a race is redone on a fresh read. The
    project as written and the job states it was settled with."""
    return await _update(deps, project.id, change, None, (project, jobs))


async def _update(
    deps: ProjectDeps,
    project_id: str,
    change: Change,
    if_match: str | None,
    loaded: tuple[Project, JobStates] | None = None,
) -> tuple[Project, JobStates]:
    store = deps.projects
    for _ in range(CAS_ATTEMPTS):
        if loaded is not None:
            (project, jobs), loaded = loaded, None
        else:
            project = await load(deps, project_id)
            check_if_match(project, if_match, f", not {if_match}: read it again and reapply the change")
            project, jobs = await settled(deps, project)
        result = change(project, jobs)
        if result is not None:
            await result
        project.updated_at = time.time()
        if await store.put(project, project.version):
            return project, jobs
    raise ApiError(409, "conflict", "the project kept changing while this change was applied; try again")


# -- the view ------------------------------------------------------------------------------------------------------


# What a storyboard grid shows of a finished clip without loading it: its poster, length and frame size.
CLIP_FACTS = ("poster_url", "video_seconds", "video_width", "video_height")


def _version_view(version: ClipVersion, job: Job | None) -> dict[str, Any]:
    view: dict[str, Any] = {"job_id": version.job_id, "created_at": version.created_at, "duration": version.duration}
    if job is None:
        return {
            **view,
            "status": "missing",
            "stage": None,
            "progress": None,
            "video_url": None,
            "error": None,
            **dict.fromkeys(CLIP_FACTS),
        }
    state = job.state()
    return {**view, **{k: state[k] for k in ("status", "stage", "progress", "video_url", "error", *CLIP_FACTS)}}


def project_view(project: Project, jobs: JobStates) -> dict[str, Any]:
    """The record as clients see it: settled, each version with its job's live state, each scene with its timeline
    place. ``etag`` is the version a PATCH must name in ``If-Match``."""
    project = project.model_copy(deep=True)
    settle(project, jobs)
    record = project.model_dump()
    body = {
        "project_id": record.pop("id"),
        "etag": etag(project),
        **record,
        "events_url": f"{BASE}/{project.id}/events",
    }
    for scene, entry, raw in zip(project.scenes, project_timeline(project), body["scenes"], strict=False):
        raw["versions"] = [_version_view(v, jobs.get(v.job_id)) for v in scene.versions]
        raw["seconds"] = round(entry.seconds, 6)
        raw["song_start"] = entry.song_start
        raw["chosen_video_url"] = f"/api/mv/get_video/{scene.chosen_job_id}" if scene.chosen_job_id else None
        raw["chosen_poster_url"] = next(
            (v["poster_url"] for v in raw["versions"] if v["job_id"] == scene.chosen_job_id), None
        )
    body["total_seconds"] = round(sum(e.seconds for e in project_timeline(project)), 6)
    # What a page shows with the storyboard, by URL (with keys on each gets its signed twin on the way out).
    body["character_image_url"] = (
        f"/api/mv/get_image/{project.character_image_id}" if project.character_image_id else None
    )
    if body["song"] is not None:
        body["song"]["audio_url"] = f"/api/mv/get_audio/{project.song.audio_id}" if project.song else None
    for raw in body["scenes"]:
        raw.pop("claim", None)  # bookkeeping of a request in flight
    for candidate in body["character_candidates"]:
        candidate["image_url"] = f"/api/mv/get_image/{candidate['image_id']}"
    return body


def timeline_view(project: Project, jobs: JobStates) -> dict[str, Any]:
    """``GET …/timeline``: the scenes in display order with their chosen clip, trims and song window."""
    entries = [
        {
            "scene_id": e.scene.id,
            "job_id": e.job_id,
            "trim_in": e.trim_in,
            "trim_out": e.trim_out,
            "seconds": round(e.seconds, 6),
            "song_start": e.song_start,
            "status": job.status if e.job_id and (job := jobs.get(e.job_id)) else None,
            "video_url": f"/api/mv/get_video/{e.job_id}" if e.job_id else None,
        }
        for e in project_timeline(project)
    ]
    song = project.song
    song_view = {**song.model_dump(), "audio_url": f"/api/mv/get_audio/{song.audio_id}"} if song else None
    return {"project_id": project.id, "song": song_view, "entries": entries}


# -- request bodies ------------------------------------------------------------------------------------------------


def action_options(body: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """Only the options a project action takes; the rest of the request comes from the project."""
    for name in body:
        if name not in allowed:
            raise ApiError(
                400,
                "unknown_field",
                f"{name} is not a known field (this action takes {', '.join(sorted(allowed))})",
                field=name,
            )
    return body


@functools.lru_cache(maxsize=64)
def _options_model(model: type[BaseModel], allowed: frozenset[str]) -> type[BaseModel]:
    """The fields ``allowed`` of a request model, with their types, limits and defaults, as a model of their own."""
    fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in model.model_fields.items() if name in allowed
    }
    return create_model(f"{model.__name__}Options", __config__=model.model_config, **fields)


def normal_options(model: type[BaseModel], options: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """A project action's options as the request model they feed reads them (checked, text trimmed, defaults
    filled): what an ``Idempotency-Key`` fingerprints, known before the project's state is read."""
    checked, _ = validate(_options_model(model, allowed), options)
    return checked.model_dump(mode="json")


# -- create --------------------------------------------------------------------------------------------------------


def new_scene(duration: int, prompt: str = "", negative_prompt: str = "", trim_out: float | None = None) -> Scene:
    return Scene(
        id=new_id(),
        prompt=prompt,
        negative_prompt=negative_prompt,
        duration=duration,
        trim_out=float(duration) if trim_out is None else trim_out,
    )


async def create_project(deps: ProjectDeps, body: Any, owner: str | None = None) -> Project:
    config = deps.config
    settings = config.projects
    song = analysis = None
    sized = [(settings.default_scene_seconds, float(settings.default_scene_seconds))] * (body.number_of_scenes or 0)
    if body.audio_id is not None:
        duration = await song_duration(deps, body.audio_id, "audio_id", owner)
        song = Song(
            audio_id=body.audio_id, offset=_offset(body.audio_offset, duration, "audio_offset"), duration=duration
        )
        sizing = body.number_of_scenes is None
        # Sizing waits for the song's analysis (usually done at upload); otherwise only a finished one is used.
        analysis, note = await deps.load_analysis(
            body.audio_id, wait=config.env.analysis_timeout_seconds if sizing else 0
        )
        if sizing and analysis is not None and analysis.grid is not None:
            sized = project_song.scenes_on_bars(
                analysis, song, config.videos.allowed.duration, settings.frame_rate, settings.limits.scenes_max
            )
            song.sized_by = "bars"
        elif sizing:
            sized = [
                (d, float(d))
                for d in size_to_song(
                    duration - song.offset, config.videos.allowed.duration, settings.limits.scenes_max
                )
            ]
            song.sized_by, song.sizing_note = "length", note
    elif body.audio_offset:
        raise ApiError(400, "invalid_field", "audio_offset: needs audio_id", field="audio_offset")
    project = Project(
        id=new_id(),
        owner=owner,
        idea=body.idea,
        character_description=body.character_description,
        style=body.style,
        aspect_ratio=body.aspect_ratio,
        song=song,
        scenes=[new_scene(d, trim_out=kept) for d, kept in sized],
    )
    project_song.place_scenes(project_timeline(project), song, analysis, settings.frame_rate)
    if not await deps.projects.put(project, 0):
        raise ApiError(409, "conflict", "a project with this id exists")  # a UUID4 collision: never in practice
    return project


def _offset(offset: float, duration: float, field: str) -> float:
    if offset >= duration:
        raise ApiError(
            400, "invalid_field", f"{field}: {offset:g} s is past the end of the song ({duration:g} s)", field=field
        )
    return offset


# -- patch ---------------------------------------------------------------------------------------------------------


async def check_image(deps: ProjectDeps, image_id: str, caller: str | None) -> None:
    try:
        await saved_image(deps.artefacts, image_id, "character_image_id", caller)
    except ApiError:
        raise ApiError(
            400, "invalid_field", f"character_image_id: no image with id {image_id}", field="character_image_id"
        ) from None


async def patch_project(
    deps: ProjectDeps, current: Project, body: Any, if_match: str, caller: str | None = None
) -> Project:
    """Apply a validated PATCH: a new song is checked and measured, a character image checked, the song's analysis
    used if it is ready (never waited for); then :func:`apply_patch` in a compare-and-set at ``if_match``."""
    song: Song | None | bool = False
    if "audio_id" in body.model_fields_set:
        song = None
        if body.audio_id is not None:
            duration = await song_duration(deps, body.audio_id, "audio_id", caller)
            song = Song(audio_id=body.audio_id, duration=duration)
    if body.character_image_id is not None:
        await check_image(deps, body.character_image_id, caller)
    audio_id = body.audio_id if "audio_id" in body.model_fields_set else current.song and current.song.audio_id
    analysis = (await deps.load_analysis(audio_id, wait=0))[0] if audio_id else None  # if ready
    return await update(
        deps, current.id, lambda p, jobs: apply_patch(deps.config, p, jobs, body, song, analysis), if_match
    )


def apply_patch(
    config: Config,
    project: Project,
    jobs: JobStates,
    patch: Any,
    song: Song | None | bool,
    analysis: SongAnalysis | None = None,
) -> None:
    """Apply a validated PATCH in place (remove, per-scene changes, order, add, then snapped cuts) or raise ApiError
    naming the field. ``song`` is the new song when ``audio_id`` was sent (None removes it), False when it was not;
    ``analysis`` the song's (for snapping and the scenes' windows), if there is one."""
    sent = patch.model_fields_set
    for name in ("idea", "character_description", "style", "character_image_id"):
        if name in sent:
            setattr(project, name, getattr(patch, name))
    if song is not False:
        project.song = song  # type: ignore[assignment]
    if "audio_offset" in sent:
        if project.song is None:
            raise ApiError(400, "invalid_field", "audio_offset: the project has no song", field="audio_offset")
        project.song.offset = _offset(patch.audio_offset, project.song.duration, "audio_offset")
    if patch.remove_scenes is not None:
        for index, scene_id in enumerate(patch.remove_scenes):
            if project.scene(scene_id) is None:
                raise _unknown_scene(f"remove_scenes.{index}", scene_id)
        project.scenes = [s for s in project.scenes if s.id not in set(patch.remove_scenes)]
    seen: set[str] = set()
    for index, change in enumerate(patch.scenes or []):
        field = f"scenes.{index}"
        scene = project.scene(change.id)
        if scene is None or change.id in seen:
            raise (
                _unknown_scene(f"{field}.id", change.id)
                if scene is None
                else ApiError(
                    400, "invalid_field", f"{field}.id: scene {change.id} is listed twice", field=f"{field}.id"
                )
            )
        seen.add(change.id)
        _patch_scene(config, scene, change, jobs, field)
        if {"prompt", "duration"} & change.model_fields_set:
            check_scene_prompt(config, project, scene, f"{field}.prompt")
    if patch.order is not None:
        ids = [s.id for s in project.scenes]
        if sorted(patch.order) != sorted(ids):
            raise ApiError(
                400,
                "invalid_field",
                f"order: must list each of the project's {len(ids)} scene ids exactly once",
                field="order",
            )
        by_id = {s.id: s for s in project.scenes}
        project.scenes = [by_id[i] for i in patch.order]
    for index, added in enumerate(patch.add_scenes or []):
        project.scenes.append(new_scene(added.duration, added.prompt, added.negative_prompt))
        check_scene_prompt(config, project, project.scenes[-1], f"add_scenes.{index}.prompt")
    limit = config.projects.limits.scenes_max
    if len(project.scenes) > limit:
        raise ApiError(
            400, "too_many_scenes", f"add_scenes: a project holds at most {limit} scenes", field="add_scenes"
        )
    settings = config.projects
    snaps = [(c.id, c.snap, f"scenes.{i}") for i, c in enumerate(patch.scenes or []) if c.snap is not None]
    project_song.snap_trims(
        project, snaps, analysis, settings.frame_rate, settings.limits.min_scene_seconds, project_timeline
    )
    project_song.place_scenes(project_timeline(project), project.song, analysis, settings.frame_rate)


def _scene_prompt_excess(config: Config, project: Project, scene: Scene) -> int:
    """How many characters the scene's prompt, with the server's video rules for its shape, is over the whole-prompt
    limit (``videos.limits.full_prompt_max_chars``); 0 or less when a clip of it would be accepted."""
    shape = SimpleNamespace(
        prompt=scene.prompt, aspect_ratio=project.aspect_ratio, duration=scene.duration, video_rules_template=None
    )
    return len(whole_prompt(config, shape)) - config.videos.limits.full_prompt_max_chars


def check_scene_prompt(config: Config, project: Project, scene: Scene, field: str) -> None:
    """Refuse (400 naming ``field``) a scene prompt that its clip request would refuse later: checked once, where
    the prompt is written."""
    excess = _scene_prompt_excess(config, project, scene)
    if scene.prompt and excess > 0:
        limit = config.videos.limits.full_prompt_max_chars
        raise ApiError(
            400,
            "invalid_field",
            f"{field}: with the video rules appended the whole prompt would be "
            f"{limit + excess} characters, at most {limit} are accepted: shorten it "
            f"by {excess}",
            field=field,
        )


def fit_scene_prompt(config: Config, project: Project, scene: Scene) -> None:
    """Cut a prompt the server wrote (Gemini's) so a clip of it is accepted."""
    for _ in range(8):
        excess = _scene_prompt_excess(config, project, scene)
        if excess <= 0 or not scene.prompt:
            return
        scene.prompt = scene.prompt[: max(0, len(scene.prompt) - excess)].rstrip()


def _unknown_scene(field: str, scene_id: str) -> ApiError:
    return ApiError(400, "invalid_field", f"{field}: the project has no scene {scene_id}", field=field)


def _patch_scene(config: Config, scene: Scene, change: Any, jobs: JobStates, field: str) -> None:
    sent = change.model_fields_set
    for name in ("prompt", "negative_prompt"):
        if name in sent:
            setattr(scene, name, getattr(change, name))
    if "chosen_job_id" in sent:
        version = _version(scene, change.chosen_job_id)
        if change.chosen_job_id is not None:
            job = jobs.get(change.chosen_job_id)
            if version is None or job is None or job.status != "succeeded":
                state = "not a version of this scene" if version is None else f"{job.status if job else 'missing'}"
                raise ApiError(
                    400,
                    "invalid_field",
                    f"{field}.chosen_job_id: {change.chosen_job_id} is {state}; only a succeeded version can be chosen",
                    field=f"{field}.chosen_job_id",
                )
        _choose(scene, version)
        scene.awaited_job_id = None  # the user's choice stands over a running regeneration
    if "duration" in sent and change.duration != scene.duration:
        scene.duration = change.duration
        if scene.chosen_job_id is None and not {"trim_in", "trim_out"} & sent:
            scene.trim_in, scene.trim_out = 0.0, float(scene.duration)
    if "trim_in" in sent:
        scene.trim_in = change.trim_in
    if "trim_out" in sent:
        scene.trim_out = change.trim_out
    chosen = _version(scene, scene.chosen_job_id)
    length = float(chosen.duration if chosen else scene.duration)
    shortest = config.projects.limits.min_scene_seconds
    if scene.trim_out > length:
        raise ApiError(
            400,
            "invalid_field",
            f"{field}.trim_out: {scene.trim_out:g} s is past the end of the {length:g} s clip",
            field=f"{field}.trim_out",
        )
    if scene.trim_out - scene.trim_in < shortest:
        bad = "trim_in" if "trim_in" in sent else "trim_out"
        raise ApiError(
            400,
            "invalid_field",
            f"{field}.{bad}: the trims must keep at least {shortest:g} s "
            f"(trim_in {scene.trim_in:g}, trim_out {scene.trim_out:g})",
            field=f"{field}.{bad}",
        )


# -- actions -------------------------------------------------------------------------------------------------------


async def render_character(
    deps: ProjectDeps, project: Project, params: Any, defaulted: list[str], abandoned: Callable[[], bool]
) -> tuple[Project, dict[str, Any]]:
    """Render the project's character (``params``: the checked image request) and keep every candidate on the
    record, the first one chosen; the project and the images' answer (without their bytes)."""
    image = await deps.generate_reference(params.model_dump(), defaulted, abandoned, owner=project.owner)

    def pick(current: Project, _jobs: JobStates) -> None:
        current.character_image_id = image["image_id"]
        current.character_candidates = [
            CharacterCandidate(image_id=i["image_id"], mime_type=i["mime_type"], seed=i["seed"])
            for i in image["images"]
        ]

    project = await update(deps, project.id, pick)
    return project, {k: v for k, v in image.items() if k != "image_base64"}


def _clip_body(
    deps: ProjectDeps, project: Project, scene: Scene, options: dict[str, Any], field: str
) -> tuple[Any, list[str]]:
    """The video request of a scene's clip: prompt, duration and shape from the project; the character image as
    the reference when the backend takes one for this shape (Replicate: 16:9, 8 s), else none."""
    if not scene.prompt:
        raise ApiError(
            400,
            "missing_field",
            f"{field}.prompt: the scene has no prompt yet (write scenes or PATCH it)",
            field=f"{field}.prompt",
        )
    model = deps.models.video
    limit = deps.config.videos.limits.text_max_chars
    data = {
        "prompt": scene.prompt[:limit],
        "negative_prompt": scene.negative_prompt[:limit],
        "duration": scene.duration,
        "aspect_ratio": project.aspect_ratio,
        **options,
    }
    body, defaulted = validate(model, data)
    if not body.video_rules_template:  # a prompt written before PATCH checked it: name the scene, not "prompt"
        check_scene_prompt(deps.config, project, scene, f"{field}.prompt")
    if project.character_image_id:
        try:
            check_reference_shape(deps.config, body)
        except ApiError:
            return body, defaulted
        body, defaulted = validate(model, {**data, "reference_image_id": project.character_image_id})
    return body, defaulted


def _claimed(scene: Scene, now: float) -> bool:
    return scene.claim is not None and scene.claim.until > now


class _NothingToClaim(Exception):
    """Every scene a clips request wanted is taken already (a concurrent request claimed it): nothing to write."""


async def _claim(deps: ProjectDeps, project_id: str, scene_ids: list[str], token: str) -> list[str]:
    """Claim the scenes that still have no chosen clip, none awaited and no live claim, in one compare-and-set;
    the ids claimed now (possibly none). Only then may jobs be created: a concurrent request finds them taken."""
    got: list[str] = []

    def claim(current: Project, _jobs: JobStates) -> None:
        got.clear()
        now = time.time()
        for scene_id in scene_ids:
            target = current.scene(scene_id)
            if target is None or target.chosen_job_id or target.awaited_job_id or _claimed(target, now):
                continue
            target.claim = Claim(token=token, until=now + CLAIM_SECONDS)
            got.append(scene_id)
        if not got:
            raise _NothingToClaim()

    try:
        await update(deps, project_id, claim)
    except _NothingToClaim:
        return []
    return got


async def _release_claims(deps: ProjectDeps, project_id: str, token: str) -> None:
    def release(current: Project, _jobs: JobStates) -> None:
        for scene in current.scenes:
            if scene.claim is not None and scene.claim.token == token:
                scene.claim = None

    await update(deps, project_id, release)


async def generate_clips(
    deps: ProjectDeps,
    project_id: str,
    scene_ids: list[str] | None,
    options: dict[str, Any],
    if_match: str | None = None,
    *,
    owner: str | None = None,
    charge: Callable[[list[str]], Awaitable[list[str]]] | None = None,
) -> tuple[Project, JobStates, list[Job]]:
    """Start a clip job for the given scenes (None: every scene with no chosen clip and none running or being
    started) and link each as a new version. Everything is checked before the first job starts. For "every
    scene", the scenes are first claimed on the record (one compare-and-set), so of concurrent requests only the
    claimer creates jobs; then ``charge(job_ids)`` takes the quota of the n jobs at once (all or none; jobs beyond the
    key's running-jobs cap wait queued in the job store). ``owner``: the caller's key, which owns the jobs."""
    config = deps.config
    limit = config.projects.limits.versions_per_scene_max
    project, jobs = await load_settled(deps, project_id)
    check_if_match(project, if_match)
    if scene_ids is None:
        now = time.time()
        scenes = [
            s for s in project.scenes if s.chosen_job_id is None and s.awaited_job_id is None and not _claimed(s, now)
        ]
    else:
        scenes = [s for s in (project.scene(i) for i in scene_ids) if s is not None]
        if len(scenes) != len(scene_ids):
            raise ApiError(404, "not_found", f"the project has no scene {scene_ids[0]}", field="scene_id")
    bodies = {}
    for scene in scenes:
        field = f"scenes.{project.scenes.index(scene)}"
        check_room(scene, jobs, limit, field)
        bodies[scene.id] = _clip_body(deps, project, scene, options, field)
    if not scenes:  # nothing is missing: nothing to write
        return project, jobs, []
    token = None
    if scene_ids is None:
        token = new_id()
        claimed = set(await _claim(deps, project_id, [s.id for s in scenes], token))
        scenes = [s for s in scenes if s.id in claimed]
        if not scenes:  # a concurrent request is starting them (a double click): nothing more to do
            project, jobs = await load_settled(deps, project_id)
            return project, jobs, []
    submitted: list[Job] = []
    duplicates: list[Job] = []

    def link(current: Project, states: JobStates) -> None:
        duplicates.clear()
        for scene, job in zip(scenes, submitted, strict=False):
            target = current.scene(scene.id)
            if target is None:
                raise ApiError(409, "conflict", f"scene {scene.id} was removed meanwhile", field="scene_id")
            if token is not None and (target.claim is None or target.claim.token != token):
                duplicates.append(job)  # the claim lapsed and another request took the scene
                continue
            target.claim = None
            add_version(target, ClipVersion(job_id=job.id, duration=job.request["duration"]), states, limit)

    try:
        job_ids = [new_id() for _ in scenes]
        if charge is not None:
            job_ids = await charge(job_ids)
        for scene, job_id in zip(scenes, job_ids, strict=False):
            body, defaulted = bodies[scene.id]
            links = {"project_id": project.id, "scene_id": scene.id}
            submitted.append(await deps.submit_video(body, defaulted, links, owner=owner, job_id=job_id))
        project = await update(deps, project_id, link)
    except BaseException:
        for job in submitted:  # nothing was linked: none of them may run unseen
            await deps.jobs.cancel(job.id)
        if token is not None:
            with contextlib.suppress(Exception):  # else the claim lapses by itself: the first error is the one to tell
                await _release_claims(deps, project_id, token)
        raise
    for job in duplicates:
        await deps.jobs.cancel(job.id)
    dropped = {job.id for job in duplicates}
    started = [job for job in submitted if job.id not in dropped]
    return project, await job_states(deps, project), started


async def write_project_scenes(
    deps: ProjectDeps, project_id: str, options: Any, if_match: str | None, owner: str | None = None
) -> Project:
    """Ask Gemini for the scene prompts (the project's idea, character and style) and write them into the scenes
    that existed when the request came, by id (a reorder meanwhile does not mix them up); more scenes are added.
    ``owner``: the caller's key, which owns the scene list written."""
    config = deps.config
    project = await load(deps, project_id)
    check_if_match(project, if_match)
    count = options.number_of_scenes or len(project.scenes) or config.scenes.defaults.number_of_scenes
    if count < len(project.scenes):
        raise ApiError(
            400,
            "invalid_field",
            f"number_of_scenes: the project has {len(project.scenes)} scenes; remove scenes with PATCH first",
            field="number_of_scenes",
        )
    params = {
        "idea": project.idea,
        "character_description": project.character_description,
        **{k: v for k, v in options.model_dump().items() if v is not None and k != "number_of_scenes"},
    }
    if project.style in config.styles:
        params["style"] = project.style  # a preset: rendered by write_scenes as create_scenes renders it
    elif project.style:
        params["video_characteristics"] = project.style  # free style words
    scenes_body, defaulted = validate(deps.models.scenes, {**params, "number_of_scenes": 1})
    params = {**scenes_body.model_dump(), "number_of_scenes": count}
    defaulted = [name for name in defaulted if name != "number_of_scenes"]
    ids = [s.id for s in project.scenes]
    fps = config.projects.frame_rate
    analysis = brief = None
    if project.song is not None:  # Gemini hears the song and reads its timeline
        analysis, _ = await deps.load_analysis(project.song.audio_id, wait=config.env.analysis_wait_seconds)
        project_song.place_scenes(project_timeline(project), project.song, analysis, fps)
        brief = await deps.song_brief(project, analysis, project_timeline(project), count)
    caller = f"project {project_id} write_scenes"
    written = (await deps.write_scenes(params, defaulted, caller=caller, song=brief, owner=owner))["scenes"]
    limit = config.projects.limits.text_max_chars

    def fill(current: Project, _jobs: JobStates) -> None:
        for index, text in enumerate(written):
            prompt, negative = text["description"][:limit], text["negative_description"][:limit]
            scene = current.scene(ids[index]) if index < len(ids) else None
            if scene is not None:
                scene.prompt, scene.negative_prompt = prompt, negative
            elif index >= len(ids) and len(current.scenes) < config.projects.limits.scenes_max:
                scene = new_scene(config.projects.default_scene_seconds, prompt, negative)
                current.scenes.append(scene)
            if scene is not None:
                fit_scene_prompt(config, current, scene)
        project_song.place_scenes(project_timeline(current), current.song, analysis, fps)

    return await update(deps, project_id, fill)
