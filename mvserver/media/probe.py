"""Describing media files: what ``ffmpeg -i`` prints about them (:func:`probe`, :func:`probe_clips`), parsed, and
stream lengths counted while reading (:func:`stream_duration`).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mvserver.media.args import duration_arg, input_args
from mvserver.media.errors import MediaError, MediaTimeout
from mvserver.media.limits import DEFAULT_LIMITS, FfmpegLimits, bounded_args
from mvserver.media.run import STDERR_TAIL, kill_ffmpeg, read_limited, run_ffmpeg, spawn_ffmpeg

PROBE_TIMEOUT = 30.0


PROBE_OUTPUT_LIMIT = 1 << 20  # bytes of ffmpeg's description kept; a file with endless metadata cannot grow memory


@dataclass(frozen=True)
class VideoStream:
    index: int
    codec: str
    profile: str | None
    width: int
    height: int
    pix_fmt: str
    fps: float | None
    time_base: str | None  # "1/12288": the container's timescale (``tbn``)
    sar: tuple[int, int] = (1, 1)
    attached_pic: bool = False  # cover art in an audio file, not a video

    @property
    def aspect(self) -> float:
        """Display aspect ratio (width/height after the sample aspect ratio)."""
        return self.width * self.sar[0] / (self.height * self.sar[1])

    @property
    def timescale(self) -> int | None:
        return int(self.time_base.split("/")[1]) if self.time_base else None

    def copy_key(self) -> tuple[object, ...]:
        """Streams with equal keys can be joined by the concat demuxer without re-encoding."""
        return (self.codec, self.profile, self.width, self.height, self.pix_fmt, self.fps, self.time_base, self.sar)


@dataclass(frozen=True)
class AudioStream:
    index: int
    codec: str
    sample_rate: int
    channels: int
    layout: str
    sample_fmt: str | None


@dataclass(frozen=True)
class MediaInfo:
    container: str  # ffmpeg's demuxer name, e.g. "mp3" or "mov,mp4,m4a,3gp,3g2,mj2"
    duration: float | None  # container duration from the header (None when ffmpeg does not know it)
    start: float
    video: tuple[VideoStream, ...] = ()
    audio: tuple[AudioStream, ...] = ()
    other_streams: int = 0  # subtitle, data and attachment streams

    @property
    def first_video(self) -> VideoStream | None:
        return next((v for v in self.video if not v.attached_pic), None)

    @property
    def first_audio(self) -> AudioStream | None:
        return self.audio[0] if self.audio else None


_INPUT = re.compile(r"^Input #(?P<input>\d+), (?P<container>[\w,]+), from ", re.M)


_OUTPUT = re.compile(r"^Output #\d+, ", re.M)


_DURATION = re.compile(
    r"^  Duration: (?:(?P<h>\d+):(?P<m>\d+):(?P<s>\d+(?:\.\d+)?)|N/A)(?:, start: (?P<start>-?\d+(?:\.\d+)?))?", re.M
)


# A stream line starts at a fixed indent; metadata values (which a file controls) are printed after "key : ".
_STREAM = re.compile(
    r"^  Stream #\d+:(?P<index>\d+)(?:\[0x[0-9a-f]+\])?(?:\([^)]*\))?: (?P<kind>Video|Audio|Subtitle|Data|Attachment): (?P<rest>.*)$",
    re.M,
)


_VIDEO = re.compile(
    r"^(?P<codec>\w+)(?: \((?P<profile>[^)]*)\))?[^,]*, (?P<pix>\w+)(?:\([^)]*\))?, (?P<w>\d+)x(?P<h>\d+)"
    r"(?: \[SAR (?P<sn>\d+):(?P<sd>\d+) DAR \d+:\d+\])?"
)


_FPS = re.compile(r", (?P<fps>\d+(?:\.\d+)?)(?P<k>k?) fps")


_TBN = re.compile(r", (?P<tbn>\d+(?:\.\d+)?)(?P<k>k?) tbn")


_AUDIO = re.compile(r"^(?P<codec>\w+)[^,]*, (?P<rate>\d+) Hz, (?P<layout>[^,]+)(?:, (?P<fmt>\w+))?")


_NAMED_LAYOUTS = {
    "mono": 1,
    "stereo": 2,
    "downmix": 2,
    "binaural": 2,
    "quad": 4,
    "hexagonal": 6,
    "octagonal": 8,
    "cube": 8,
    "hexadecagonal": 16,
}


def _channels(layout: str) -> int | None:
    """Channel count from ffmpeg's layout name: "stereo", "5.1(side)", "7.1.4", "12 channels"."""
    name = layout.split("(")[0].strip()
    if name in _NAMED_LAYOUTS:
        return _NAMED_LAYOUTS[name]
    if match := re.fullmatch(r"(\d+) channels", name):
        return int(match[1])
    if re.fullmatch(r"\d+(?:\.\d+){1,2}", name):
        return sum(int(part) for part in name.split("."))
    return None


def _number(match: re.Match[str] | None, group: str) -> float | None:
    if match is None:
        return None
    value = float(match[group]) * (1000 if match["k"] else 1)
    return round(value, 3)


def parse_inputs(text: str) -> dict[int, MediaInfo]:
    """Parse what ``ffmpeg -i A -i B ...`` prints about each input (output sections are left out), by input number."""
    if (output := _OUTPUT.search(text)) is not None:
        text = text[: output.start()]
    headers = list(_INPUT.finditer(text))
    ends = [h.start() for h in headers[1:]] + [len(text)]
    return {int(h["input"]): parse_probe(text[h.start() : end]) for h, end in zip(headers, ends, strict=False)}


def parse_probe(text: str) -> MediaInfo:
    """Parse what ``ffmpeg -i FILE`` prints about its (first) input; raise MediaError if it names no readable input."""
    if (output := _OUTPUT.search(text)) is not None:
        text = text[: output.start()]
    headers = list(_INPUT.finditer(text))
    if not headers:
        raise MediaError(f"not a readable media file: {text.strip()[-STDERR_TAIL:] or '(no output)'}")
    header = headers[0]
    text = text[header.start() : headers[1].start() if len(headers) > 1 else len(text)]
    duration = start = None
    if (dur := _DURATION.search(text)) is not None:
        if dur["h"] is not None:
            duration = int(dur["h"]) * 3600 + int(dur["m"]) * 60 + float(dur["s"])
        start = float(dur["start"]) if dur["start"] else None
    video: list[VideoStream] = []
    audio: list[AudioStream] = []
    other = 0
    for stream in _STREAM.finditer(text):
        index, kind, rest = int(stream["index"]), stream["kind"], stream["rest"]
        if kind == "Video" and (v := _VIDEO.match(rest)):
            tbn = _number(_TBN.search(rest), "tbn")
            video.append(
                VideoStream(
                    index=index,
                    codec=v["codec"],
                    profile=v["profile"],
                    width=int(v["w"]),
                    height=int(v["h"]),
                    pix_fmt=v["pix"],
                    fps=_number(_FPS.search(rest), "fps"),
                    time_base=f"1/{int(tbn)}" if tbn else None,
                    sar=(int(v["sn"]), int(v["sd"])) if v["sn"] and int(v["sn"]) and int(v["sd"]) else (1, 1),
                    attached_pic="(attached pic)" in rest,
                )
            )
        elif kind == "Audio" and (a := _AUDIO.match(rest)):
            channels = _channels(a["layout"])
            if channels is None:
                raise MediaError(f"unknown channel layout {a['layout']!r} in stream {index}")
            audio.append(
                AudioStream(
                    index=index,
                    codec=a["codec"],
                    sample_rate=int(a["rate"]),
                    channels=channels,
                    layout=a["layout"].strip(),
                    sample_fmt=a["fmt"],
                )
            )
        else:
            other += 1
    return MediaInfo(
        container=header["container"],
        duration=duration,
        start=start or 0.0,
        video=tuple(video),
        audio=tuple(audio),
        other_streams=other,
    )


async def probe(path: Path, *, timeout: float = PROBE_TIMEOUT, demuxers: Sequence[str] | None = None) -> MediaInfo:
    """Describe a media file from its header (``ffmpeg -i``): container, duration, streams and codec parameters.

    ``demuxers``: read it as a client-supplied file (:func:`input_args`); anything else fails like an unreadable file.
    """
    args = ["-i", str(path)] if demuxers is None else input_args(path, demuxers)
    text, _ = await _header_run(args, DEFAULT_LIMITS, timeout, f"probing {path.name}")
    return parse_probe(text)


async def _header_run(args: Sequence[str], limits: FfmpegLimits, timeout: float, what: str) -> tuple[str, int]:
    """Run ffmpeg with ``args`` and read its description of the input from stderr (bounded): the text and the exit
    status; MediaTimeout past ``timeout``, the process killed either way."""
    proc = await spawn_ffmpeg(args, limits=limits)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(timeout):
            text = await read_limited(proc.stderr, PROBE_OUTPUT_LIMIT)
            await proc.wait()
    except TimeoutError:
        raise MediaTimeout(f"{what} took longer than {timeout:g} s") from None
    finally:
        await kill_ffmpeg(proc)
    assert proc.returncode is not None
    return text, proc.returncode


async def probe_and_write(
    path: Path,
    output: Sequence[str],
    *,
    timeout: float = PROBE_TIMEOUT,
    demuxers: Sequence[str] | None = None,
    limits: FfmpegLimits = DEFAULT_LIMITS,
) -> tuple[MediaInfo, str | None]:
    """:func:`probe` a file and, in the same ffmpeg run, write an output from it: one process start instead of two.

    ``output``: the output's arguments (maps, filters, codec), its destination last. ffmpeg prints the input's
    description before it opens the output, so what :func:`probe` reports is read from the same run, whether or not
    the output could be written (a file without the mapped stream is still described). Returns the description
    and, when ffmpeg failed to write the output, the end of its error output (None when it wrote it). Raises as
    :func:`probe` does: MediaError for an unreadable file, MediaTimeout past ``timeout`` (for the whole run); the
    output runs within ``limits``.
    """
    source = ["-i", str(path)] if demuxers is None else input_args(path, demuxers)
    args = ["-nostats", *bounded_args([*source, *output], limits.threads)]
    text, status = await _header_run(args, limits, timeout, f"reading {path.name}")
    info = parse_probe(text)
    failure = None if status == 0 else text.strip()[-STDERR_TAIL:] or f"ffmpeg exited with {status}"
    return info, failure


async def probe_clips(paths: Sequence[Path], *, timeout: float = PROBE_TIMEOUT) -> list[tuple[MediaInfo, int]]:
    """Describe several video files with ONE ffmpeg run: each file's header and its video frame count.

    The frames are counted by demuxing (``-c copy`` into ``framecrc``), so this costs one process start and no
    decoding however many clips there are. Raises MediaError if any file is unreadable or has no video stream.
    """
    inputs = [arg for path in paths for arg in ("-i", str(path))]
    maps = [arg for n in range(len(paths)) for arg in ("-map", f"{n}:v:0")]
    proc = await spawn_ffmpeg([*inputs, *maps, "-c", "copy", "-f", "framecrc", "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(timeout):
            counted, text = await asyncio.gather(
                _count_packets(proc.stdout), read_limited(proc.stderr, PROBE_OUTPUT_LIMIT)
            )
            await proc.wait()
    except TimeoutError:
        raise MediaTimeout(f"probing {len(paths)} files took longer than {timeout:g} s") from None
    finally:
        await kill_ffmpeg(proc)
    if proc.returncode != 0:
        raise MediaError(f"ffmpeg could not read every file: {text.strip()[-STDERR_TAIL:]}")
    infos = parse_inputs(text)
    return [(infos[n], counted.get(n, 0)) for n in range(len(paths))]


async def _count_packets(stream: asyncio.StreamReader) -> dict[int, int]:
    """Packets per output stream in ``framecrc`` lines (``stream_index, dts, pts, duration, size, crc``)."""
    counts: dict[int, int] = {}
    async for raw in stream:
        if raw[:1].isdigit():
            index = int(raw.split(b",", 1)[0])
            counts[index] = counts.get(index, 0) + 1
    return counts


async def stream_duration(
    path: Path,
    stream: str = "v:0",
    *,
    decode: bool = False,
    fps: float | None = None,
    timeout: float = PROBE_TIMEOUT,
    demuxers: Sequence[str] | None = None,
    limit: float | None = None,
) -> float:
    """The length of one stream in seconds, from what ffmpeg counts while reading it (``-progress``), not the header.

    ``decode=False`` only demuxes (milliseconds); ``decode=True`` decodes the stream, which also proves it is
    readable to the end. For a video stream with a known ``fps`` the length is frames / fps. ``demuxers`` as for
    :func:`probe`; ``limit`` stops reading after that many seconds (the result is then at most about ``limit``).
    """
    args = ["-i", str(path)] if demuxers is None else input_args(path, demuxers)
    args += ["-map", f"0:{stream}"]
    if not decode:
        args += ["-c", "copy"]
    if limit is not None:
        args += ["-t", duration_arg(limit)]
    values: dict[str, str] = {}

    def seen(key: str, value: str) -> None:
        values[key] = value

    await run_ffmpeg([*args, "-f", "null", "-"], on_field=seen, timeout=timeout)
    try:
        out_time = int(values["out_time_us"]) / 1e6
        frames = int(values.get("frame", "0"))
    except (KeyError, ValueError):
        raise MediaError(f"ffmpeg reported no length for stream {stream} of {path.name}") from None
    if stream.startswith("v") and fps and frames:
        return frames / fps
    return out_time
