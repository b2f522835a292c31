"""What goes wrong in media: every exception the package raises, for callers to map to their own errors."""

from __future__ import annotations


class MediaError(Exception):
    """ffmpeg could not read or write a file; the message carries the end of ffmpeg's own words."""


class MediaTimeout(MediaError):
    """ffmpeg ran longer than allowed and was killed."""


class DurationError(MediaError, ValueError):
    """A duration for ffmpeg that is not above 0 once formatted (ffmpeg would read it as "no limit")."""


class MediaMemoryError(MediaError):
    """ffmpeg failed for want of memory under its ``RLIMIT_DATA`` (:attr:`FfmpegLimits.memory_mb`)."""


class AssemblyInputError(MediaError, ValueError):
    """The assembly request does not fit the clips (bad trim, aspect ratio, offset...); ``field`` names the input."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
