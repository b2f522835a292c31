"""Serving: ``wrk`` on get_video, whole file and with a Range header, against nginx serving the same file.

The clip is a real sandbox MP4 (8 s, 640x360, H.264 + AAC) padded with a ``free`` box of random bytes to
``--size-mb`` (default 5 MiB, about an 8 s 720p clip). mvserver runs without its access log; nginx with one worker,
``sendfile on`` and no access log. Both servers are pinned to CPU 0 and wrk (one thread) to CPU 1.

    python -m bench.serving [--size-mb 5] [--duration 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    HOST,
    Process,
    bench_settings,
    free_port,
    print_table,
    processes,
    raise_open_files_limit,
    start_server,
    start_simulator,
    wait_http,
    workdir,
)
from mvserver.sandbox.render import render_video

WRK = "/usr/bin/wrk"
NGINX = "/usr/sbin/nginx"
MB = 1024 * 1024
RANGE = "bytes=1048576-2097151"  # the second MiB, as a player seeking would ask
SERVER_CPU, CLIENT_CPU = {0}, {1}

NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port};
        location / {{ root {root}; }}
    }}
}}
"""


def make_clip(path: Path, size: int) -> int:
    """A sandbox MP4 padded to ``size`` bytes with a ``free`` box of random bytes; returns its size."""
    asyncio.run(render_video(path, prompt="bench: serving clip", duration=8))
    pad = size - path.stat().st_size
    if pad >= 8:
        with open(path, "ab") as handle:
            handle.write(pad.to_bytes(4, "big") + b"free")
            for offset in range(0, pad - 8, MB):
                handle.write(os.urandom(min(MB, pad - 8 - offset)))
    return path.stat().st_size


def start_nginx(started: list[Process], work: Path, root: Path) -> str:
    port = free_port()
    conf_dir = work / "nginx"
    conf_dir.mkdir()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, host=HOST, port=port, root=root))
    proc = Process(
        "nginx",
        [NGINX, "-e", str(conf_dir / "error.log"), "-p", str(conf_dir), "-c", str(conf)],
        work / "nginx.log",
        cpus=SERVER_CPU,
    )
    started.append(proc)
    base = f"http://{HOST}:{port}"
    wait_http(f"{base}/clip.mp4", proc)
    return base


def wrk(url: str, *, duration: float, connections: int, script: Path | None) -> dict[str, float]:
    """One wrk run; requests/s, MiB/s and the count of non-2xx answers."""
    args = ["taskset", "-c", ",".join(map(str, CLIENT_CPU)), WRK, "-t1", f"-c{connections}", f"-d{duration:g}s"]
    args += ["-s", str(script)] if script else []
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out).groups()
    scale = {"B": 1 / MB, "KB": 1 / 1024, "MB": 1, "GB": 1024}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "mibps": float(value) * scale,
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=5.0, help="clip size in MiB (default 5)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    work = workdir("serving")
    work.chmod(0o755)  # nginx workers run as an unprivileged user
    video_id = str(uuid.uuid4())
    videos = work / "outputs" / "videos"
    videos.mkdir(parents=True)
    size = make_clip(videos / f"{video_id}.mp4", int(args.size_mb * MB))
    root = work / "www"
    root.mkdir()
    shutil.copyfile(videos / f"{video_id}.mp4", root / "clip.mp4")
    script = work / "range.lua"
    script.write_text(f'wrk.headers["Range"] = "{RANGE}"\n')
    results = {}
    with processes() as started:
        sim = start_simulator(started, work, video_latency=1.0, cpus=CLIENT_CPU)
        mvserver = start_server(started, work, sim, bench_settings(work), cpus=SERVER_CPU)
        nginx = start_nginx(started, work, root)
        urls = {"mvserver": f"{mvserver}/api/mv/get_video/{video_id}", "nginx": f"{nginx}/clip.mp4"}
        for request, lua in (("whole file", None), (f"Range {RANGE}", script)):
            for server, url in urls.items():
                wrk(url, duration=1, connections=args.connections, script=lua)  # warm-up
                results[request, server] = wrk(url, duration=args.duration, connections=args.connections, script=lua)
    rows = []
    for request in dict.fromkeys(r for r, _ in results):
        mv, ng = results[request, "mvserver"], results[request, "nginx"]
        for server, r in (("mvserver", mv), ("nginx", ng)):
            rows.append(
                (
                    request,
                    server,
                    r["rps"],
                    r["mibps"],
                    r["non2xx"] or r["socket_errors"] or 0,
                    f"{mv['mibps'] / ng['mibps']:.2f}" if server == "mvserver" else "",
                )
            )
    print_table(
        f"Serving get_video: {size} byte MP4 ({size / MB:.1f} MiB), wrk -t1 -c{args.connections} "
        f"-d{args.duration:g}s, servers on CPU 0, wrk on CPU 1 (goal: mvserver/nginx >= 0.7)",
        ["request", "server", "requests/s", "MiB/s", "errors", "mvserver/nginx"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
