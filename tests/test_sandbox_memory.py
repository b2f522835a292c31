"""The simulator's memory: a huge reference image is shrunk before it is rendered, and renders run a few at a time.

A 6.5 KB request carrying a 39.6 MP 1-bit PNG (under the 40 MP cap) used to cost the simulator about 310 MB while it
rendered (a full-size RGBA copy and a transposed copy of it); six at once took it past 1.3 GB, and it kept 1.2 GB
afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from helpers import PROJECT, free_port
from PIL import Image

from mvserver.sandbox import render, replicate_api
from mvserver.sandbox.app import Simulator, create_simulator_app
from mvserver.sandbox.state import RENDER_SLOTS

AUTH = {"Authorization": "Bearer r8_test"}
HUGE = (7040, 5625)  # 39.6 MP
CONCURRENT = 6
SLOTS = 2
# What one render of HUGE may add to the process at its peak: the image decoded in its own mode (1-bit: one byte a
# pixel, about 40 MB; RGB: four, about 160 MB) and small change. The simulator runs SLOTS renders at once.
PEAK_PER_RENDER_MB = {"1-bit": 56, "RGB": 180}
RETAINED_MB = 40  # what may stay once every render is done (allocator slack, thread stacks)


def huge_png(width: int, height: int, rgb: bool = False) -> bytes:
    """A PNG, 1-bit greyscale (white with black stripes) or 8-bit RGB (one colour with stripes), compressed row by
    row: never held decoded, a few KB (1-bit) or about 130 KB (RGB) for 40 MP."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if rgb:
        plain, stripe = b"\x00" + b"\x20\x80\xc0" * width, b"\x00" + b"\x00" * (3 * width)
    else:
        plain, stripe = b"\x00" + b"\xff" * ((width + 7) // 8), b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(stripe if y % 500 < 20 else plain) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8 if rgb else 1, 2 if rgb else 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body + compressor.flush()) + chunk(b"IEND", b"")
    )


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def vm_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def run_prediction(session: aiohttp.ClientSession, base: str, reference: str, seed: int) -> dict[str, Any]:
    """Create a veo prediction with ``reference`` and poll it to its end."""
    inputs = {"prompt": "memory", "duration": 1, "generate_audio": False, "seed": seed, "reference_images": [reference]}
    async with session.post(
        f"{base}/replicate/v1/models/google/veo-3.1/predictions", json={"input": inputs}, headers=AUTH
    ) as response:
        assert response.status == 201, await response.text()
        prediction = await response.json()
    async with asyncio.timeout(60):
        while prediction["status"] not in ("succeeded", "failed", "canceled"):
            async with session.get(f"{base}/replicate/v1/predictions/{prediction['id']}", headers=AUTH) as response:
                prediction = await response.json()
    return prediction


def test_the_huge_png_is_what_the_issue_sent() -> None:
    png = huge_png(*HUGE)
    assert len(png) < 16 * 1024 and HUGE[0] * HUGE[1] <= render.MAX_REFERENCE_PIXELS
    reference = render._decode_reference(png, (640, 360))
    assert reference is not None and reference.mode == "RGBA" and max(reference.size) < 2 * 640
    assert reference.getextrema()[0] == (0, 255)  # the stripes survive the shrink


@pytest.mark.parametrize("mode", ["1", "P", "L", "LA", "RGB", "RGBA", "I;16"])
def test_a_large_reference_of_any_mode_is_shrunk_before_it_is_converted(mode: str) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (4000, 2000)).save(buffer, "PNG")
    reference = render._decode_reference(buffer.getvalue(), (640, 360))
    assert reference is not None and reference.mode == "RGBA"
    assert abs(reference.width - 4000 / 3) < 1 and abs(reference.height - 2000 / 3) < 1  # a third of each side


def test_a_rotated_jpeg_reference_is_drawn_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated a quarter turn clockwise
    buffer = io.BytesIO()
    Image.new("RGB", (1600, 800), "teal").save(buffer, "JPEG", exif=exif)
    reference = render._decode_reference(buffer.getvalue(), (640, 360))
    assert reference is not None and reference.width < reference.height


@pytest.mark.parametrize("kind", ["1-bit", "RGB"])
async def test_six_39_mp_references_at_once_keep_the_simulator_process_small(tmp_path: Path, kind: str) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mvserver.sandbox",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "sim"),
            "--video-latency",
            "0.05",
            "--max-concurrent-renders",
            str(SLOTS),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
                    try:
                        async with session.get(f"{base}/_sim/health") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
            small = data_uri(huge_png(640, 360))  # warm up: imports, fonts, ffmpeg, the first render
            assert (await run_prediction(session, base, small, 0))["status"] == "succeeded"
            before = vm_kb(process.pid)
            huge = data_uri(huge_png(*HUGE, rgb=kind == "RGB"))
            done = await asyncio.gather(*(run_prediction(session, base, huge, seed) for seed in range(CONCURRENT)))
            after = vm_kb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert [prediction["status"] for prediction in done] == ["succeeded"] * CONCURRENT
    peak_growth_mb = (after["VmHWM"] - before["VmRSS"]) / 1024  # an upper bound: VmHWM includes the warm-up's peak
    retained_mb = (after["VmRSS"] - before["VmRSS"]) / 1024
    print(f"peak growth {peak_growth_mb:.1f} MB, retained {retained_mb:.1f} MB")
    assert peak_growth_mb < SLOTS * PEAK_PER_RENDER_MB[kind]
    assert retained_mb < RETAINED_MB  # the decoded images were handed back to the system


async def test_renders_run_at_most_max_concurrent_renders_at_once(
    tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, peak = 0, 0
    real = replicate_api.render_video

    async def counting(dest: Path, **options: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await real(dest, **options)
        finally:
            running -= 1

    monkeypatch.setattr(replicate_api, "render_video", counting)
    sim = Simulator(tmp_path / "sim", video_latency=0.0, max_concurrent_renders=SLOTS)
    client: TestClient = await aiohttp_client(create_simulator_app(sim))
    assert client.app[RENDER_SLOTS]._value == SLOTS  # the app owns the bound
    base = str(client.make_url("")).rstrip("/")
    small = data_uri(huge_png(64, 36))
    done = await asyncio.gather(*(run_prediction(client.session, base, small, seed) for seed in range(CONCURRENT)))
    assert [prediction["status"] for prediction in done] == ["succeeded"] * CONCURRENT
    assert peak == SLOTS  # six were due at once: two rendered, the others waited
