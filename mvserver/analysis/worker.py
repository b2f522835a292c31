"""The analysis worker: ``python -m mvserver.analysis.worker``, one process that analyses songs one at a time.

librosa, numba and scipy are imported here only, never in the server process (they cost ~150 MB and seconds to
import). At start the worker caps its address space (``--memory-mb``, so a runaway allocation fails inside the
worker instead of swapping the machine), imports librosa and runs a short analysis of a synthetic click track so
numba compiles (or loads from ``NUMBA_CACHE_DIR``) every kernel before the first real song; then it writes a
``{"ready": ...}`` line. After that each line on stdin is a request ``{"path": ..., "max_seconds": ...}`` and the
answer is one JSON line on stdout: ``{"ok": true, "analysis": {...}}`` or
``{"ok": false, "error": ...}``, both with the song's CPU seconds (the worker's and its ffmpeg's), the peak RSS
while it ran and the RSS after it. Anything else the libraries print goes to stderr (stdout is reserved for answers).
The server kills the whole process group when an answer is late, so nothing here handles timeouts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, TextIO

import numpy as np


class DecodeError(Exception):
    pass


def decode(path: str, max_seconds: float, sr: int) -> np.ndarray:
    """The first ``max_seconds`` of ``path`` as mono float32 at ``sr`` Hz, decoded by the bundled ffmpeg (any format
    the upload accepts). Read straight into one array sized for the cap (untouched pages cost nothing), so memory
    is bounded by the cap whatever the file claims, and no second copy is made."""
    import imageio_ffmpeg

    args = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-v",
        "error",
        "-i",
        path,
        "-map",
        "0:a:0",
        "-t",
        f"{max_seconds:.3f}",
        "-ac",
        "1",
        "-ar",
        str(sr),
        "-f",
        "f32le",
        "pipe:1",
    ]
    samples = np.empty(int(max_seconds * sr) + sr, dtype=np.float32)
    view = memoryview(samples).cast("B")  # type: ignore[arg-type]  # numpy declares __buffer__ from Python 3.12 on
    filled = 0
    with (
        tempfile.TemporaryFile() as errors,
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors) as proc,
    ):
        assert isinstance(proc.stdout, io.BufferedReader)  # typed as IO[bytes], which has no readinto
        while filled < len(view):
            count = proc.stdout.readinto(view[filled : filled + (1 << 20)])
            if not count:
                break
            filled += count
        full = filled == len(view)
        if full:  # more than the cap (cannot happen with -t, but never block on a pipe nobody reads)
            proc.kill()
        proc.stdout.close()
        code = proc.wait()
        errors.seek(0)
        message = errors.read(1 << 16).decode(errors="replace").strip().splitlines()
    if code != 0 and not full:
        raise DecodeError(f"ffmpeg could not decode the audio: {message[-1] if message else code}")
    if filled < 4:
        raise DecodeError("the file has no audio samples")
    samples = samples[: filled // 4]
    return np.nan_to_num(samples, copy=False)


def analyse_file(path: str, max_seconds: float) -> dict[str, Any]:
    from mvserver.analysis import core

    samples = decode(path, max_seconds, core.SR)
    result = core.analyse(samples)
    result["truncated"] = len(samples) >= int(max_seconds * core.SR) - core.HOP
    return result


def _warm_up() -> None:
    """Analyse 12 s of clicks at 120 BPM with a chord change per bar, so every numba kernel is compiled now."""
    from mvserver.analysis import core

    t = np.arange(int(12 * core.SR)) / core.SR
    y = 0.1 * np.sin(2 * np.pi * np.where((t // 2) % 2 == 0, 220.0, 262.0) * t)
    clicks = (t % 0.5) < 0.01
    y[clicks] += 0.5
    core.analyse(y.astype(np.float32))


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # ffmpeg's decode
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _status_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process in MB. Not ``getrusage``'s ``ru_maxrss``: Linux carries it
    over ``exec``, so a worker started by a large server would report the server's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start a new peak RSS for the next song (Linux: writing 5 to clear_refs resets VmHWM to VmRSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _answer(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message, separators=(",", ":")) + "\n")
    out.flush()


def serve(out: TextIO) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        started = _cpu()
        _reset_peak()
        try:
            request = json.loads(line)
            analysis = analyse_file(str(request["path"]), float(request["max_seconds"]))
            message = {"ok": True, "analysis": analysis}
        except DecodeError as exc:
            message = {"ok": False, "error": str(exc), "kind": "decode"}
        except MemoryError:
            message = {"ok": False, "error": "the analysis ran out of memory", "kind": "memory"}
        except Exception as exc:
            message = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "internal"}
        message.update(
            cpu_seconds=round(_cpu() - started, 4),
            peak_rss_mb=round(_status_mb("VmHWM"), 1),
            rss_mb=round(_status_mb("VmRSS"), 1),
        )
        _answer(out, message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mb", type=int, default=0, help="address-space cap (RLIMIT_AS); 0: none")
    args = parser.parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints from libraries go to stderr
    sys.stdout = sys.stderr
    if args.memory_mb:
        limit = args.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    cpu = _cpu()
    _warm_up()
    import librosa

    _answer(
        out,
        {
            "ready": True,
            "pid": os.getpid(),
            "librosa": librosa.__version__,  # type: ignore[attr-defined]  # librosa's .pyi omits it
            "start_seconds": round(time.monotonic() - started, 3),
            "start_cpu_seconds": round(_cpu() - cpu, 3),
            "peak_rss_mb": round(_status_mb("VmHWM"), 1),
            "rss_mb": round(_status_mb("VmRSS"), 1),
        },
    )
    serve(out)


if __name__ == "__main__":
    main()
