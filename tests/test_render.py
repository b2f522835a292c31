"""Tests for the sandbox offline renderer (real Pillow images, real ffmpeg-encoded MP4s)."""

from __future__ import annotations

import asyncio
import io
import os
import pathlib
import subprocess
import time

import imageio_ffmpeg
import pytest
from helpers import probe_media
from PIL import Image, ImageChops, ImageStat

from mvserver.sandbox import render
from mvserver.sandbox.render import (
    ASPECT_SIZES,
    RenderError,
    render_character_image,
    render_video,
)

PROMPT = "A violinist on a rainy rooftop at dusk, neon reflections in the puddles"


def _frame(path: pathlib.Path, index: int = 0) -> Image.Image:
    """Decode one video frame to an RGB Pillow image."""
    out = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path),
         "-vf", f"select=eq(n\\,{index})", "-frames:v", "1", "-f", "image2pipe", "-c:v", "png", "-"],
        capture_output=True, check=True,
    )  # fmt: skip
    return Image.open(io.BytesIO(out.stdout)).convert("RGB")


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (200, 300), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("aspect", sorted(ASPECT_SIZES))
@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_character_image_size_and_format(aspect: str, fmt: str, pil_format: str) -> None:
    data = render_character_image("Tall violinist, silver hair", aspect_ratio=aspect, output_format=fmt, seed=3)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.format == pil_format
        w, h = ASPECT_SIZES[aspect]
        assert im.size == (w * 2, h * 2)


def test_character_image_deterministic_and_varies() -> None:
    a = render_character_image("Tall violinist, silver hair", seed=42)
    assert a == render_character_image("Tall violinist, silver hair", seed=42)
    assert a != render_character_image("Short drummer, green mohawk", seed=42)
    assert a != render_character_image("Tall violinist, silver hair", seed=43)
    # negative_prompt is accepted but does not affect the sandbox card
    assert a == render_character_image("Tall violinist, silver hair", seed=42, negative_prompt="blurry")


def test_character_image_has_sandbox_banner() -> None:
    with Image.open(io.BytesIO(render_character_image("anyone", seed=1))) as im:
        rgb = im.convert("RGB")
    # the top strip is the bright yellow SANDBOX banner
    r, g, b = (round(c) for c in ImageStat.Stat(rgb.crop((0, 0, rgb.width, 8))).median)
    assert (r, g, b) == (255, 204, 0)


def test_character_image_handles_odd_text() -> None:
    texts = ("", "x" * 50_000, "\n" * 5000, "word " * 20_000, "Ünïcødé — 日本語 🎻 " * 20)
    start = time.perf_counter()
    for text in texts:
        with Image.open(io.BytesIO(render_character_image(text))) as im:
            assert im.size == (960, 960)
    assert time.perf_counter() - start < 5  # pathological text must not stall the renderer


def test_wrap_fits_width_and_line_budget() -> None:
    font = render._font(20)
    lines = render._wrap("supercalifragilistic " * 3 + "y" * 300 + " tail", font, 150, 6)
    assert len(lines) == 6 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 150 for line in lines)
    assert render._wrap("short text", font, 150, 6) == ["short text"]


def test_character_image_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        render_character_image("x", aspect_ratio="2:1")
    with pytest.raises(ValueError):
        render_character_image("x", output_format="gif")


# --------------------------------------------------------------------------- video


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("aspect", "duration", "audio"),
    [("16:9", 1.0, True), ("9:16", 2.0, False), ("1:1", 1.0, False), ("4:3", 2.0, True), ("3:4", 1.5, True)],
)
async def test_render_video_properties(tmp_path: pathlib.Path, aspect: str, duration: float, audio: bool) -> None:
    dest = tmp_path / "clip.mp4"
    await render_video(dest, prompt=PROMPT, duration=duration, aspect_ratio=aspect, generate_audio=audio, seed=1)
    assert dest.read_bytes()[4:8] == b"ftyp"
    info = probe_media(dest)
    assert info["video_codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == ASPECT_SIZES[aspect]
    assert info["duration"] == pytest.approx(duration, abs=0.1)
    assert info["fps"] == pytest.approx(24)
    assert info["audio_codec"] == ("aac" if audio else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


@pytest.mark.asyncio
async def test_render_video_moov_before_mdat(tmp_path: pathlib.Path) -> None:
    """+faststart puts the moov atom ahead of the media data."""
    dest = tmp_path / "clip.mp4"
    await render_video(dest, prompt=PROMPT, duration=1, generate_audio=False)
    data = dest.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


@pytest.mark.asyncio
async def test_render_video_has_motion(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "clip.mp4"
    await render_video(dest, prompt=PROMPT, duration=2, generate_audio=False)
    first, last = _frame(dest, 0), _frame(dest, 40)
    diff = ImageChops.difference(first, last).convert("L")
    assert diff.getbbox() is not None
    assert ImageStat.Stat(diff).mean[0] > 0.5  # the progress bar grew noticeably


@pytest.mark.asyncio
async def test_reference_image_changes_output(tmp_path: pathlib.Path) -> None:
    plain, with_ref, bad_ref = tmp_path / "plain.mp4", tmp_path / "ref.mp4", tmp_path / "bad.mp4"
    kwargs = dict(prompt=PROMPT, duration=1, generate_audio=False, seed=5)
    await render_video(plain, **kwargs)
    await render_video(with_ref, reference_image=_png((230, 20, 20), fmt="JPEG"), **kwargs)
    await render_video(bad_ref, reference_image=b"definitely not an image", **kwargs)

    def reddish(im: Image.Image) -> int:
        r, g, b = im.split()
        mask = ImageChops.multiply(
            ImageChops.multiply(r.point(lambda v: 255 * (v > 180)), g.point(lambda v: 255 * (v < 80))),
            b.point(lambda v: 255 * (v < 80)),
        )
        return mask.histogram()[255]

    f_plain, f_ref, f_bad = _frame(plain), _frame(with_ref), _frame(bad_ref)
    assert reddish(f_ref) > 10_000 > reddish(f_plain)
    # undecodable reference bytes are ignored: same picture as without a reference
    assert ImageStat.Stat(ImageChops.difference(f_plain, f_bad).convert("L")).mean[0] < 1.0
    assert probe_media(bad_ref)["video_codec"] == "h264"


@pytest.mark.asyncio
async def test_cancellation_kills_ffmpeg_and_cleans_up(tmp_path: pathlib.Path, monkeypatch) -> None:
    started: list[asyncio.subprocess.Process] = []
    real_exec = asyncio.create_subprocess_exec

    async def spy(*args, **kwargs):
        proc = await real_exec(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    dest = tmp_path / "long.mp4"
    task = asyncio.create_task(render_video(dest, prompt=PROMPT, duration=600, aspect_ratio="16:9"))
    for _ in range(200):
        if started:
            break
        await asyncio.sleep(0.02)
    assert started, "ffmpeg never started"
    await asyncio.sleep(0.3)
    assert any(p.name.endswith(".part") for p in tmp_path.iterdir())  # it really was mid-render
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proc = started[0]
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)  # killed and reaped
    assert list(tmp_path.iterdir()) == []


@pytest.mark.asyncio
async def test_bad_destination_directory(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "missing" / "clip.mp4"
    with pytest.raises(RenderError):
        await render_video(dest, prompt=PROMPT, duration=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.asyncio
async def test_ffmpeg_failure_raises_with_stderr_and_cleans_up(tmp_path: pathlib.Path, monkeypatch) -> None:
    real_args = render._ffmpeg_args

    def broken_args(*args, **kwargs):
        cmd = real_args(*args, **kwargs)
        cmd[cmd.index("libx264")] = "no_such_encoder"
        return cmd

    monkeypatch.setattr(render, "_ffmpeg_args", broken_args)
    dest = tmp_path / "clip.mp4"
    with pytest.raises(RenderError, match="no_such_encoder"):
        await render_video(dest, prompt=PROMPT, duration=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.asyncio
async def test_existing_destination_is_replaced_atomically(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "clip.mp4"
    dest.write_bytes(b"old")
    await render_video(dest, prompt=PROMPT, duration=1, generate_audio=False)
    assert dest.read_bytes()[4:8] == b"ftyp"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


@pytest.mark.asyncio
async def test_render_video_rejects_bad_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        await render_video(tmp_path / "a.mp4", prompt="x", duration=1, aspect_ratio="21:9")
    with pytest.raises(ValueError):
        await render_video(tmp_path / "a.mp4", prompt="x", duration=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.asyncio
async def test_lip_sync_refuses_inputs_that_are_not_media(tmp_path: pathlib.Path) -> None:
    """Its inputs are probed by media's probe; what ffmpeg cannot read is a RenderError, and nothing is written."""
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    dest = tmp_path / "synced.mp4"
    for video in (junk, tmp_path / "missing.mp4"):
        with pytest.raises(RenderError, match="cannot probe"):
            await render.render_lipsync(dest, video=video, audio=junk)
    assert [p.name for p in tmp_path.iterdir()] == ["junk.mp4"]
