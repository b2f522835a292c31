"""A saved song's copies: its AAC copy (whose packets a cut-only assembly copies) and the small MP3 preview Gemini
hears, both encoded once, at upload (:func:`encode_song_copies`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from mvserver.media.args import song_input_args
from mvserver.media.limits import DEFAULT_LIMITS, FfmpegLimits
from mvserver.media.run import TempName, fsync_replace, run_ffmpeg

AUDIO_RATE = 48000


AUDIO_BITRATE = "192k"


AAC_FRAME_SECONDS = 1024 / AUDIO_RATE  # one AAC packet: the copied song is cut on these


# The song's AAC copy and the faded tail an assembly encodes after its copied packets: the same codec, bitrate, rate
# and channels, so the two join without re-encoding the copy.
AAC_ARGS = ["-c:a", "aac", "-b:a", AUDIO_BITRATE, "-ar", str(AUDIO_RATE), "-ac", "2"]


AUDIO_ONLY = ["-map", "0:a:0", "-vn", "-sn", "-dn", "-map_metadata", "-1"]  # the song's sound, nothing else


PREVIEW_ARGS = ["-c:a", "libmp3lame", "-b:a", "32k", "-ar", "22050", "-ac", "1", "-f", "mp3"]  # what Gemini hears


PREVIEW_MIME_TYPE = "audio/mp3"


async def encode_song_copies(
    song: Path,
    aac: Path,
    preview: Path,
    *,
    temp_name: TempName,
    duration: float | None = None,
    timeout: float | None = None,
    limits: FfmpegLimits = DEFAULT_LIMITS,
) -> None:
    """Encode a saved song once, in one ffmpeg run (one decode, two encoders) within ``limits``: ``aac``, AAC-LC at
    the assembly's rate, channels and bitrate in an MP4, whose packets a cut-only assembly copies; and ``preview``, a
    small mono MP3 (32 kb/s: 240 KB a minute) that goes inline to Gemini with the scene request. Both are written
    atomically (a temporary named by ``temp_name`` first); on failure or cancellation neither exists."""
    temps = [temp_name(aac, "enc"), temp_name(preview, "enc")]
    threads = ["-threads", str(limits.threads)] if limits.threads is not None else []  # run_ffmpeg caps the last output
    try:
        await run_ffmpeg(
            [
                *song_input_args(song),
                *AUDIO_ONLY,
                *AAC_ARGS,
                *threads,
                "-f",
                "mp4",
                "-y",
                str(temps[0]),
                *AUDIO_ONLY,
                *PREVIEW_ARGS,
                "-y",
                str(temps[1]),
            ],
            duration=duration,
            timeout=timeout,
            limits=limits,
        )
        await asyncio.to_thread(fsync_replace, temps[0], aac)
        await asyncio.to_thread(fsync_replace, temps[1], preview)
    except BaseException:
        aac.unlink(missing_ok=True)
        preview.unlink(missing_ok=True)
        raise
    finally:
        for path in temps:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SongCopy:
    """A song's AAC copy (:func:`encode_song_copies`) and the song's decoded length in seconds."""

    path: Path
    duration: float
