"""What one ffmpeg may use (:class:`FfmpegLimits`) and how a run is held to it.

Every ffmpeg dies with the process that started it (``PR_SET_PDEATHSIG``, also on kill -9), its private memory is
capped (``RLIMIT_DATA``, with 2 MiB thread stacks so the cap tracks what it really uses), its threads are capped
(``-threads`` on every input and the output, ``-filter_threads``, ``-filter_complex_threads``), and a run with an
output length gets a time limit that grows with it.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

THREAD_STACK_BYTES = 2 << 20  # glibc sizes thread stacks by RLIMIT_STACK: 2 MiB each instead of 8 MiB


PR_SET_PDEATHSIG = 1


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


@lru_cache(maxsize=1)
def libc_prctl() -> Callable[..., int]:
    """libc's prctl, looked up in the parent: the child between fork and exec should do as little as it can."""
    return ctypes.CDLL(None, use_errno=True).prctl


def child_setup(parent: int, memory_mb: int | None, prctl: Callable[..., int]) -> Callable[[], None]:
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
# :func:`child_setup`, but in programs exec'd after a ``vfork``. A ``preexec_fn`` makes Python ``fork`` instead,
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


def launcher(parent: int, memory_mb: int | None) -> list[str]:
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


def bounded_args(args: Sequence[str], threads: int | None) -> list[str]:
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
