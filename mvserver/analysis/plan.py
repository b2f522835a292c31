"""Scenes on the grid: cut a song into scene windows on its bars, each a clip length Veo accepts. Pure: no I/O.

A window is a span of whole output frames. Its end is a cut: a downbeat where there is one, so every cut lands on a
bar line (within half a frame, from rounding to the frame grid). Its clip ``duration`` is the shortest allowed
length (4/6/8 s) that covers it, and the clip is trimmed to the window. The plan is the cheapest path through the
cut candidates, by dynamic programming over:

- the seconds of video paid for (the sum of clip durations) plus ``SCENE_COST`` per scene: at 123 BPM four bars
  (7.80 s, an 8 s clip) beat three (5.85 s, a 6 s clip), so phrases of whole bars come out;
- ``SECTION_COST`` for each section boundary a window straddles, so scenes change with the song's sections;
- a penalty when a cut is not on a downbeat, high enough that it is only taken when no plan on downbeats exists
  (a bar longer than the longest clip, a stretch without beats longer than it): on a beat (``BEAT_COST``), else on
  a whole second (``TIME_COST``). So a song whose tail after the last bar line is short ends with a short scene
  rather than a cut off the bar.

Without a grid (weak beat evidence) the plan is plain length sizing, as before analysis existed: the longest clip
everywhere, the last ones shortened as far as the song is still covered, the last window trimmed to the song.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, Field

from mvserver.analysis.model import SongAnalysis

SCENE_COST = 2.0
SECTION_COST = 5.0
BEAT_COST = 20.0
TIME_COST = 40.0
CutKind = Literal["downbeat", "beat", "time", "end"]
_KIND_COST = {"downbeat": 0.0, "end": 0.0, "beat": BEAT_COST, "time": TIME_COST}


class PlanError(ValueError):
    """The song needs more scenes than allowed; ``needed`` says how many."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


class SceneWindow(BaseModel):
    start: float = Field(description="song seconds where the window starts (offset + start_frame / fps)")
    end: float = Field(description="song seconds where it ends")
    start_frame: int = Field(ge=0, description="first output frame (frames counted from the plan's offset)")
    end_frame: int = Field(description="frame after the last one: the next window's start_frame")
    duration: int = Field(description="the clip length to generate (an allowed one); the clip is trimmed to the window")
    first_bar: int | None = Field(
        description="bar of the start (0: the first downbeat's bar, -1: before it); None without a grid"
    )
    end_bar: int | None = Field(description="bar index after the window's last bar (exclusive); None without a grid")
    section: int | None = Field(description="index in the analysis' sections of the window's start")
    section_label: str | None = None
    cut: CutKind = Field(description="what the window's end lands on")

    @property
    def frames(self) -> int:
        return self.end_frame - self.start_frame


def snap(t: float, analysis: SongAnalysis | None, mode: Literal["beat", "bar", "none"]) -> float:
    """``t`` moved to the nearest beat (``beat``) or downbeat (``bar``); unchanged for ``none`` or without a grid."""
    if mode == "none" or analysis is None or analysis.grid is None:
        return t
    points = analysis.grid.beats if mode == "beat" else analysis.grid.downbeats
    if not points:
        return t
    i = bisect.bisect_left(points, t)
    near = [points[j] for j in (i - 1, i) if 0 <= j < len(points)]
    return min(near, key=lambda p: abs(p - t))


def plan_scenes(
    analysis: SongAnalysis | None,
    song_length: float,
    allowed: Iterable[int] = (4, 6, 8),
    fps: float = 24.0,
    *,
    offset: float = 0.0,
    scenes_max: int | None = None,
    min_seconds: float = 1.0,
) -> list[SceneWindow]:
    """Scene windows covering the song from ``offset`` to ``song_length`` (seconds) at ``fps`` output frames a
    second. Raises :class:`PlanError` when more than ``scenes_max`` scenes are needed."""
    allowed = sorted(set(allowed))
    if not allowed or allowed[0] <= 0 or fps <= 0 or song_length <= offset:
        raise ValueError("need positive clip lengths, a positive frame rate and a song longer than the offset")
    total = max(1, math.ceil((song_length - offset) * fps - 1e-6))
    if analysis is None or analysis.grid is None or not analysis.grid.downbeats:
        frames = _plain(total, allowed, fps)
    else:
        frames = _on_grid(analysis, total, allowed, fps, offset, min_seconds)
    windows = [_window(analysis, a, b, kind, allowed, fps, offset) for a, b, kind in frames]
    if scenes_max is not None and len(windows) > scenes_max:
        raise PlanError(
            f"the song needs {len(windows)} scenes from the offset, more than the limit of {scenes_max}",
            needed=len(windows),
        )
    return windows


def _clip_for(frames: int, allowed: list[int], fps: float) -> int:
    return next((a for a in allowed if a * fps >= frames - 1e-6), allowed[-1])


def _plain(total: int, allowed: list[int], fps: float) -> list[tuple[int, int, CutKind]]:
    """Today's sizing in frames: fewest scenes of the longest clip, then the last ones shortened while the song is
    still covered; the last window ends at the song's end."""
    longest = allowed[-1]
    count = max(1, math.ceil(total / (longest * fps) - 1e-9))
    durations = [longest] * count
    covered = longest * count
    for index in reversed(range(count)):
        shortest = next(d for d in allowed if (covered - durations[index] + d) * fps >= total - 1e-6)
        covered += shortest - durations[index]
        durations[index] = shortest
    result: list[tuple[int, int, CutKind]] = []
    start = 0
    for index, seconds in enumerate(durations):
        end = total if index == count - 1 else min(total, start + round(seconds * fps))
        result.append((start, end, "end" if end == total else "time"))
        start = end
    return result


def _candidates(analysis: SongAnalysis, total: int, fps: float, offset: float) -> dict[int, CutKind]:
    """Frames where a cut may fall, each with its kind (a downbeat wins over a beat over a whole second)."""
    assert analysis.grid is not None
    cuts: dict[int, CutKind] = {}
    sources: tuple[tuple[CutKind, list[float]], ...] = (
        ("time", [float(s) + offset for s in range(1, math.ceil(total / fps))]),
        ("beat", analysis.grid.beats),
        ("downbeat", analysis.grid.downbeats),
    )
    for kind, times in sources:
        for t in times:
            frame = round((t - offset) * fps)
            if 0 < frame < total:
                cuts[frame] = kind
    return cuts


def _on_grid(
    analysis: SongAnalysis, total: int, allowed: list[int], fps: float, offset: float, min_seconds: float
) -> list[tuple[int, int, CutKind]]:
    cuts = _candidates(analysis, total, fps, offset)
    nodes = [0, *sorted(cuts), total]
    kinds: list[CutKind] = ["end", *(cuts[f] for f in nodes[1:-1]), "end"]
    boundaries = sorted({round((s.start - offset) * fps) for s in analysis.sections} - {0})
    longest = math.floor(allowed[-1] * fps + 1e-6)
    shortest = min(math.ceil(min_seconds * fps), total)
    best = [math.inf] * len(nodes)
    back = [-1] * len(nodes)
    best[0] = 0.0
    for j in range(1, len(nodes)):
        for i in range(j - 1, -1, -1):
            length = nodes[j] - nodes[i]
            if length > longest:
                break
            if length < shortest or best[i] == math.inf:
                continue
            crossed = bisect.bisect_left(boundaries, nodes[j]) - bisect.bisect_right(boundaries, nodes[i])
            cost = (
                best[i] + SCENE_COST + _clip_for(length, allowed, fps) + _KIND_COST[kinds[j]] + SECTION_COST * crossed
            )
            if cost < best[j]:
                best[j], back[j] = cost, i
    if best[-1] == math.inf:  # no cut sequence fits (cannot happen with a cut every second); size by length
        return _plain(total, allowed, fps)
    path = [len(nodes) - 1]
    while path[-1] != 0:
        path.append(back[path[-1]])
    path.reverse()
    return [(nodes[a], nodes[b], kinds[b]) for a, b in zip(path, path[1:], strict=False)]


class Placement(BaseModel):
    """Where a span of the song sits on its grid: its bars, its section, and what its end lands on."""

    first_bar: int | None
    end_bar: int | None
    section: int | None
    section_label: str | None
    cut: CutKind


def locate(
    analysis: SongAnalysis | None, start: float, end: float, fps: float = 24.0, song_length: float | None = None
) -> Placement:
    """The bars (``first_bar``, ``end_bar`` exclusive; None without a grid) and section (of its start) of the span
    ``start..end`` of the song, and what ``end`` lands on within one frame: a downbeat, a beat, the song's end
    (``song_length``), or a plain time."""
    section = label = first_bar = end_bar = None
    cut: CutKind = "time"
    if analysis is not None:
        starts = [s.start for s in analysis.sections]
        if starts:
            section = max(0, bisect.bisect_right(starts, start + 0.5 / fps) - 1)
            label = analysis.sections[section].label
        if analysis.grid is not None:
            first_bar = analysis.bar_of(start + 0.5 / fps)
            end_bar = analysis.bar_of(end - 0.5 / fps) + 1
            if _near(analysis.grid.downbeats, end, 1 / fps):
                cut = "downbeat"
            elif _near(analysis.grid.beats, end, 1 / fps):
                cut = "beat"
    if cut == "time" and song_length is not None and end >= song_length - 1 / fps:
        cut = "end"
    return Placement(first_bar=first_bar, end_bar=end_bar, section=section, section_label=label, cut=cut)


def _near(points: list[float], t: float, tolerance: float) -> bool:
    i = bisect.bisect_left(points, t)
    return any(abs(points[j] - t) <= tolerance + 1e-9 for j in (i - 1, i) if 0 <= j < len(points))


def _window(
    analysis: SongAnalysis | None,
    start_frame: int,
    end_frame: int,
    kind: CutKind,
    allowed: list[int],
    fps: float,
    offset: float,
) -> SceneWindow:
    start = offset + start_frame / fps
    end = offset + end_frame / fps
    where = locate(analysis, start, end, fps)
    return SceneWindow(
        start=round(start, 6),
        end=round(end, 6),
        start_frame=start_frame,
        end_frame=end_frame,
        duration=_clip_for(end_frame - start_frame, allowed, fps),
        first_bar=where.first_bar,
        end_bar=where.end_bar,
        section=where.section,
        section_label=where.section_label,
        cut=kind,
    )
