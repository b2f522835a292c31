"""Simulator options used by the benchmarks: padded outputs, the render cache, and the standalone command line."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest
from helpers import probe_media

from mvserver.sandbox.__main__ import build_parser, make_simulator
from mvserver.sandbox.app import Simulator, create_simulator_app
from mvserver.sandbox.render import render_video
from mvserver.sandbox.replicate_api import pad_mp4, render_key

AUTH = {"Authorization": "Bearer r8_test"}
VEO = "/replicate/v1/models/google/veo-3.1/predictions"


def test_pad_mp4_appends_a_free_box_and_keeps_the_file_playable(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    asyncio.run(render_video(clip, prompt="pad me", duration=1, generate_audio=False))
    size = clip.stat().st_size
    pad_mp4(clip, 100_000)
    assert clip.stat().st_size == size + 100_000
    with open(clip, "rb") as handle:
        handle.seek(size)
        assert struct.unpack(">I4s", handle.read(8)) == (100_000, b"free")
        assert handle.read(16) == bytes(16)
    assert probe_media(clip)["video_codec"] == "h264"


def test_pad_mp4_uses_a_64_bit_size_past_4_gib_and_ignores_zero(tmp_path: Path) -> None:
    path = tmp_path / "big.mp4"
    path.write_bytes(b"\0\0\0\x08mdat")
    pad_mp4(path, 0)
    assert path.stat().st_size == 8
    pad_mp4(path, 2**32 + 10)  # sparse: no disk space is used
    assert path.stat().st_size == 8 + 2**32 + 10
    with open(path, "rb") as handle:
        handle.seek(8)
        assert struct.unpack(">I4sQ", handle.read(16)) == (1, b"free", 2**32 + 10)


def test_render_key_covers_every_option_and_the_reference_bytes() -> None:
    base = {
        "prompt": "p",
        "duration": 4,
        "aspect_ratio": "16:9",
        "reference_image": None,
        "generate_audio": True,
        "seed": 1,
    }
    keys = {
        render_key(base, 0),
        render_key(base, 10),
        render_key({**base, "seed": 2}, 0),
        render_key({**base, "reference_image": b"a"}, 0),
        render_key({**base, "reference_image": b"b"}, 0),
    }
    assert len(keys) == 5
    assert render_key(dict(base), 0) == render_key(base, 0)


async def _run_prediction(client: Any, inputs: dict[str, Any]) -> str:
    async with client.post(VEO, json={"input": inputs}, headers=AUTH) as response:
        assert response.status == 201
        prediction_id = (await response.json())["id"]
    for _ in range(100):
        async with client.get(f"/replicate/v1/predictions/{prediction_id}", headers=AUTH) as response:
            body = await response.json()
        if body["status"] == "succeeded":
            return body["output"]
        assert body["status"] in ("starting", "processing")
        await asyncio.sleep(0.05)
    raise AssertionError("prediction did not finish")


async def test_render_cache_shares_one_padded_file_between_identical_requests(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    sim = Simulator(tmp_path / "sim", video_latency=0.05, render_cache=True, output_pad_bytes=4096)
    client = await aiohttp_client(create_simulator_app(sim))
    inputs = {"prompt": "cached", "duration": 1, "generate_audio": False, "seed": 5}
    first, second, other = await asyncio.gather(
        _run_prediction(client, inputs), _run_prediction(client, inputs), _run_prediction(client, {**inputs, "seed": 6})
    )
    paths = [tmp_path / "sim" / "files" / Path(url).parent.name / "output.mp4" for url in (first, second, other)]
    assert paths[0].stat().st_ino == paths[1].stat().st_ino != paths[2].stat().st_ino
    assert len(list((tmp_path / "sim" / "cache").glob("*.mp4"))) == 2
    async with client.get(first.split(str(client.make_url("")).rstrip("/"))[-1]) as response:
        data = await response.read()
    assert len(data) == paths[0].stat().st_size and data[-4096 + 4 : -4096 + 8] == b"free"


async def test_simulators_with_one_render_cache_dir_share_their_renders(tmp_path: Path, aiohttp_client: Any) -> None:
    shared = tmp_path / "renders"
    sims = [Simulator(tmp_path / name, video_latency=0.05, render_cache=True, render_cache_dir=shared) for name in "ab"]
    inputs = {"prompt": "shared", "duration": 1, "generate_audio": False, "seed": 5}
    urls = [await _run_prediction(await aiohttp_client(create_simulator_app(sim)), inputs) for sim in sims]
    paths = [tmp_path / name / "files" / Path(url).parent.name / "output.mp4" for name, url in zip("ab", urls)]
    assert paths[0].stat().st_ino == paths[1].stat().st_ino  # the second simulator rendered nothing
    assert [p.name for p in shared.iterdir()] == [f"{render_key_of(inputs)}.mp4"]  # no temporaries left
    assert not (tmp_path / "a" / "cache").exists() and not (tmp_path / "b" / "cache").exists()


def render_key_of(inputs: dict[str, Any]) -> str:
    """The cache key of a Veo prediction's render (the options ReplicateApi passes to render_video)."""
    options = {
        "prompt": inputs["prompt"],
        "duration": inputs["duration"],
        "aspect_ratio": "16:9",
        "reference_image": None,
        "generate_audio": inputs["generate_audio"],
        "seed": inputs["seed"],
    }
    return render_key(options, 0)


async def test_without_the_cache_each_prediction_renders_its_own_file(tmp_path: Path, aiohttp_client: Any) -> None:
    sim = Simulator(tmp_path / "sim", video_latency=0.05)
    client = await aiohttp_client(create_simulator_app(sim))
    inputs = {"prompt": "uncached", "duration": 1, "generate_audio": False, "seed": 5}
    urls = await asyncio.gather(_run_prediction(client, inputs), _run_prediction(client, inputs))
    inodes = {(tmp_path / "sim" / "files" / Path(url).parent.name / "output.mp4").stat().st_ino for url in urls}
    assert len(inodes) == 2
    assert not (tmp_path / "sim" / "cache").exists()


def test_command_line_builds_the_simulator(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "--state-dir",
            str(tmp_path),
            "--video-latency",
            "5",
            "--scenes-latency",
            "0",
            "--render-cache",
            "--render-cache-dir",
            str(tmp_path / "renders"),
            "--output-pad-bytes",
            "1024",
        ]
    )
    sim = make_simulator(args)
    assert (sim.video_latency, sim.scenes_latency, sim.image_latency) == (5.0, 0.0, 1.5)
    assert sim.render_cache and sim.output_pad_bytes == 1024 and sim.render_cache_dir == tmp_path / "renders"
    default = make_simulator(build_parser().parse_args(["--state-dir", str(tmp_path)]))
    assert not default.render_cache and default.render_cache_dir is None
    with pytest.raises(ValueError):
        make_simulator(build_parser().parse_args(["--state-dir", str(tmp_path), "--video-latency", "-1"]))
