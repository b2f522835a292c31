"""The arithmetic of an edit, without ffmpeg: which frames of each clip are kept, the output's frame rate, and how
a crossfade is cut into pieces one ffmpeg each. The assembly request checks use it before a job is accepted, and
:func:`mvserver.media.assemble.assemble` when it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mvserver.media.errors import AssemblyInputError
from mvserver.media.probe import VideoStream

ASPECT_TOLERANCE = 0.01


TRIM_TOLERANCE = 0.05  # seconds a trim may pass a clip's measured end (container rounding)


def output_fps(first: VideoStream) -> float:
    """The output's frame rate: the first clip's (24 when ffmpeg does not say)."""
    return first.fps or 24.0


def kept_frames(
    trim_in: float | None, trim_out: float | None, frame_count: int, fps: float, out_fps: float
) -> tuple[int, int]:
    """The first frame and the number of frames a clip of ``frame_count`` frames at ``fps`` keeps after its trims
    (snapped to whole frames). At least one frame at the output's ``out_fps`` must be kept.

    Raises AssemblyInputError naming ``trim_in`` or ``trim_out`` (without the clip's prefix: callers add it).
    """
    length = frame_count / fps
    start = trim_in or 0.0
    end = length if trim_out is None else trim_out
    if start < 0 or start >= length:
        raise AssemblyInputError(
            "trim_in", f"trim_in: {start:g} s is not in [0, {length:.3f}) seconds, the clip's length"
        )
    if end > length + TRIM_TOLERANCE or end <= start:
        raise AssemblyInputError(
            "trim_out", f"trim_out: must be after trim_in ({start:g} s) and at most the clip's length ({length:.3f} s)"
        )
    first = round(start * fps)
    frames = min(round(end * fps), frame_count) - first
    if frames * out_fps < fps - 1e-9:  # less than one frame of the output
        name = "trim_out" if trim_out is not None else "trim_in"
        raise AssemblyInputError(
            name,
            f"{name}: the trims keep {max(frames, 0) / fps:.4f} s, less than one frame at "
            f"the output's {out_fps:g} fps ({1 / out_fps:.4f} s)",
        )
    return first, frames


def crossfade_frames(seconds: float, out_fps: float) -> int:
    """A crossfade in whole output frames; under one frame is refused (AssemblyInputError naming
    ``crossfade_seconds``): formatted for ffmpeg it would run as no crossfade at all."""
    if not seconds * out_fps >= 1 - 1e-9:
        raise AssemblyInputError(
            "crossfade_seconds",
            f"crossfade_seconds: {seconds:g} s is less than one frame at the "
            f"output's {out_fps:g} fps ({1 / out_fps:.4f} s); use "
            "transition cut for no crossfade",
        )
    return round(seconds * out_fps)


@dataclass(frozen=True)
class Piece:
    """A stretch of a crossfaded video, encoded by one ffmpeg run: one clip alone (a *body*), or a *blend*: the tail
    of a clip, every following clip too short to have a body of its own, and the head of the next clip, joined by
    ``xfade`` exactly as one long chain would join them. ``parts``: (clip, first frame used, frames used)."""

    parts: tuple[tuple[int, int, int], ...]
    frames: int  # output frames of the piece


def crossfade_pieces(frames: Sequence[int], fade: int) -> list[Piece]:
    """Cut a crossfade of clips of ``frames`` output frames each, ``fade`` frames per join, into pieces in playing
    order. Each piece decodes only the clips it shows, so one ffmpeg never holds more than its piece's clips,
    however many clips the video has; the pieces add up to ``sum(frames) - (len(frames) - 1) * fade`` frames."""
    count = len(frames)

    def body(k: int) -> Piece | None:
        begin = fade if k > 0 else 0
        end = frames[k] - fade if k < count - 1 else frames[k]
        return Piece(((k, begin, end - begin),), end - begin) if end > begin else None

    first = body(0)
    pieces = [first] if first is not None else []
    i = 0
    while i < count - 1:
        j = i + 1
        while j < count - 1 and body(j) is None:
            j += 1
        parts = ((i, frames[i] - fade, fade), *((k, 0, frames[k]) for k in range(i + 1, j)), (j, 0, fade))
        pieces.append(Piece(parts, fade + sum(frames[k] - fade for k in range(i + 1, j))))
        if (after := body(j)) is not None:
            pieces.append(after)
        i = j
    return pieces


def graph_clips(frames: Sequence[int], fade: int | None) -> int:
    """The most clips one ffmpeg filter graph of the assembly decodes at once (1 for cuts)."""
    if fade is None or len(frames) < 2:
        return 1
    return max(len(piece.parts) for piece in crossfade_pieces(frames, fade))


def output_frames(seconds: float, fps: float) -> int:
    """A clip's used part (``seconds``) in frames of the output's frame rate."""
    return round(seconds * fps)


def check_graph_clips(frames: Sequence[int], fade: int, limit: int) -> None:
    """Refuse (AssemblyInputError naming ``crossfade_seconds``) a crossfade one of whose pieces would decode more
    than ``limit`` clips at once: the clips in a row that are shorter than twice the crossfade."""
    clips = graph_clips(frames, fade)
    if clips > limit:
        raise AssemblyInputError(
            "crossfade_seconds",
            f"crossfade_seconds: {clips - 2} clips in a row are shorter than "
            f"twice the crossfade, so one ffmpeg would decode {clips} clips "
            f"at once; at most {limit} may be (shorten the crossfade or "
            "lengthen those clips)",
        )
