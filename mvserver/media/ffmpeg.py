"""The ffmpeg toolkit: probing media files, running ffmpeg with progress and cancellation, and assembling clips.

Everything runs the static ffmpeg bundled with imageio-ffmpeg (there is no ffprobe) as an asyncio subprocess in its
own process group, so the event loop never blocks and a cancelled task leaves no ffmpeg behind. Every ffmpeg is
bounded (:class:`FfmpegLimits`): it dies with the process that started it (``PR_SET_PDEATHSIG``, also on kill -9),
its private memory is capped (``RLIMIT_DATA``, with 2 MiB thread stacks so the cap tracks what it really uses), its
threads are capped (``-threads`` on every input and the output, ``-filter_threads``, ``-filter_complex_threads``),
and a run with an output length gets a time limit that grows with it. No HTTP, no jobs: the assembly job, lip sync
and the audio upload build on these functions.

Assembly with cuts stream-copies the video of every clip that is used whole and whose codec parameters match the
output (concat demuxer); only trimmed, rescaled or mismatching clips are re-encoded, each into its own segment.
Crossfades re-encode everything, piece by piece (:func:`crossfade_pieces`): a clip's middle alone, each join
with ``xfade`` from the two clips it joins, so one ffmpeg decodes two clips at a time however many there are; the
pieces are then joined like cuts and the audio crossfaded (``acrossfade``). The audio track (the song, clip
audio, or silence) is AAC, so the output is H.264 + AAC in an MP4 with ``+faststart``: encoded in the final run, or,
for a cut-only edit of the song alone with the song's AAC copy made at upload (:func:`encode_song_copies`), copied
from that copy packet by packet with only the faded last second encoded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import imageio_ffmpeg

from mvserver.core.storage import temp_path

__all__ = [
    "assemble",
    "AssemblyInputError",
    "AssemblyResult",
    "AUDIO_DEMUXERS",
    "AudioStream",
    "check_graph_clips",
    "Clip",
    "crossfade_frames",
    "crossfade_pieces",
    "DEFAULT_LIMITS",
    "duration_arg",
    "DurationError",
    "encode_song_copies",
    "ffmpeg_exe",
    "FfmpegLimits",
    "graph_clips",
    "input_args",
    "kept_frames",
    "MediaError",
    "MediaInfo",
    "MediaMemoryError",
    "MediaTimeout",
    "output_fps",
    "output_frames",
    "parse_inputs",
    "parse_probe",
    "Piece",
    "probe",
    "probe_clips",
    "run_ffmpeg",
    "run_lock",
    "song_demuxer",
    "SONG_DEMUXERS",
    "song_input_args",
    "SongCopy",
    "stream_duration",
    "VideoStream",
]

ProgressCallback = Callable[[float], None]
Transition = Literal["cut", "crossfade"]
ClipAudio = Literal["drop", "keep", "mix"]
Fit = Literal["letterbox", "crop"]

PROBE_TIMEOUT = 30.0
PROBE_OUTPUT_LIMIT = 1 << 20  # bytes of ffmpeg's description kept; a file with endless metadata cannot grow memory
STDERR_TAIL = 4000
SONG_FADE_SECONDS = 1.0
MIX_CLIP_VOLUME = 0.3  # clip audio "mixed under the song" sits about 10 dB below it
AUDIO_RATE = 48000
AUDIO_BITRATE = "192k"
AAC_FRAME_SECONDS = 1024 / AUDIO_RATE  # one AAC packet: the copied song is cut on these
PREVIEW_ARGS = ["-c:a", "libmp3lame", "-b:a", "32k", "-ar", "22050", "-ac", "1", "-f", "mp3"]  # what Gemini hears
PREVIEW_MIME_TYPE = "audio/mp3"
ASPECT_TOLERANCE = 0.01
TRIM_TOLERANCE = 0.05  # seconds a trim may pass a clip's measured end (container rounding)
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20"]
# Demuxers an uploaded song may be read with: each reads only the file it is given. Concat (ffconcat), HLS, DASH,
# image sequences and the like open other files or URLs named inside the upload, so they are never allowed.
AUDIO_DEMUXERS = ("mp3", "wav", "mov", "aac", "ogg", "flac")
# The demuxer of a saved song, by the suffix it was saved under (the format was identified at upload).
SONG_DEMUXERS = {".mp3": "mp3", ".wav": "wav", ".m4a": "mov", ".aac": "aac", ".ogg": "ogg", ".flac": "flac"}


class MediaError(Exception):
    """ffmpeg could not read or write a file; the message carries the end of ffmpeg's own words."""


class MediaTimeout(MediaError):
    """ffmpeg ran longer than allowed and was killed."""


class DurationError(MediaError, ValueError):
    """A duration for ffmpeg that is not above 0 once formatted (ffmpeg would read it as "no limit")."""


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


class MediaMemoryError(MediaError):
    """ffmpeg failed for want of memory under its ``RLIMIT_DATA`` (:attr:`FfmpegLimits.memory_mb`)."""


THREAD_STACK_BYTES = 2 << 20  # glibc sizes thread stacks by RLIMIT_STACK: 2 MiB each instead of 8 MiB
PR_SET_PDEATHSIG = 1
LOCK_POLL_SECONDS = 0.25
# What ffmpeg (and x264 inside it) print when an allocation or a thread's stack could not be had.
_OUT_OF_MEMORY = re.compile(
    r"Cannot allocate memory|get_buffer\(\) failed|malloc of size \d+ failed|"
    r"Resource temporarily unavailable|[Oo]ut of memory"
)


@dataclass(frozen=True)
class FfmpegLimits:
    """What one ffmpeg may use (the settings under ``ffmpeg`` in ``settings/media.yaml``).

    ``memory_mb`` caps its private writable memory (``RLIMIT_DATA``: heap, buffers and thread stacks; the mapped
    binary is not counted), ``threads`` the threads of each decoder, filter graph and encoder; ``None`` leaves
    either unbounded. A run that knows its output length may last ``timeout_base_seconds`` +
    ``timeout_seconds_per_output_second`` x that length (``timeout_base_seconds`` None: no time limit).
    """

    memory_mb: int | None = 1024
    threads: int | None = 2
    timeout_base_seconds: float | None = None
    timeout_seconds_per_output_second: float = 0.0

    def timeout(self, output_seconds: float | None) -> float | None:
        """The time limit of a run writing ``output_seconds`` of media (None: none)."""
        if self.timeout_base_seconds is None or output_seconds is None:
            return None
        return self.timeout_base_seconds + self.timeout_seconds_per_output_second * max(0.0, output_seconds)

    def describe_timeout(self, output_seconds: float) -> str:
        return (
            f"{self.timeout_base_seconds:g} s + {self.timeout_seconds_per_output_second:g} s per second of "
            f"output x {output_seconds:g} s"
        )


DEFAULT_LIMITS = FfmpegLimits()  # probes and runs that are given no limits of their own


class AssemblyInputError(MediaError, ValueError):
    """The assembly request does not fit the clips (bad trim, aspect ratio, offset...); ``field`` names the input."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The bundled static ffmpeg (``IMAGEIO_FFMPEG_EXE`` overrides it)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


# -- probing -------------------------------------------------------------------------------------------------------


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


@lru_cache(maxsize=1)
def _prctl() -> Callable[..., int]:
    """libc's prctl, looked up in the parent: the child between fork and exec should do as little as it can."""
    return ctypes.CDLL(None, use_errno=True).prctl


def _child_setup(parent: int, memory_mb: int | None, prctl: Callable[..., int]) -> Callable[[], None]:
    """What the child does between fork and exec: die with ``parent`` (SIGKILL when it exits, also on kill -9) and
    take its memory limits. The signal follows the *thread* that forked, which is the event loop's."""

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: never run as an orphan
            os._exit(1)
        if memory_mb is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_STACK)
            stack = THREAD_STACK_BYTES if hard == resource.RLIM_INFINITY else min(THREAD_STACK_BYTES, hard)
            resource.setrlimit(resource.RLIMIT_STACK, (stack, hard))
            resource.setrlimit(resource.RLIMIT_DATA, (memory_mb << 20, memory_mb << 20))

    return setup


# What the child does before it becomes ffmpeg, when util-linux's ``setpriv`` is there: the same as
# :func:`_child_setup`, but in programs exec'd after a ``vfork``. A ``preexec_fn`` makes Python ``fork`` instead,
# which copies this whole process's page tables: ~5 ms of the server's CPU per ffmpeg (two per stored clip),
# against ~0.15 ms. ``setpriv`` sets the parent-death signal; the shell then checks the parent is still the server
# (else it died before that: never run as an orphan), takes the memory limits and execs ffmpeg, keeping its pid.
_LAUNCH = (
    '[ "$PPID" = "$1" ] || exit 1; '
    '[ -z "$2" ] || { ulimit -d "$2" && ulimit -S -s "$3"; } || exit 1; '
    'shift 3; exec "$@"'
)


@lru_cache(maxsize=1)
def _launch_tools() -> tuple[str, str] | None:
    """``setpriv`` and ``/bin/sh``, or None when either is missing (then a ``preexec_fn`` does their work)."""
    setpriv, shell = shutil.which("setpriv"), shutil.which("sh")
    return (setpriv, shell) if setpriv and shell else None


def _launcher(parent: int, memory_mb: int | None) -> list[str]:
    """The command line that sets up the child before ``ffmpeg ...`` (empty without the tools)."""
    tools = _launch_tools()
    if tools is None:
        return []
    data_kb = stack_kb = ""
    if memory_mb is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_STACK)  # inherited as it is: the child's hard limit
        stack = THREAD_STACK_BYTES if hard == resource.RLIM_INFINITY else min(THREAD_STACK_BYTES, hard)
        data_kb, stack_kb = str(memory_mb << 10), str(stack >> 10)
    setpriv, shell = tools
    return [setpriv, "--pdeathsig", "KILL", "--", shell, "-c", _LAUNCH, "ffmpeg-launch", str(parent), data_kb, stack_kb]


async def _spawn(
    args: Sequence[str],
    stdout: int = subprocess.DEVNULL,
    limits: FfmpegLimits = DEFAULT_LIMITS,
    hold: Sequence[int] = (),
) -> asyncio.subprocess.Process:
    """Start ffmpeg in its own process group (``killpg`` then reaches anything it starts), bound to this process's
    life and to ``limits``; ``hold``: file descriptors it inherits (a run lock, see :func:`run_lock`)."""
    parent = os.getpid()
    launcher = _launcher(parent, limits.memory_mb)
    return await asyncio.create_subprocess_exec(
        *launcher,
        ffmpeg_exe(),
        "-nostdin",
        "-hide_banner",
        *args,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=None if launcher else _child_setup(parent, limits.memory_mb, _prctl()),
        pass_fds=tuple(hold),
    )


def _bounded(args: Sequence[str], threads: int | None) -> list[str]:
    """``args`` with every thread pool capped: ``-threads`` before each input and before the output (the last
    argument), and the filter graphs' own thread counts."""
    if threads is None:
        return list(args)
    count = str(threads)
    bounded = ["-filter_threads", count, "-filter_complex_threads", count]
    for arg in args[:-1]:
        if arg == "-i":
            bounded += ["-threads", count]
        bounded.append(arg)
    return [*bounded, "-threads", count, *args[-1:]]


@contextlib.asynccontextmanager
async def run_lock(path: Path, on_wait: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block, and yield its descriptor.

    Pass it to :func:`run_ffmpeg` / :func:`assemble` as ``hold``: each ffmpeg inherits it, and a ``flock`` lives as
    long as any process holds the open file, so the lock stays taken while an ffmpeg of the run is alive, even one
    whose server was killed. Whoever takes the lock next (another run of the same job, on this or another process
    of the machine) waits until then, polling every 0.25 s; ``on_wait`` is awaited once if it has to wait.
    """
    fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait is not None:
                    await on_wait()
                waited = True
                await asyncio.sleep(LOCK_POLL_SECONDS)
        yield fd
    finally:
        os.close(fd)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill ffmpeg's whole process group and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


async def _read_limited(stream: asyncio.StreamReader, limit: int, tail: bool = False) -> str:
    """Read a pipe to its end, keeping at most ``limit`` bytes (the first ones, or the last ones with ``tail``)."""
    kept = bytearray()
    while chunk := await stream.read(1 << 16):
        kept += chunk
        if len(kept) > limit:
            kept = kept[-limit:] if tail else kept[:limit]
            if not tail:
                while await stream.read(1 << 16):  # drain so ffmpeg never blocks on a full pipe
                    pass
                break
    return kept.decode(errors="replace")


async def probe(path: Path, *, timeout: float = PROBE_TIMEOUT, demuxers: Sequence[str] | None = None) -> MediaInfo:
    """Describe a media file from its header (``ffmpeg -i``): container, duration, streams and codec parameters.

    ``demuxers``: read it as a client-supplied file (:func:`input_args`); anything else fails like an unreadable file.
    """
    proc = await _spawn(["-i", str(path)] if demuxers is None else input_args(path, demuxers))
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(timeout):
            text = await _read_limited(proc.stderr, PROBE_OUTPUT_LIMIT)
            await proc.wait()
    except TimeoutError:
        raise MediaTimeout(f"probing {path.name} took longer than {timeout:g} s") from None
    finally:
        await _kill(proc)
    return parse_probe(text)


async def probe_clips(paths: Sequence[Path], *, timeout: float = PROBE_TIMEOUT) -> list[tuple[MediaInfo, int]]:
    """Describe several video files with ONE ffmpeg run: each file's header and its video frame count.

    The frames are counted by demuxing (``-c copy`` into ``framecrc``), so this costs one process start and no
    decoding however many clips there are. Raises MediaError if any file is unreadable or has no video stream.
    """
    inputs = [arg for path in paths for arg in ("-i", str(path))]
    maps = [arg for n in range(len(paths)) for arg in ("-map", f"{n}:v:0")]
    proc = await _spawn([*inputs, *maps, "-c", "copy", "-f", "framecrc", "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(timeout):
            counted, text = await asyncio.gather(
                _count_packets(proc.stdout), _read_limited(proc.stderr, PROBE_OUTPUT_LIMIT)
            )
            await proc.wait()
    except TimeoutError:
        raise MediaTimeout(f"probing {len(paths)} files took longer than {timeout:g} s") from None
    finally:
        await _kill(proc)
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


# -- running ffmpeg ------------------------------------------------------------------------------------------------


async def run_ffmpeg(
    args: Sequence[str],
    *,
    duration: float | None = None,
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
    on_field: Callable[[str, str], None] | None = None,
    limits: FfmpegLimits = DEFAULT_LIMITS,
    hold: Sequence[int] = (),
) -> None:
    """Run ``ffmpeg ARGS`` with ``-progress pipe:1 -nostats``; report 0..1 to ``progress`` as it goes.

    The fraction is ``out_time_us / duration`` (clamped) and 1.0 on ``progress=end``. ffmpeg runs within ``limits``
    (memory, threads; the last argument must be the output); the time limit is ``timeout``, or else the limits'
    time for ``duration`` seconds of output. When the calling task is cancelled or the time limit passes, ffmpeg's
    whole process group is killed before this returns (MediaTimeout on a timeout). A non-zero exit raises
    MediaError with the end of ffmpeg's error output (MediaMemoryError when it ran out of memory).
    """
    if timeout is None:
        timeout = limits.timeout(duration)
    proc = await _spawn(
        _bounded(["-loglevel", "error", "-progress", "pipe:1", "-nostats", *args], limits.threads),
        stdout=subprocess.PIPE,
        limits=limits,
        hold=hold,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(_read_limited(proc.stderr, STDERR_TAIL, tail=True))
    last = -1.0
    try:
        async with asyncio.timeout(timeout):
            async for raw in proc.stdout:
                key, _, value = raw.decode(errors="replace").strip().partition("=")
                if on_field is not None:
                    on_field(key, value)
                if progress is None:
                    continue
                fraction = None
                if key == "progress" and value == "end":
                    fraction = 1.0
                elif key == "out_time_us" and duration and value.lstrip("-").isdigit():
                    fraction = min(max(int(value) / 1e6 / duration, 0.0), 0.999)
                if fraction is not None and fraction > last:
                    last = fraction
                    progress(fraction)
            await proc.wait()
    except TimeoutError:
        assert timeout is not None
        raise MediaTimeout(f"ffmpeg ran longer than its limit of {timeout:g} s and was stopped") from None
    finally:
        await _kill(proc)
        stderr = await errors
    if proc.returncode != 0:
        text = stderr.strip() or "(no output)"
        if limits.memory_mb is not None and _OUT_OF_MEMORY.search(stderr):
            raise MediaMemoryError(f"ffmpeg ran out of memory under its limit of {limits.memory_mb} MiB: {text}")
        raise MediaError(f"ffmpeg exited with status {proc.returncode}: {text}")


# -- a saved song's copies ------------------------------------------------------------------------------------------


async def encode_song_copies(
    song: Path,
    aac: Path,
    preview: Path,
    *,
    duration: float | None = None,
    timeout: float | None = None,
    limits: FfmpegLimits = DEFAULT_LIMITS,
) -> None:
    """Encode a saved song once, in one ffmpeg run (one decode, two encoders) within ``limits``: ``aac``, AAC-LC at
    the assembly's rate, channels and bitrate in an MP4, whose packets a cut-only assembly copies; and ``preview``, a
    small mono MP3 (32 kb/s: 240 KB a minute) that goes inline to Gemini with the scene request. Both are written
    atomically (a temporary ``.part`` first); on failure or cancellation neither exists."""
    temps = [_temp(aac, "enc"), _temp(preview, "enc")]
    threads = ["-threads", str(limits.threads)] if limits.threads is not None else []  # run_ffmpeg caps the last output
    try:
        await run_ffmpeg(
            [
                *song_input_args(song),
                "-map",
                "0:a:0",
                "-vn",
                "-sn",
                "-dn",
                "-map_metadata",
                "-1",
                "-c:a",
                "aac",
                "-b:a",
                AUDIO_BITRATE,
                "-ar",
                str(AUDIO_RATE),
                "-ac",
                "2",
                *threads,
                "-f",
                "mp4",
                "-y",
                str(temps[0]),
                "-map",
                "0:a:0",
                "-vn",
                "-sn",
                "-dn",
                "-map_metadata",
                "-1",
                *PREVIEW_ARGS,
                "-y",
                str(temps[1]),
            ],
            duration=duration,
            timeout=timeout,
            limits=limits,
        )
        await asyncio.to_thread(_fsync_replace, temps[0], aac)
        await asyncio.to_thread(_fsync_replace, temps[1], preview)
    except BaseException:
        aac.unlink(missing_ok=True)
        preview.unlink(missing_ok=True)
        raise
    finally:
        for path in temps:
            path.unlink(missing_ok=True)


# -- assembly ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SongCopy:
    """A song's AAC copy (:func:`encode_song_copies`) and the song's decoded length in seconds."""

    path: Path
    duration: float


@dataclass(frozen=True)
class Clip:
    """One clip of the edit: a file and the part of it to use (seconds; ``trim_out`` None means to the end)."""

    path: Path
    trim_in: float = 0.0
    trim_out: float | None = None


@dataclass
class AssemblyResult:
    path: Path
    duration: float  # the expected length: clip lengths after trims, minus crossfade overlaps
    copied: list[int] = field(default_factory=list)  # indices of clips whose video was stream-copied
    reencoded: list[int] = field(default_factory=list)  # indices of clips that were decoded and encoded again
    elapsed_seconds: float = 0.0
    # "copied": the song's AAC packets were copied (only the faded end encoded); "encoded": the audio was encoded
    audio: Literal["copied", "encoded"] = "encoded"


@dataclass
class _Source:
    index: int
    clip: Clip
    info: MediaInfo
    video: VideoStream
    length: float  # measured video length of the whole file
    start: float  # trim in, snapped to a frame
    frames: int  # frames used after trims

    @property
    def duration(self) -> float:
        return self.frames / (self.video.fps or 24.0)

    @property
    def trimmed(self) -> bool:
        return self.start > 0 or self.frames < round(self.length * (self.video.fps or 24.0))


def _temp(out: Path, tag: str) -> Path:
    """A temporary file next to the output, named by :func:`storage.temp_path` (the clean-up knows its node)."""
    return temp_path(out, tag)


async def _load_sources(clips: Sequence[Clip]) -> list[_Source]:
    try:
        described = await probe_clips([clip.path for clip in clips])
    except MediaTimeout:
        raise
    except MediaError:
        described = None
    if described is None or any(info.first_video is None or frames < 1 for info, frames in described):
        for index, clip in enumerate(clips):  # find the clip to blame, one at a time
            name = f"clips[{index}]"
            try:
                info = await probe(clip.path)
            except MediaError as exc:
                raise AssemblyInputError(name, f"{name} is not a readable video: {exc}") from None
            if info.first_video is None:
                raise AssemblyInputError(name, f"{name} has no video stream")
        raise MediaError("ffmpeg could not read the clips together")
    first = described[0][0].first_video
    assert first is not None
    out_fps = output_fps(first)
    return [
        _source(i, clip, info, frames, out_fps)
        for i, (clip, (info, frames)) in enumerate(zip(clips, described, strict=False))
    ]


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


def _source(index: int, clip: Clip, info: MediaInfo, frame_count: int, out_fps: float) -> _Source:
    """Check a clip's trims against its measured length; snap them to whole frames."""
    name = f"clips[{index}]"
    video = info.first_video
    assert video is not None
    fps = video.fps or 24.0
    try:
        first, frames = kept_frames(clip.trim_in, clip.trim_out, frame_count, fps, out_fps)
    except AssemblyInputError as exc:
        raise AssemblyInputError(f"{name}.{exc.field}", f"{name}.{exc}") from None
    return _Source(index, clip, info, video, frame_count / fps, first / fps, frames)


def _fit_filter(source: VideoStream, width: int, height: int, fit: Fit | None) -> str:
    """Scale a clip to the output size; letterbox or crop when its aspect ratio differs."""
    if (source.width, source.height, source.sar) == (width, height, (1, 1)):
        return "setsar=1"
    if abs(source.aspect - width / height) <= ASPECT_TOLERANCE or fit is None:
        return f"scale={width}:{height},setsar=1"
    if fit == "letterbox":
        return (
            f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2,setsar=1"
        )
    return f"scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height},setsar=1"


def _check_aspects(sources: list[_Source], fit: Fit | None) -> None:
    target = sources[0].video.aspect
    for source in sources[1:]:
        if fit is None and abs(source.video.aspect - target) > ASPECT_TOLERANCE:
            v = source.video
            raise AssemblyInputError(
                f"clips[{source.index}]",
                f"clips[{source.index}] is {v.width}x{v.height}, a different aspect ratio from clips[0] "
                f"({sources[0].video.width}x{sources[0].video.height}); pass fit letterbox or crop",
            )


def _audio_graph(
    sources: list[_Source],
    first_input: int,
    song_input: int | None,
    total: float,
    clip_audio: ClipAudio,
    crossfade: float | None,
) -> str:
    """The filter graph that ends in ``[aout]``: song, clip audio or silence, at 48 kHz stereo, ``total`` long."""
    fmt = f"aresample={AUDIO_RATE},aformat=sample_fmts=fltp:sample_rates={AUDIO_RATE}:channel_layouts=stereo"
    parts: list[str] = []
    tracks: list[str] = []
    if clip_audio != "drop":
        labels = []
        for n, source in enumerate(sources):
            d = source.duration
            if source.info.first_audio is not None:
                parts.append(
                    f"[{first_input + n}:a:0]{fmt},atrim=start={source.start:.6f},asetpts=PTS-STARTPTS,"
                    f"apad,atrim=end={duration_arg(d)}[ca{n}]"
                )
            else:
                parts.append(
                    f"anullsrc=r={AUDIO_RATE}:cl=stereo,aformat=sample_fmts=fltp,atrim=end={duration_arg(d)}[ca{n}]"
                )
            labels.append(f"[ca{n}]")
        if crossfade:
            current = labels[0]
            for n, label in enumerate(labels[1:], 1):
                parts.append(f"{current}{label}acrossfade=d={duration_arg(crossfade)}[cx{n}]")
                current = f"[cx{n}]"
            parts.append(f"{current}anull[clipmix]")
        else:
            parts.append(f"{''.join(labels)}concat=n={len(labels)}:v=0:a=1[clipmix]")
        volume = MIX_CLIP_VOLUME if clip_audio == "mix" and song_input is not None else 1.0
        parts.append(f"[clipmix]volume={volume}[clips]")
        tracks.append("[clips]")
    if song_input is not None:
        fade = min(SONG_FADE_SECONDS, total / 4)
        parts.append(
            f"[{song_input}:a:0]{fmt},apad,atrim=end={duration_arg(total)},"
            f"afade=t=out:st={total - fade:.6f}:d={duration_arg(fade)}[song]"
        )
        tracks.insert(0, "[song]")
    if not tracks:
        parts.append(f"anullsrc=r={AUDIO_RATE}:cl=stereo,atrim=end={duration_arg(total)}[aout]")
    elif len(tracks) == 1:
        parts.append(f"{tracks[0]}anull[aout]")
    else:
        parts.append(f"{''.join(tracks)}amix=inputs=2:duration=first:normalize=0,atrim=end={duration_arg(total)}[aout]")
    return ";".join(parts)


def _audio_inputs(sources: list[_Source], clip_audio: ClipAudio) -> list[str]:
    return [arg for s in sources for arg in ("-i", str(s.clip.path))] if clip_audio != "drop" else []


def _song_inputs(song: Path | None, offset: float) -> list[str]:
    return ["-ss", f"{offset:.6f}", *song_input_args(song)] if song is not None else []


OUTPUT_ARGS = ["-c:a", "aac", "-b:a", AUDIO_BITRATE, "-movflags", "+faststart", "-f", "mp4"]


@dataclass(frozen=True)
class _Runner:
    """How every ffmpeg of one assembly runs: its limits and the descriptors it inherits (the job's run lock)."""

    limits: FfmpegLimits = DEFAULT_LIMITS
    hold: tuple[int, ...] = ()

    async def __call__(self, args: Sequence[str], *, duration: float, progress: ProgressCallback | None) -> None:
        await run_ffmpeg(args, duration=duration, progress=progress, limits=self.limits, hold=self.hold)


def _target(first: VideoStream) -> VideoStream:
    """The output's video parameters: the first clip's when they can be copied, else H.264 yuv420p of its size."""
    if first.codec == "h264" and first.pix_fmt == "yuv420p" and first.fps and first.sar == (1, 1):
        return first
    return VideoStream(
        0, "h264", "High", first.width, first.height, "yuv420p", first.fps or 24.0, first.time_base or "1/12288"
    )


def _segment_output(target: VideoStream, frames: int, dest: Path) -> list[str]:
    """Output arguments of a video-only segment the concat demuxer can join to others made alike."""
    fps = target.fps or 24.0
    args = ["-an", "-sn", "-dn", "-frames:v", str(frames), *X264, "-pix_fmt", target.pix_fmt, "-r", f"{fps:g}"]
    if target.timescale:
        args += ["-video_track_timescale", str(target.timescale)]
    return [*args, "-f", "mp4", "-y", str(dest)]


async def _encode_segment(
    source: _Source, dest: Path, target: VideoStream, fit: Fit | None, progress: ProgressCallback | None, run: _Runner
) -> None:
    """Re-encode one clip's used part into a video-only segment the concat demuxer can join to copied clips."""
    fps = target.fps or 24.0
    vf = f"{_fit_filter(source.video, target.width, target.height, fit)},fps={fps:g},format={target.pix_fmt}"
    args = [
        "-ss",
        f"{source.start:.6f}",
        "-i",
        str(source.clip.path),
        "-map",
        "0:v:0",
        "-vf",
        vf,
        *_segment_output(target, source.frames, dest),
    ]
    await run(args, duration=source.duration, progress=progress)


def _quoted(path: Path) -> str:
    """A path as an ffconcat ``file`` line takes it (single-quoted, quotes escaped)."""
    return "'" + str(path).replace("'", "'\\''") + "'"


def _concat_list(entries: list[tuple[Path, float]]) -> str:
    return "ffconcat version 1.0\n" + "".join(f"file {_quoted(p)}\nduration {duration_arg(d)}\n" for p, d in entries)


class _Progress:
    """Maps the progress of each ffmpeg step onto one 0..1 fraction, weighted by the work each step does."""

    def __init__(self, callback: ProgressCallback | None, weights: list[float]):
        self.callback, self.weights = callback, weights
        self.total = sum(weights) or 1.0

    def step(self, n: int) -> ProgressCallback | None:
        if self.callback is None:
            return None
        before = sum(self.weights[:n])
        callback = self.callback
        return lambda f: callback(min(1.0, (before + f * self.weights[n]) / self.total))


async def _song_audio_list(
    song: SongCopy, offset: float, total: float, out: Path, temps: list[Path], run: _Runner
) -> Path | None:
    """An ffconcat list of the song's audio under a cut-only video: the AAC copy's packets from ``offset`` up to
    the fade (a packet boundary), then the rest, faded out (and padded with silence where the song ends first),
    decoded from the copy and encoded again. The copied part starts with the packet that holds ``offset`` (at most
    one 21 ms AAC frame early), and the encoded part begins with the encoder's one frame of priming: that is all
    the seam costs. None when the song ends before the fade (it is then encoded whole, padded)."""
    fade = min(SONG_FADE_SECONDS, total / 4)
    first = math.floor(offset / AAC_FRAME_SECONDS + 1e-9)
    split = max(first + 1, round((offset + total - fade) / AAC_FRAME_SECONDS)) * AAC_FRAME_SECONDS
    end = offset + total
    if split > song.duration:
        return None
    tail = _temp(out, "tail")
    temps.append(tail)
    if split < end - 1e-6:
        await run(
            [
                "-ss",
                f"{split:.6f}",
                *input_args(song.path, ["mov"]),
                "-t",
                duration_arg(end - split),
                "-map",
                "0:a:0",
                "-af",
                f"afade=t=out:st=0:d={duration_arg(end - split)},apad",
                "-c:a",
                "aac",
                "-b:a",
                AUDIO_BITRATE,
                "-ar",
                str(AUDIO_RATE),
                "-ac",
                "2",
                "-f",
                "mp4",
                "-y",
                str(tail),
            ],
            duration=end - split,
            progress=None,
        )
    listing = _temp(out, "audiolist")
    temps.append(listing)
    text = f"ffconcat version 1.0\nfile {_quoted(song.path)}\ninpoint {offset:.6f}\noutpoint {min(split, end):.6f}\n"
    if split < end - 1e-6:
        text += f"file {_quoted(tail)}\n"
    await asyncio.to_thread(listing.write_text, text)
    return listing


async def _final_run(
    sources: list[_Source],
    entries: list[tuple[Path, float]],
    tmp: Path,
    out: Path,
    song: Path | None,
    song_offset: float,
    clip_audio: ClipAudio,
    crossfade: float | None,
    total: float,
    progress: ProgressCallback | None,
    run: _Runner,
    temps: list[Path],
) -> None:
    """The video segments joined by the concat demuxer (copied) and the audio track encoded: the song, the clips'
    audio (cut to each clip's used part, joined by concat or acrossfade) or silence."""
    listing = _temp(out, "list")
    temps.append(listing)
    await asyncio.to_thread(listing.write_text, _concat_list(entries))
    song_input = 1 if song is not None else None
    first_clip_input = 2 if song is not None else 1
    graph = _audio_graph(sources, first_clip_input, song_input, total, clip_audio, crossfade)
    args = [
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(listing),
        *_song_inputs(song, song_offset),
        *_audio_inputs(sources, clip_audio),
        "-filter_complex",
        graph,
        "-map",
        "0:v:0",
        "-map",
        "[aout]",
        "-c:v",
        "copy",
        *OUTPUT_ARGS,
        "-t",
        duration_arg(total),
        "-y",
        str(tmp),
    ]
    await run(args, duration=total, progress=progress)


async def _assemble_cuts(
    sources: list[_Source],
    tmp: Path,
    out: Path,
    song: Path | None,
    song_offset: float,
    clip_audio: ClipAudio,
    fit: Fit | None,
    progress: ProgressCallback | None,
    result: AssemblyResult,
    temps: list[Path],
    run: _Runner,
    song_copy: SongCopy | None = None,
) -> None:
    # The output takes the first clip's parameters; clips that differ are encoded to match them.
    target = _target(sources[0].video)
    copyable = [not s.trimmed and s.video.copy_key() == target.copy_key() for s in sources]
    encode = [s for s, ok in zip(sources, copyable, strict=False) if not ok]
    total = sum(s.duration for s in sources)
    tracker = _Progress(progress, [4 * s.duration for s in encode] + [total])
    entries: list[tuple[Path, float]] = []
    segments: dict[int, Path] = {}
    for n, source in enumerate(encode):
        segments[source.index] = segment = _temp(out, f"seg{source.index}")
        temps.append(segment)
        await _encode_segment(source, segment, target, fit, tracker.step(n), run)
    for source, ok in zip(sources, copyable, strict=False):
        entries.append((source.clip.path if ok else segments[source.index], source.duration))
        (result.copied if ok else result.reencoded).append(source.index)
    audio_list = None
    if song_copy is not None and clip_audio == "drop":
        audio_list = await _song_audio_list(song_copy, song_offset, total, out, temps, run)
    if audio_list is None:
        await _final_run(
            sources,
            entries,
            tmp,
            out,
            song,
            song_offset,
            clip_audio,
            None,
            total,
            tracker.step(len(encode)),
            run,
            temps,
        )
        return
    listing = _temp(out, "list")
    temps.append(listing)
    await asyncio.to_thread(listing.write_text, _concat_list(entries))
    args = [
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(listing),
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(audio_list),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        "-c",
        "copy",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        "-t",
        duration_arg(total),
        "-y",
        str(tmp),
    ]
    await run(args, duration=total, progress=tracker.step(len(encode)))
    result.audio = "copied"


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


def _output_frames(source: _Source, fps: float) -> int:
    return output_frames(source.duration, fps)


async def _encode_piece(
    piece: Piece,
    sources: list[_Source],
    dest: Path,
    target: VideoStream,
    fit: Fit | None,
    fade: int,
    progress: ProgressCallback | None,
    run: _Runner,
) -> None:
    """One piece of a crossfade, video only: its clips trimmed at input, fitted, resampled to the output's frame rate
    and chained with ``xfade``."""
    fps = target.fps or 24.0
    inputs: list[str] = []
    chains: list[str] = []
    for n, (k, begin, count) in enumerate(piece.parts):
        source = sources[k]
        inputs += [
            "-ss",
            f"{source.start + begin / fps:.6f}",
            "-t",
            duration_arg((count + 1) / fps),
            "-i",
            str(source.clip.path),
        ]
        chains.append(
            f"[{n}:v:0]{_fit_filter(source.video, target.width, target.height, fit)},fps={fps:g},"
            f"format={target.pix_fmt},trim=end_frame={count},setpts=PTS-STARTPTS,settb=AVTB[v{n}]"
        )
    current, length = "[v0]", piece.parts[0][2]
    for n, (_, _, count) in enumerate(piece.parts[1:], 1):
        chains.append(
            f"{current}[v{n}]xfade=transition=fade:duration={duration_arg(fade / fps)}:"
            f"offset={(length - fade) / fps:.6f}[x{n}]"
        )
        current, length = f"[x{n}]", length + count - fade
    chains.append(f"{current}null[vout]")
    args = [
        *inputs,
        "-filter_complex",
        ";".join(chains),
        "-map",
        "[vout]",
        *_segment_output(target, piece.frames, dest),
    ]
    await run(args, duration=piece.frames / fps, progress=progress)


async def _assemble_crossfade(
    sources: list[_Source],
    tmp: Path,
    out: Path,
    song: Path | None,
    song_offset: float,
    fade: int,
    clip_audio: ClipAudio,
    fit: Fit | None,
    progress: ProgressCallback | None,
    result: AssemblyResult,
    temps: list[Path],
    run: _Runner,
) -> float:
    """Crossfades piece by piece (:func:`crossfade_pieces`), each piece encoded on its own; the pieces are joined by
    the concat demuxer (copied) in the final run, which also encodes the audio with ``acrossfade`` joins."""
    first = _target(sources[0].video)
    fps = output_fps(sources[0].video)
    target = VideoStream(0, "h264", "High", first.width, first.height, "yuv420p", fps, first.time_base or "1/12288")
    frames = [_output_frames(s, fps) for s in sources]
    pieces = crossfade_pieces(frames, fade)
    total_frames = sum(frames) - (len(frames) - 1) * fade
    length = total_frames / fps
    tracker = _Progress(progress, [4 * piece.frames / fps for piece in pieces] + [length])
    entries: list[tuple[Path, float]] = []
    for n, piece in enumerate(pieces):
        segment = _temp(out, f"piece{n}")
        temps.append(segment)
        await _encode_piece(piece, sources, segment, target, fit, fade, tracker.step(n), run)
        entries.append((segment, piece.frames / fps))
    await _final_run(
        sources,
        entries,
        tmp,
        out,
        song,
        song_offset,
        clip_audio,
        fade / fps,
        length,
        tracker.step(len(pieces)),
        run,
        temps,
    )
    result.reencoded.extend(s.index for s in sources)
    return length


async def assemble(
    clips: Sequence[Clip],
    out: Path,
    *,
    song: Path | None = None,
    song_offset: float = 0.0,
    transition: Transition = "cut",
    crossfade_seconds: float = 0.5,
    clip_audio: ClipAudio = "drop",
    fit: Fit | None = None,
    progress: ProgressCallback | None = None,
    limits: FfmpegLimits = DEFAULT_LIMITS,
    hold: Sequence[int] = (),
    graph_clips_max: int | None = None,
    song_copy: SongCopy | None = None,
) -> AssemblyResult:
    """Join ``clips`` into one H.264 + AAC MP4 at ``out`` (written atomically); return what was done.

    ``song_copy``: the song's AAC copy. A cut-only edit with the song alone (``clip_audio`` drop) that the song
    covers then copies its packets instead of encoding the song (``result.audio`` says which was done).

    Every ffmpeg runs within ``limits`` and inherits ``hold`` (see :func:`run_lock`); a crossfade whose pieces would
    decode more than ``graph_clips_max`` clips in one filter graph is refused. Raises AssemblyInputError (with
    ``field``) for input that does not fit the clips, MediaError when ffmpeg fails (MediaTimeout, MediaMemoryError).
    Cancelling the task kills ffmpeg and removes every temporary file.
    """
    started = time.monotonic()
    if not clips:
        raise AssemblyInputError("clips", "clips must hold at least one clip")
    if transition not in ("cut", "crossfade"):
        raise AssemblyInputError("transition", "transition must be cut or crossfade")
    if clip_audio not in ("drop", "keep", "mix"):
        raise AssemblyInputError("clip_audio", "clip_audio must be drop, keep or mix")
    if fit not in (None, "letterbox", "crop"):
        raise AssemblyInputError("fit", "fit must be null, letterbox or crop")
    if song is None and song_copy is not None:
        song = song_copy.path
    sources = await _load_sources(clips)
    _check_aspects(sources, fit)
    if song is not None and not (song_copy is not None and transition == "cut" and clip_audio == "drop"):
        await _check_song(song, song_offset)
    elif song_copy is not None and not 0 <= song_offset < song_copy.duration:
        raise AssemblyInputError("song_offset", f"song_offset must be in [0, {song_copy.duration:.3f}) seconds")
    result = AssemblyResult(path=out, duration=0.0)
    tmp = _temp(out, "out")
    temps = [tmp]
    run = _Runner(limits, tuple(hold))
    try:
        if transition == "crossfade" and len(sources) > 1:
            fps = output_fps(sources[0].video)
            fade = crossfade_frames(crossfade_seconds, fps)
            frames = [_output_frames(s, fps) for s in sources]
            if not fade < min(frames):
                raise AssemblyInputError(
                    "crossfade_seconds",
                    f"crossfade_seconds must be below the shortest clip ({min(frames) / fps:.3f} s)",
                )
            if graph_clips_max is not None:
                check_graph_clips(frames, fade, graph_clips_max)
            result.duration = await _assemble_crossfade(
                sources, tmp, out, song, song_offset, fade, clip_audio, fit, progress, result, temps, run
            )
        else:
            result.duration = sum(s.duration for s in sources)
            await _assemble_cuts(
                sources, tmp, out, song, song_offset, clip_audio, fit, progress, result, temps, run, song_copy
            )
        await asyncio.to_thread(_fsync_replace, tmp, out)
    finally:
        for path in temps:
            path.unlink(missing_ok=True)
    result.elapsed_seconds = round(time.monotonic() - started, 3)
    return result


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


async def _check_song(song: Path, offset: float) -> None:
    try:
        info = await probe(song, demuxers=[song_demuxer(song)])
    except MediaError as exc:
        raise AssemblyInputError("song", f"song is not a readable audio file: {exc}") from None
    if info.first_audio is None:
        raise AssemblyInputError("song", "song has no audio stream")
    if offset < 0 or (info.duration is not None and offset >= info.duration):
        raise AssemblyInputError("song_offset", f"song_offset must be in [0, {info.duration or 0:.3f}) seconds")


def _fsync_replace(tmp: Path, out: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out)
