"""ffmpeg arguments that must be spelled one way: durations ffmpeg would read as "no limit", and inputs a client
supplied (read from the local file only, with an allow-listed demuxer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mvserver.media.errors import DurationError, MediaError

# Demuxers an uploaded song may be read with: each reads only the file it is given. Concat (ffconcat), HLS, DASH,
# image sequences and the like open other files or URLs named inside the upload, so they are never allowed.
AUDIO_DEMUXERS = ("mp3", "wav", "mov", "aac", "ogg", "flac")


# The demuxer of a saved song, by the suffix it was saved under (the format was identified at upload).
SONG_DEMUXERS = {".mp3": "mp3", ".wav": "wav", ".m4a": "mov", ".aac": "aac", ".ogg": "ogg", ".flac": "flac"}


def duration_arg(seconds: float) -> str:
    """``seconds`` formatted for an ffmpeg option or filter that takes a duration (``-t``, ``atrim=duration``, ...).

    ffmpeg reads a duration of 0 as "no limit" (``atrim=duration=0.000000`` keeps the whole input), so a value
    that rounds to 0, or is negative, NaN or infinite, raises DurationError instead of being formatted.
    """
    text = f"{seconds:.6f}"
    if not math.isfinite(seconds) or float(text) <= 0:
        raise DurationError(f"a duration of {seconds!r} s is not above 0 at ffmpeg's precision")
    return text


def input_args(path: Path, demuxers: Sequence[str]) -> list[str]:
    """``-i path`` for a file a client supplied: read from the local file only (no other protocol, so nothing named
    inside it is fetched) and with one of ``demuxers`` (exactly that one when there is one)."""
    if not demuxers or any(d not in AUDIO_DEMUXERS for d in demuxers):
        raise MediaError(f"demuxers {list(demuxers)} are not all in the allow-list {list(AUDIO_DEMUXERS)}")
    forced = ["-f", demuxers[0]] if len(demuxers) == 1 else []
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(demuxers), *forced, "-i", str(path)]


def song_demuxer(song: Path) -> str:
    """The demuxer of a saved song, from the suffix its identified format gave it (MediaError for another one)."""
    demuxer = SONG_DEMUXERS.get(song.suffix)
    if demuxer is None:
        raise MediaError(f"{song.name} is not a saved song (unknown suffix)")
    return demuxer


def song_input_args(song: Path) -> list[str]:
    """:func:`input_args` for a saved song, with the demuxer of the format it was saved as."""
    return input_args(song, [song_demuxer(song)])
