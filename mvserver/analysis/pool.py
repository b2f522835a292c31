"""Song analysis off the event loop: a small pool of worker processes (``mvserver.analysis.worker``) with a time
limit per song and a memory ceiling.

Why processes and not threads: librosa holds the GIL for much of its work and imports ~150 MB of numba, scipy and
scikit-learn that the server never needs. Why long-lived workers and not one process per song: a fresh process
spends ~3 s of CPU importing librosa and loading numba's compiled kernels (16 s without a cache), more than the
analysis of a 3-minute song (~0.6 s). A worker is started on first use and warms up before it takes a song; its
start has its own limit (``start_timeout``), so ``timeout`` is the analysis alone.

Limits: a song whose answer is not back within ``timeout`` has its worker's whole process group (the worker and
its ffmpeg) killed with SIGKILL and gets :class:`AnalysisTimeout`; the next song starts a fresh worker. Each worker
runs under an address-space cap (``memory_mb``), decodes at most ``max_seconds`` of audio, and is retired after a
song that left its RSS above ``recycle_rss_mb`` or after ``jobs_per_worker`` songs (the allocator keeps freed
memory). A cancelled caller kills the worker too (it would be busy with an abandoned song).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mvserver.analysis.model import SongAnalysis

log = logging.getLogger(__name__)

ANSWER_LIMIT = 64 * 2**20  # the longest answer line: a 20-minute song's peaks and beats are well under 1 MB


class AnalysisError(Exception):
    """The song could not be analysed (undecodable, a crashed worker, an internal error)."""

    def __init__(self, message: str, kind: str = "internal"):
        super().__init__(message)
        self.kind = kind


class AnalysisTimeout(AnalysisError):
    def __init__(self, message: str):
        super().__init__(message, kind="timeout")


def numba_cache_dir() -> str:
    """``NUMBA_CACHE_DIR`` if set, else a per-user directory under the system temporary directory: numba's default
    (``__pycache__`` next to librosa) is not writable in a read-only install, and without a cache every worker
    compiles for ~16 s instead of loading in ~3 s."""
    return os.environ.get("NUMBA_CACHE_DIR") or str(Path(tempfile.gettempdir()) / f"mvserver-numba-{os.getuid()}")


@dataclass
class PoolStats:
    started: int = 0
    analysed: int = 0
    killed: int = 0
    retired: int = 0
    last_start_cpu_seconds: float | None = None
    cpu_seconds: list[float] = field(default_factory=list)  # per song (worker and its ffmpeg), the last 100
    peak_rss_mb: list[float] = field(default_factory=list)  # per song, a worker's peak RSS while on it, the last 100
    start_peak_rss_mb: float | None = None  # a worker's peak RSS by the end of its warm-up


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.jobs = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def kill(self) -> None:
        """SIGKILL the worker's process group (its ffmpeg too) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self.proc.wait()

    async def retire(self) -> None:
        """Let an idle worker exit on end of input; kill it if it lingers."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5.0)
        except TimeoutError:
            await self.kill()

    async def read(self, timeout: float | None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise EOFError("the analysis worker exited")
        return json.loads(line)


class AnalysisPool:
    """Up to ``workers`` analysis processes; :meth:`analyse` waits for a free one. Close it with :meth:`close`."""

    def __init__(
        self,
        workers: int = 1,
        *,
        max_seconds: float = 1200.0,
        memory_mb: int = 2048,
        recycle_rss_mb: int = 1024,
        jobs_per_worker: int = 200,
        start_timeout: float = 120.0,
        cache_dir: str | None = None,
    ):
        self.max_seconds = max_seconds
        self.memory_mb = memory_mb
        self.recycle_rss_mb = recycle_rss_mb
        self.jobs_per_worker = jobs_per_worker
        self.start_timeout = start_timeout
        self.cache_dir = cache_dir or numba_cache_dir()
        self.stats = PoolStats()
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    def pids(self) -> list[int]:
        return [w.pid for w in [*self._idle, *self._busy]]

    async def _start(self) -> _Worker:
        os.makedirs(self.cache_dir, exist_ok=True)
        env = {
            **os.environ,
            "NUMBA_CACHE_DIR": self.cache_dir,
            # one thread each: the worker is one of several processes on few cores, and its CPU time is measured
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "NUMBA_NUM_THREADS": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mvserver.analysis.worker",
            "--memory-mb",
            str(self.memory_mb),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            limit=ANSWER_LIMIT,
        )
        worker = _Worker(proc)
        try:
            ready = await worker.read(self.start_timeout)
        except (TimeoutError, asyncio.CancelledError, EOFError, ValueError) as exc:
            await worker.kill()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise AnalysisError(f"the analysis worker did not start: {type(exc).__name__} {exc}") from None
        self.stats.started += 1
        self.stats.last_start_cpu_seconds = ready.get("start_cpu_seconds")
        self.stats.start_peak_rss_mb = ready.get("peak_rss_mb")
        log.info(
            "analysis worker %s ready in %.1f s (%s)", proc.pid, ready.get("start_seconds", 0), ready.get("librosa")
        )
        return worker

    async def analyse(self, path: str | os.PathLike[str], *, timeout: float) -> SongAnalysis:
        """Analyse the song at ``path`` within ``timeout`` seconds (:class:`AnalysisTimeout` otherwise)."""
        if self._closed:
            raise AnalysisError("the analysis pool is closed")
        async with self._slots:
            worker = self._idle.pop() if self._idle else await self._start()
            if self._closed:  # closed while this worker started
                await worker.kill()
                raise AnalysisError("the analysis pool is closed")
            self._busy.add(worker)
            keep = False
            try:
                answer = await self._ask(worker, str(path), timeout)
                keep = True
            finally:
                self._busy.discard(worker)
                if not keep:
                    self.stats.killed += 1
                    await asyncio.shield(worker.kill())
            await self._release(worker, answer)
        if not answer.get("ok"):
            raise AnalysisError(str(answer.get("error")), kind=str(answer.get("kind", "internal")))
        self.stats.analysed += 1
        self.stats.cpu_seconds = [*self.stats.cpu_seconds[-99:], float(answer.get("cpu_seconds", 0.0))]
        self.stats.peak_rss_mb = [*self.stats.peak_rss_mb[-99:], float(answer.get("peak_rss_mb", 0.0))]
        try:
            return SongAnalysis.model_validate(answer["analysis"])
        except (KeyError, ValidationError) as exc:
            raise AnalysisError(f"the analysis worker answered an invalid analysis: {exc}") from None

    async def _ask(self, worker: _Worker, path: str, timeout: float) -> dict[str, Any]:
        assert worker.proc.stdin is not None
        request = json.dumps({"path": path, "max_seconds": self.max_seconds}) + "\n"
        try:
            worker.proc.stdin.write(request.encode())
            await worker.proc.stdin.drain()
            return await worker.read(timeout)
        except TimeoutError:
            raise AnalysisTimeout(f"the analysis took longer than {timeout:g} s") from None
        except (EOFError, ConnectionError, ValueError) as exc:
            raise AnalysisError(f"the analysis worker failed: {exc}") from None

    async def _release(self, worker: _Worker, answer: dict[str, Any]) -> None:
        worker.jobs += 1
        if (
            self._closed
            or worker.jobs >= self.jobs_per_worker
            or answer.get("kind") == "memory"
            or float(answer.get("rss_mb", 0)) > self.recycle_rss_mb
        ):
            self.stats.retired += 1
            await worker.retire()
        else:
            self._idle.append(worker)

    async def close(self) -> None:
        """Stop every worker: idle ones exit, busy ones are killed (their callers get :class:`AnalysisError`)."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(w.retire() for w in idle), *(w.kill() for w in list(self._busy)))


async def analyse_song(
    path: str | os.PathLike[str], *, timeout: float, pool: AnalysisPool | None = None
) -> SongAnalysis:
    """Analyse one song: in ``pool`` (the app's, warm), or in a worker started for this song and stopped after it
    (a cold start of a few seconds, not counted in ``timeout``)."""
    if pool is not None:
        return await pool.analyse(path, timeout=timeout)
    own = AnalysisPool(workers=1, jobs_per_worker=1)
    try:
        return await own.analyse(path, timeout=timeout)
    finally:
        await own.close()
