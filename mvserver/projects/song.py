"""A project's song and its scenes: sizing on the song's bars, where each scene plays in it, trims snapped to its
grid, and the brief the scene writer sends Gemini with the song.

:mod:`mvserver.projects.service` calls these at a few points (create, PATCH, write_scenes); they take the timeline it
computes (:func:`mvserver.projects.service.project_timeline`) as an argument, so nothing here imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiohttp import web

from mvserver.analysis import PlanError, SongAnalysis, locate, plan_scenes
from mvserver.appkeys import ARTEFACTS, SONGS
from mvserver.audio.service import saved_audio
from mvserver.audio.songs import preview, read_sidecar, song_analysis
from mvserver.core.errors import ApiError
from mvserver.media.song import PREVIEW_MIME_TYPE
from mvserver.projects.schemas import SnapMode
from mvserver.projects.store import Project, Song, SongWindow
from mvserver.scenes.service import SongBrief

log = logging.getLogger("mvserver.projects")

INLINE_AUDIO_MAX_BYTES = 16 * 2**20  # a Gemini request with inline data must stay under 20 MB in all
PREVIEW_WAIT_SECONDS = 60.0  # how long a scene request waits for a song's preview copy that is still being made


# The project's timeline: ``projects.project_timeline`` (entries with scene, trim_in, trim_out, song_start, seconds)
Timeline = Callable[[Project], Sequence[Any]]


async def load_analysis(app: web.Application, audio_id: str, *, wait: float) -> tuple[SongAnalysis | None, str | None]:
    """The song's analysis, started if it is due and waited for up to ``wait`` seconds; and, when there is none
    or it has no beat grid, why (for ``sizing_note``)."""
    sidecar = await read_sidecar(app[ARTEFACTS], audio_id)
    if sidecar is None:
        return None, "the song is gone"
    status, analysis, error = await song_analysis(app, audio_id, sidecar, wait=wait)
    if analysis is not None:
        return analysis, None if analysis.grid is not None else f"no beat grid: {analysis.no_grid_reason}"
    return None, {
        "off": "song analysis is off (MV_ANALYSIS_WORKERS=0)",
        "pending": f"the song's analysis was not ready within {wait:g} s",
        "failed": f"the song's analysis failed: {(error or {}).get('message')}",
    }.get(status, status)


def scenes_on_bars(
    analysis: SongAnalysis, song: Song, allowed: Iterable[int], fps: float, scenes_max: int
) -> list[tuple[int, float]]:
    """Scenes that cover the song from its offset on its bars, as (clip duration, kept seconds): each cut on a
    downbeat and each kept part a whole number of frames at ``fps`` (:func:`mvserver.analysis.plan_scenes`); 400
    when more than ``scenes_max`` scenes are needed."""
    try:
        windows = plan_scenes(analysis, song.duration, allowed, fps, offset=song.offset, scenes_max=scenes_max)
    except PlanError as exc:
        raise ApiError(
            400,
            "too_many_scenes",
            f"audio_id: the song needs {exc.needed} scenes from the offset, more than the limit of {scenes_max}",
            field="audio_id",
        ) from None
    return [(w.duration, round(w.frames / fps, 6)) for w in windows]


def place_scenes(entries: Iterable[Any], song: Song | None, analysis: SongAnalysis | None, fps: float) -> None:
    """Give each scene its ``window``: where its kept part plays in the song, its bars and section, and what its cut
    lands on (None without a song)."""
    for entry in entries:
        if song is None or entry.song_start is None:
            entry.scene.window = None
            continue
        start, end = entry.song_start, entry.song_start + entry.seconds
        where = locate(analysis, start, end, fps, song_length=song.duration)
        entry.scene.window = SongWindow(start=round(start, 6), end=round(end, 6), **where.model_dump())


def snap_trims(
    project: Project,
    snaps: list[tuple[str, SnapMode, str]],
    analysis: SongAnalysis | None,
    fps: float,
    min_seconds: float,
    timeline: Timeline,
) -> None:
    """Move the end (the cut) of each scene in ``snaps`` (scene id, mode, request field) to the nearest beat
    (``beat``) or bar line (``bar``) its clip can reach, by setting ``trim_out``; the kept part stays a whole
    number of frames at ``fps``. Scenes are done in display order, so a cut moved earlier shifts the later ones
    first. Without a song or a beat grid the trims stay as sent."""
    grid = analysis.grid if analysis is not None else None
    if not snaps or grid is None or project.song is None:
        return
    order = {scene.id: index for index, scene in enumerate(project.scenes)}
    for scene_id, mode, field in sorted((s for s in snaps if s[1] != "none"), key=lambda s: order.get(s[0], 0)):
        entry = next(e for e in timeline(project) if e.scene.id == scene_id)
        scene, start = entry.scene, entry.song_start
        length = next(
            (float(v.duration) for v in scene.versions if v.job_id == scene.chosen_job_id), float(scene.duration)
        )
        low, high = start + min_seconds, start + length - entry.trim_in
        points = grid.beats if mode == "beat" else grid.downbeats
        reachable = [p for p in points if low - 1e-6 <= p <= high + 1e-6]
        if not reachable:
            noun = "beat" if mode == "beat" else "bar line"
            raise ApiError(
                400,
                "invalid_field",
                f"{field}.snap: no {noun} of the song between {low:.3f} and {high:.3f} s, where this clip's cut can go",
                field=f"{field}.snap",
            )
        end = start + entry.seconds
        target = min(reachable, key=lambda p: abs(p - end))
        kept = round((target - start) * fps) / fps
        scene.trim_in = entry.trim_in
        scene.trim_out = round(min(length, entry.trim_in + kept), 6)


async def song_brief(
    app: web.Application, project: Project, analysis: SongAnalysis | None, entries: Sequence[Any], count: int
) -> SongBrief | None:
    """What the scene writer sends Gemini with the prompt for a project with a song: its small MP3 copy (inline;
    made at upload, or now for a song saved before copies existed) and its timeline: sections, and the window of
    the song each of the ``count`` scenes plays over."""
    song = project.song
    if song is None:
        return None
    audio = await _preview_bytes(app, song)
    return SongBrief(
        text=brief_text(song, analysis, entries, count),
        audio=audio,
        mime_type=PREVIEW_MIME_TYPE,
        audio_id=song.audio_id,
    )


async def _preview_bytes(app: web.Application, song: Song) -> bytes | None:
    store, key = app[ARTEFACTS], preview(song.audio_id)
    if await store.stat(key) is None:
        try:
            song_key, _ = await saved_audio(app, song.audio_id)
            made = app[SONGS].copies(song.audio_id, song_key, song.duration)
            await asyncio.wait_for(asyncio.shield(made), PREVIEW_WAIT_SECONDS)
        except (TimeoutError, ApiError) as exc:
            log.warning("song %s: no preview copy for Gemini: %s", song.audio_id, exc)
            return None
    try:
        data = await store.get_bytes(key)
    except OSError:
        return None
    if len(data) > INLINE_AUDIO_MAX_BYTES:
        log.warning(
            "song %s: its preview (%d bytes) is too large to send inline; Gemini gets the timeline only",
            song.audio_id,
            len(data),
        )
        return None
    return data


def brief_text(song: Song, analysis: SongAnalysis | None, entries: Sequence[Any], count: int) -> str:
    """The song's timeline as Gemini reads it (and the simulator parses it: one ``Scene N: a-b s`` line each)."""
    lines = [
        "The song of this music video is attached as audio. Write each scene for its window of the song "
        "listed below: fit what is sung and felt in that window (its mood, its lyrics, its energy), and let "
        "the scenes change where the song's sections change."
    ]
    if analysis is not None and analysis.grid is not None:
        grid = analysis.grid
        lines.append(
            f"Song: {song.duration:.1f} s, {grid.tempo:.1f} BPM, {grid.beats_per_bar} beats to the bar; "
            f"the video starts at {song.offset:.2f} s."
        )
    else:
        reason = analysis.no_grid_reason if analysis is not None else "not analysed"
        lines.append(
            f"Song: {song.duration:.1f} s, no steady beat found ({reason}); the video starts at {song.offset:.2f} s."
        )
    if analysis is not None and analysis.sections:
        lines.append("Sections (sections with the same letter sound alike):")
        lines += [f"- {s.label}: {s.start:.2f}-{s.end:.2f} s" for s in analysis.sections]
    lines.append("Scene windows:")
    for index, entry in enumerate(list(entries)[:count], 1):
        window = entry.scene.window
        if window is None:
            continue
        bars = (
            f", bars {max(window.first_bar, 0) + 1}-{window.end_bar}"
            if window.first_bar is not None and window.end_bar is not None and window.end_bar > 0
            else ""
        )
        section = f", section {window.section_label}" if window.section_label else ""
        lines.append(f"- Scene {index}: {window.start:.2f}-{window.end:.2f} s{bars}{section}")
    for index in range(len(list(entries)) + 1, count + 1):
        lines.append(f"- Scene {index}: after the windows above (a new scene)")
    return "\n".join(lines)
