"""Shared benchmark plumbing: server and simulator processes on free loopback ports, /proc sampling, tables.

Every process is started in its own session (process group) and stopped with its group, so a benchmark that is
interrupted still leaves nothing behind: use :func:`processes` as a context manager around the run.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROVIDER_ENV = {"GEMINI_API_KEY": "bench-gemini", "REPLICATE_API_TOKEN": "r8_bench", "GOOGLE_VERTEX_API_KEY": "bench"}


# -- processes ---------------------------------------------------------------------------------------------------


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (inherited by the processes started afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Process:
    """A child process in its own process group, with its output in ``log``."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
    ):
        self.name, self.log = name, log
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        child_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                list(args),
                cwd=ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if cpus:
            os.sched_setaffinity(self.popen.pid, cpus)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the whole group, SIGKILL it if it lingers."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def processes() -> Iterator[list[Process]]:
    """Collect the processes a benchmark starts; stop them all (last started first) however the run ends."""
    started: list[Process] = []
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.stop()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def wait_http(url: str, proc: Process, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers 200; fail with the process's log tail if it dies or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout:g} s:\n{proc.tail()}")


def start_simulator(
    started: list[Process],
    workdir: Path,
    *,
    video_latency: float,
    image_latency: float = 0.2,
    scenes_latency: float = 0.0,
    render_cache: bool = True,
    pad_bytes: int = 0,
    cpus: set[int] | None = None,
) -> str:
    """Run ``python -m mvserver.sandbox`` on a free port; return its base URL."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "mvserver.sandbox",
        "--host",
        HOST,
        "--port",
        str(port),
        "--state-dir",
        str(workdir / "simulator"),
        "--video-latency",
        str(video_latency),
        "--image-latency",
        str(image_latency),
        "--scenes-latency",
        str(scenes_latency),
        "--output-pad-bytes",
        str(pad_bytes),
    ] + (["--render-cache"] if render_cache else [])
    # the servers' Replicate token: the simulator answers it and gives it its webhook secret (bench.concurrency --webhooks)
    token = {"MV_SIM_API_TOKEN": PROVIDER_ENV["REPLICATE_API_TOKEN"]}
    proc = Process("simulator", args, workdir / "simulator.log", env=token, cpus=cpus)
    started.append(proc)
    base = f"http://{HOST}:{port}"
    wait_http(f"{base}/_sim/health", proc)
    return base


def bench_settings(workdir: Path, **jobs: Any) -> Path:
    """A copy of ``settings/`` with the given ``videos.yaml`` ``jobs`` overrides."""
    target = workdir / "settings"
    shutil.copytree(ROOT / "settings", target)
    path = target / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["jobs"].update(jobs)
    path.write_text(yaml.safe_dump(videos, sort_keys=False))
    return target


def start_server(
    started: list[Process],
    workdir: Path,
    sim_url: str,
    settings_dir: Path,
    *,
    cpus: set[int] | None = None,
    stats: bool = False,
    extra_env: dict[str, str] | None = None,
    webhooks: bool = False,
) -> str:
    """Run mvserver (``python -m bench.run_server``, access log off) against the simulator; return its base URL.
    With ``webhooks`` its own address is its public base URL, so the simulator sends Replicate webhooks to it."""
    port = free_port()
    if webhooks:
        extra_env = {**(extra_env or {}), "MV_PUBLIC_BASE_URL": f"http://{HOST}:{port}"}
    env = {
        **PROVIDER_ENV,
        "MV_GEMINI_BASE_URL": f"{sim_url}/gemini",
        "MV_VERTEX_BASE_URL": f"{sim_url}/vertex",
        "MV_REPLICATE_BASE_URL": f"{sim_url}/replicate",
        "MV_OUTPUT_DIR": str(workdir / "outputs"),
        "MV_SETTINGS_DIR": str(settings_dir),
        **(extra_env or {}),
    }
    args = [sys.executable, "-m", "bench.run_server", "--host", HOST, "--port", str(port)] + (
        ["--stats"] if stats else []
    )
    args += profile_args("mvserver-webhooks" if webhooks else "mvserver", port)
    proc = Process("mvserver", args, workdir / "mvserver.log", env=env, cpus=cpus)
    started.append(proc)
    base = f"http://{HOST}:{port}"
    wait_http(f"{base}/api/mv/health", proc)
    spy(started, proc, "mvserver-webhooks" if webhooks else "mvserver")
    return base


def profile_args(name: str, port: int) -> list[str]:
    """``--profile`` for a server when ``MVBENCH_PROFILE`` names a directory (cProfile, one file per server)."""
    target = os.environ.get("MVBENCH_PROFILE")
    if not target:
        return []
    Path(target).mkdir(parents=True, exist_ok=True)
    return ["--profile", str(Path(target) / f"{name}-{port}.prof")]


def spy(started: list[Process], server: Process, name: str) -> None:
    """With ``MVBENCH_PYSPY`` naming a directory, sample ``server`` with py-spy (collapsed stacks, written when the
    server exits; ``python -m bench.profile_report`` reads them). Started before the server in ``started``'s order
    of stopping, so the server stops first and py-spy writes its file."""
    target = os.environ.get("MVBENCH_PYSPY")
    if not target:
        return
    Path(target).mkdir(parents=True, exist_ok=True)
    out = Path(target) / f"{name}-{server.pid}.txt"
    py_spy = str(Path(sys.executable).parent / "py-spy")
    args = [py_spy, "record", "--pid", str(server.pid), "--format", "raw", "--rate", "50", "--nonblocking"]
    proc = _Spy(f"py-spy {name}", [*args, "--output", str(out)], out.with_suffix(".log"))
    started.insert(started.index(server), proc)


class _Spy(Process):
    """py-spy ends by itself once its server is gone, and writes its file then: give it time to."""

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(60)
        super().stop(timeout)


def workdir(prefix: str) -> Path:
    """A fresh temporary directory for one run, removed at exit unless ``MVBENCH_KEEP=1`` (then its path is printed)."""
    path = Path(tempfile.mkdtemp(prefix=f"mvbench-{prefix}-"))
    if os.environ.get("MVBENCH_KEEP") == "1":
        atexit.register(print, f"kept {path}")
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# -- /proc ---------------------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` and count fields of /proc/<pid>/status (VmRSS, VmHWM, Threads, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the children a process has waited for (its finished ffmpeg runs)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    """Set the process's VmHWM back to its VmRSS (``5`` into /proc/<pid>/clear_refs), so VmHWM afterwards is the
    peak of what follows, however short it was; sampling alone may miss one."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def loadavg() -> str:
    """The 1/5/15-minute load average, as /proc/loadavg shows it, to print next to a number."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval`` seconds in a thread; ``peak_kb`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak_kb = max(self.peak_kb, proc_status(self.pid)["VmRSS"])
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# -- numbers and tables --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain Markdown table, so it can be pasted into notes as is."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{os.cpu_count()} CPUs; load average 1/5/15 min at the end: {load} (other work on the machine shows here)",
        flush=True,
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def sse_message(lines: list[str]) -> dict[str, Any] | None:
    """One SSE message from its field lines: ``{"id", "event", "data"}`` (data JSON-decoded), or None (comment)."""
    event: dict[str, Any] = {}
    data = []
    for line in lines:
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        else:
            event[name] = value
    if not data:
        return None
    event["data"] = json.loads("\n".join(data))
    return event


async def read_sse(response: Any) -> Any:
    """Yield ``(received_at, event)`` for each message of an aiohttp text/event-stream response."""
    lines: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line:
            lines.append(line)
            continue
        event = sse_message(lines)
        lines = []
        if event is not None:
            yield time.time(), event
