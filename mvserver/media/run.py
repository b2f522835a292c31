"""The one way mvserver starts ffmpeg: :func:`run_ffmpeg` (and :func:`spawn_ffmpeg` under it, for probes).

Everything runs the static ffmpeg bundled with imageio-ffmpeg (there is no ffprobe) as an asyncio subprocess in its
own process group, so the event loop never blocks and a cancelled task leaves no ffmpeg behind; every run is bounded
by :mod:`mvserver.media.limits`. No HTTP, no jobs: the assembly job, lip sync, posters, the audio upload and the
sandbox renderer build on these functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import lru_cache
from pathlib import Path

import imageio_ffmpeg

from mvserver.media.errors import MediaError, MediaMemoryError, MediaTimeout
from mvserver.media.limits import DEFAULT_LIMITS, FfmpegLimits, bounded_args, child_setup, launcher, libc_prctl

ProgressCallback = Callable[[float], None]


STDERR_TAIL = 4000


LOCK_POLL_SECONDS = 0.25


# What ffmpeg (and x264 inside it) print when an allocation or a thread's stack could not be had.
_OUT_OF_MEMORY = re.compile(
    r"Cannot allocate memory|get_buffer\(\) failed|malloc of size \d+ failed|"
    r"Resource temporarily unavailable|[Oo]ut of memory"
)


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The bundled static ffmpeg (``IMAGEIO_FFMPEG_EXE`` overrides it)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


async def spawn_ffmpeg(
    args: Sequence[str],
    stdout: int = subprocess.DEVNULL,
    limits: FfmpegLimits = DEFAULT_LIMITS,
    hold: Sequence[int] = (),
    stdin: int = subprocess.DEVNULL,
) -> asyncio.subprocess.Process:
    """Start ffmpeg in its own process group (``killpg`` then reaches anything it starts), bound to this process's
    life and to ``limits``; ``hold``: file descriptors it inherits (a run lock, see :func:`run_lock`)."""
    parent = os.getpid()
    setup = launcher(parent, limits.memory_mb)
    return await asyncio.create_subprocess_exec(
        *setup,
        ffmpeg_exe(),
        "-nostdin",
        "-hide_banner",
        *args,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=None if setup else child_setup(parent, limits.memory_mb, libc_prctl()),
        pass_fds=tuple(hold),
    )


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


async def kill_ffmpeg(proc: asyncio.subprocess.Process) -> None:
    """Kill ffmpeg's whole process group and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


async def read_limited(stream: asyncio.StreamReader, limit: int, tail: bool = False) -> str:
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


async def run_ffmpeg(
    args: Sequence[str],
    *,
    duration: float | None = None,
    progress: ProgressCallback | None = None,
    timeout: float | None = None,
    on_field: Callable[[str, str], None] | None = None,
    limits: FfmpegLimits = DEFAULT_LIMITS,
    hold: Sequence[int] = (),
    stdin: bytes | None = None,
) -> None:
    """Run ``ffmpeg ARGS`` with ``-progress pipe:1 -nostats``; report 0..1 to ``progress`` as it goes.

    The fraction is ``out_time_us / duration`` (clamped) and 1.0 on ``progress=end``. ffmpeg runs within ``limits``
    (memory, threads; the last argument must be the output); the time limit is ``timeout``, or else the limits'
    time for ``duration`` seconds of output. When the calling task is cancelled or the time limit passes, ffmpeg's
    whole process group is killed before this returns (MediaTimeout on a timeout). A non-zero exit raises
    MediaError with the end of ffmpeg's error output (MediaMemoryError when it ran out of memory). ``stdin``: bytes
    fed to ffmpeg's standard input (an input of ``pipe:0``), which is then closed.
    """
    if timeout is None:
        timeout = limits.timeout(duration)
    proc = await spawn_ffmpeg(
        bounded_args(["-loglevel", "error", "-progress", "pipe:1", "-nostats", *args], limits.threads),
        stdout=subprocess.PIPE,
        limits=limits,
        hold=hold,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(read_limited(proc.stderr, STDERR_TAIL, tail=True))
    feeding = asyncio.ensure_future(_feed(proc, stdin)) if stdin is not None else None
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
        await kill_ffmpeg(proc)
        if feeding is not None:
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
        stderr = await errors
    if proc.returncode != 0:
        text = stderr.strip() or "(no output)"
        if limits.memory_mb is not None and _OUT_OF_MEMORY.search(stderr):
            raise MediaMemoryError(f"ffmpeg ran out of memory under its limit of {limits.memory_mb} MiB: {text}")
        raise MediaError(f"ffmpeg exited with status {proc.returncode}: {text}")


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    """Write ``data`` to ffmpeg's standard input and close it; an ffmpeg that stopped reading (it failed, or has all
    it needs) just ends the writing, its exit status tells the rest."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()


TempName = Callable[[Path, str], Path]
"""How a caller names a temporary file next to an output: ``(output, tag) -> path`` (mvserver passes
:func:`mvserver.core.artefacts.temp_path`, so its clean-up knows which node writes each one). media spells no name of
its own: the naming rule, and what may be removed when, belong to whoever owns the directory."""


def fsync_replace(tmp: Path, out: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out)
