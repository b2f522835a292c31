"""Offline renderer for sandbox mode: real, clearly labelled image and video files.

All text is drawn with Pillow's bundled FreeType font (no system fonts needed); ffmpeg, run and probed through
:mod:`mvserver.media` like every other ffmpeg of the service, only loops, animates and encodes the frame.
"""

from __future__ import annotations

import asyncio
import colorsys
import ctypes
import hashlib
import io
import os
import pathlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mvserver.core.artefacts import temp_path
from mvserver.media.errors import MediaError, MediaTimeout
from mvserver.media.limits import FfmpegLimits
from mvserver.media.probe import MediaInfo, probe
from mvserver.media.run import run_ffmpeg

__all__ = [
    "ASPECT_SIZES",
    "LIPSYNC_LABEL",
    "MAX_REFERENCE_PIXELS",
    "RenderError",
    "oversized_image",
    "render_character_image",
    "render_lipsync",
    "render_video",
]

ASPECT_SIZES: dict[str, tuple[int, int]] = {
    "16:9": (640, 360),
    "9:16": (360, 640),
    "1:1": (480, 480),
    "4:3": (480, 360),
    "3:4": (360, 480),
}

_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_BANNER_BG = (255, 204, 0)
_BANNER_FG = (20, 20, 20)
# The simulator's renders ran without a memory or thread cap before they went through media's runner; they still do.
RENDER_LIMITS = FfmpegLimits(memory_mb=None, threads=None)
_MAX_TEXT = 4000  # characters considered for on-frame text
# Reference images above this many pixels are refused from their header, before any decoding: a small PNG of
# 13,000 x 13,000 pixels would otherwise take gigabytes to decode.
MAX_REFERENCE_PIXELS = 40_000_000

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


class RenderError(Exception):
    """Rendering failed (ffmpeg error, unwritable destination, unreadable media)."""


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Palette:
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    pants: tuple[int, int, int]
    accent: tuple[int, int, int]


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _palette(text: str, seed: int | None) -> _Palette:
    """Deterministic colours derived from a hash of ``text`` and ``seed``."""
    d = hashlib.sha256(f"{text}\x00{seed}".encode()).digest()
    hue = d[0] / 255
    return _Palette(
        top=_rgb(hue, 0.45, 0.30),
        bottom=_rgb(hue + 0.08, 0.55, 0.12),
        skin=_rgb(0.07, 0.25 + d[1] / 255 * 0.45, 0.45 + d[2] / 255 * 0.5),
        hair=_rgb(d[3] / 255, 0.5, 0.15 + d[4] / 255 * 0.5),
        shirt=_rgb(d[5] / 255, 0.55 + d[6] / 255 * 0.4, 0.75),
        pants=_rgb(d[7] / 255, 0.45, 0.25 + d[8] / 255 * 0.35),
        accent=_rgb(hue + 0.5, 0.6, 0.95),
    )


@lru_cache(maxsize=32)
def _font(size: int) -> Font:
    """Pillow's bundled font (FreeType when available, so ``size`` is honoured)."""
    return ImageFont.load_default(size=size)


def _text_width(font: Font, text: str) -> float:
    return font.getlength(text)


def _fit(font: Font, text: str, max_width: int) -> int:
    """Length (>= 1) of the longest prefix of ``text`` that fits ``max_width`` (binary search)."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_width(font, text[:mid]) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _wrap(text: str, font: Font, max_width: int, max_lines: int) -> list[str]:
    """Greedy pixel-width word wrap; over-long words are split, overflow ends with an ellipsis."""
    lines: list[str] = []
    for paragraph in text[:_MAX_TEXT].splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if _text_width(font, candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(lines) <= max_lines and len(word) > 1 and _text_width(font, word) > max_width:
                cut = _fit(font, word, max_width)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
            if len(lines) > max_lines:
                break
        lines.append(line)
        if len(lines) > max_lines:
            break
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_width(font, last + "…") > max_width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


def _gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    """Vertical two-colour gradient background."""
    w, h = size
    column = Image.new("RGB", (1, h))
    column.putdata(
        [tuple(round(a + (b - a) * y / max(h - 1, 1)) for a, b in zip(top, bottom, strict=False)) for y in range(h)]
    )
    return column.resize((w, h))


def _draw_banner(img: Image.Image, label: str) -> int:
    """A yellow strip across the top: 'SANDBOX' left, ``label`` right when it fits; returns its height."""
    w, h = img.size
    bh = max(18, min(w, h) // 12)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w, bh), fill=_BANNER_BG)
    margin = bh // 3
    tag_font, label_font = _font(int(bh * 0.66)), _font(int(bh * 0.45))
    draw.text((margin, bh // 2), "SANDBOX", font=tag_font, fill=_BANNER_FG, anchor="lm")
    free = w - 3 * margin - _text_width(tag_font, "SANDBOX")
    if _text_width(label_font, label) <= free:
        draw.text((w - margin, bh // 2), label, font=label_font, fill=_BANNER_FG, anchor="rm")
    return bh


def _draw_text_block(
    img: Image.Image, box: tuple[int, int, int, int], text: str, colour: tuple[int, int, int] = (240, 240, 240)
) -> None:
    """Wrap ``text`` into ``box`` (x0, y0, x1, y1) with a font sized to the box."""
    x0, y0, x1, y1 = box
    size = max(10, min(img.size) // 22)
    font = _font(size)
    line_h = round(size * 1.3)
    lines = _wrap(text, font, x1 - x0, max(1, (y1 - y0) // line_h))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((x0, y0 + i * line_h), line, font=font, fill=colour)


def _draw_figure(img: Image.Image, box: tuple[int, int, int, int], pal: _Palette) -> None:
    """A simple stylised full-body figure centred in ``box``."""
    x0, y0, x1, y1 = box
    h = y1 - y0
    u = min(x1 - x0, h) / 10  # one "unit" of the figure
    cx = (x0 + x1) / 2
    top = y0 + (h - 9.6 * u) / 2
    d = ImageDraw.Draw(img)
    # legs
    d.rounded_rectangle((cx - 1.3 * u, top + 5.4 * u, cx - 0.15 * u, top + 9.2 * u), radius=u * 0.4, fill=pal.pants)
    d.rounded_rectangle((cx + 0.15 * u, top + 5.4 * u, cx + 1.3 * u, top + 9.2 * u), radius=u * 0.4, fill=pal.pants)
    d.ellipse((cx - 1.6 * u, top + 8.9 * u, cx - 0.1 * u, top + 9.6 * u), fill=pal.hair)
    d.ellipse((cx + 0.1 * u, top + 8.9 * u, cx + 1.6 * u, top + 9.6 * u), fill=pal.hair)
    # arms then torso
    d.rounded_rectangle((cx - 2.3 * u, top + 2.4 * u, cx - 1.3 * u, top + 5.9 * u), radius=u * 0.45, fill=pal.shirt)
    d.rounded_rectangle((cx + 1.3 * u, top + 2.4 * u, cx + 2.3 * u, top + 5.9 * u), radius=u * 0.45, fill=pal.shirt)
    d.ellipse((cx - 2.2 * u, top + 5.6 * u, cx - 1.4 * u, top + 6.4 * u), fill=pal.skin)
    d.ellipse((cx + 1.4 * u, top + 5.6 * u, cx + 2.2 * u, top + 6.4 * u), fill=pal.skin)
    d.rounded_rectangle((cx - 1.5 * u, top + 2.2 * u, cx + 1.5 * u, top + 5.8 * u), radius=u * 0.6, fill=pal.shirt)
    d.rectangle((cx - 1.5 * u, top + 3.9 * u, cx + 1.5 * u, top + 4.2 * u), fill=pal.accent)
    # neck, head, hair, eyes
    d.rectangle((cx - 0.35 * u, top + 1.7 * u, cx + 0.35 * u, top + 2.4 * u), fill=pal.skin)
    d.ellipse((cx - 0.95 * u, top, cx + 0.95 * u, top + 2.0 * u), fill=pal.skin)
    d.chord((cx - 1.0 * u, top - 0.1 * u, cx + 1.0 * u, top + 1.5 * u), 180, 360, fill=pal.hair)
    for ex in (-0.4, 0.4):
        d.ellipse((cx + (ex - 0.1) * u, top + 0.9 * u, cx + (ex + 0.1) * u, top + 1.1 * u), fill=(25, 25, 25))


def _split(size: tuple[int, int], top: int, pad: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Split the area below the banner into (picture box, text box): side by side if landscape, else stacked."""
    w, h = size
    if w > h:
        mid = int(w * 0.45)
        return (pad, top + pad, mid, h - pad), (mid + pad, top + pad, w - pad, h - pad)
    mid = top + int((h - top) * 0.62)
    return (pad, top + pad, w - pad, mid), (pad, mid + pad // 2, w - pad, h - pad)


def _size_for(aspect_ratio: str) -> tuple[int, int]:
    try:
        return ASPECT_SIZES[aspect_ratio]
    except KeyError:
        raise ValueError(f"unsupported aspect_ratio {aspect_ratio!r}; expected one of {sorted(ASPECT_SIZES)}") from None


# --------------------------------------------------------------------------- images


def render_character_image(
    description: str,
    *,
    aspect_ratio: str = "1:1",
    output_format: str = "png",
    seed: int | None = None,
    negative_prompt: str | None = None,
) -> bytes:
    """Render a deterministic, SANDBOX-labelled character-reference card and return its encoded bytes.

    Colours come from a hash of (description, seed); size is ``ASPECT_SIZES[aspect_ratio]`` x2;
    ``output_format`` is png, jpg/jpeg or webp. ``negative_prompt`` is accepted and ignored.
    """
    del negative_prompt  # the sandbox has nothing to steer away from
    fmt = _IMAGE_FORMATS.get(output_format.lower())
    if fmt is None:
        raise ValueError(f"unsupported output_format {output_format!r}; expected png, jpg or webp")
    w, h = _size_for(aspect_ratio)
    size = (w * 2, h * 2)
    pal = _palette(description, seed)
    img = _gradient(size, pal.top, pal.bottom)
    banner = _draw_banner(img, "character reference" + ("" if seed is None else f" · seed {seed}"))
    pad = min(size) // 24
    fig_box, text_box = _split(size, banner, pad)
    _draw_figure(img, fig_box, pal)
    _draw_text_block(img, text_box, description.strip() or "(no description)")
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, fmt, optimize=False)
    else:
        img.save(buf, fmt, quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- video


def oversized_image(data: bytes, max_pixels: int = MAX_REFERENCE_PIXELS) -> str | None:
    """``"WxH"`` when the image header declares more than ``max_pixels`` pixels, else None (nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError:  # Pillow's own header check, far above ours
        return f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)}"
    except Exception:
        return None
    return f"{width}x{height}" if width * height > max_pixels else None


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does it)
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_REDUCIBLE_MODES = ("L", "RGB")  # modes Image.reduce averages without a full-size premultiplied copy


def _shrunk(im: Image.Image, box: int) -> Image.Image:
    """``im`` shrunk by the largest whole factor that keeps both sides at least ``box`` pixels, in its own mode.

    The full-size image is only ever held decoded in its native mode (a 1-bit or palette PNG at one byte a pixel);
    the conversion to RGBA happens on the small copy. ``L`` and ``RGB`` are box-averaged (``reduce``); other modes
    (1-bit, palette, alpha, 16-bit) are sampled (``NEAREST``), which needs no full-size intermediate either.
    """
    factor = min(im.width, im.height) // box
    if factor < 2:
        return im.copy()
    if im.mode in _REDUCIBLE_MODES:
        return im.reduce(factor)
    return im.resize((max(1, im.width // factor), max(1, im.height // factor)), Image.Resampling.NEAREST)


def _decode_reference(data: bytes | None, max_size: tuple[int, int]) -> Image.Image | None:
    """Open any Pillow-readable image of at most ``MAX_REFERENCE_PIXELS`` as a small RGBA image, upright, about
    ``max_size``; other bytes yield None.

    Never converts the full-size image: JPEGs decode at 1/2 to 1/8 scale (``draft``), everything else decodes in its
    native mode and is shrunk by :func:`_shrunk` before the conversion. A 39.6 MP 1-bit PNG costs about 40 MB while
    it is decoded (it cost 310 MB as a full-size RGBA copy and its transposed copy), an RGB one about 160 MB (Pillow
    holds RGB at four bytes a pixel); the simulator's render slots bound how many are decoded at once.
    """
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_REFERENCE_PIXELS:
                return None
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            box = max(max_size)  # the longer side of the frame, so a rotated image is not shrunk too far
            im.draft("RGB", (box, box))  # JPEG: cheap downscale while decoding; a no-op for other formats
            small = _shrunk(im, box)
        if orientation in _ORIENTATIONS:
            small = small.transpose(_ORIENTATIONS[orientation])
        return small.convert("RGBA")
    except Exception:
        return None


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it."""
    try:
        return ctypes.CDLL(None).malloc_trim  # the symbols of the running process, libc among them
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Hand freed heap pages back to the system. Pillow frees a decoded image's blocks, but glibc keeps freed
    blocks of a worker thread's arena (and, once one large block was freed, serves later ones from the arenas
    too), so without a trim a process that decoded a large reference in a thread stays that large."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _compose_video_frame(
    size: tuple[int, int], prompt: str, seed: int | None, reference: bytes | None, caption: str, bar_h: int
) -> bytes:
    """The static PNG frame ffmpeg animates: banner, optional reference image, prompt text, progress track."""
    w, h = size
    pal = _palette(prompt, seed)
    img = _gradient(size, pal.top, pal.bottom)
    banner = _draw_banner(img, "simulated video, not AI output")
    pad = min(size) // 24
    ref = _decode_reference(reference, size)
    if reference:
        release_memory()  # the full-size decode is gone: return its pages now, not never
    if ref is not None:
        pic_box, text_box = _split((w, h - bar_h), banner, pad)
        bw, bh = pic_box[2] - pic_box[0], pic_box[3] - pic_box[1]
        fitted = ImageOps.contain(ref, (bw, bh))
        ox = pic_box[0] + (bw - fitted.width) // 2
        oy = pic_box[1] + (bh - fitted.height) // 2
        ImageDraw.Draw(img).rectangle((ox - 2, oy - 2, ox + fitted.width + 1, oy + fitted.height + 1), fill=_BANNER_BG)
        img.paste(fitted, (ox, oy), fitted)
    else:
        text_box = (pad, banner + pad, w - pad, h - bar_h - pad)
    _draw_text_block(img, text_box, f"{caption}\n{prompt.strip() or '(no prompt)'}")
    ImageDraw.Draw(img).rectangle((0, h - bar_h, w, h), fill=(25, 25, 25))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _ffmpeg_args(
    out: str, size: tuple[int, int], duration: float, fps: int, audio: bool, bar_h: int, bar_rgb: tuple[int, int, int]
) -> list[str]:
    w, h = size
    colour = "0x{:02x}{:02x}{:02x}".format(*bar_rgb)
    graph = (
        f"[0:v]loop=loop=-1:size=1:start=0,setpts=N/({fps}*TB)[bg];"
        f"color=c={colour}:s={w}x{bar_h}:r={fps}[bar];"
        f"[bg][bar]overlay=x='main_w*t/{duration:.6f}-overlay_w':y={h - bar_h},format=yuv420p[v]"
    )
    maps = ["-map", "[v]"]
    codecs = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-r", str(fps)]
    if audio:
        fade = min(0.2, duration / 4)
        graph += (
            ";sine=f=220:r=48000,volume=0.05,aformat=channel_layouts=stereo,"
            f"afade=t=in:d={fade:.3f},afade=t=out:st={duration - fade:.3f}:d={fade:.3f}[a]"
        )
        maps += ["-map", "[a]"]
        codecs += ["-c:a", "aac", "-b:a", "64k"]
    return [
        "-y", "-f", "png_pipe", "-framerate", str(fps), "-i", "pipe:0",
        "-filter_complex", graph, *maps, "-t", f"{duration:.6f}", *codecs,
        "-movflags", "+faststart", "-f", "mp4", out,
    ]  # fmt: skip


async def render_video(
    dest: pathlib.Path,
    *,
    prompt: str,
    duration: float,
    aspect_ratio: str = "16:9",
    reference_image: bytes | None = None,
    generate_audio: bool = True,
    seed: int | None = None,
    fps: int = 24,
) -> None:
    """Atomically write a SANDBOX-labelled H.264/yuv420p MP4 of ``duration`` seconds to ``dest``.

    The frame shows the reference image (if decodable), the wrapped prompt and a progress bar
    that fills over the clip; ``generate_audio`` adds a quiet stereo AAC tone. Raises ValueError
    for bad arguments and RenderError if the destination is unwritable or ffmpeg fails. On any
    failure or cancellation ffmpeg is killed and the temporary file removed.
    """
    size = _size_for(aspect_ratio)
    if not duration > 0 or duration > 3600:
        raise ValueError(f"duration must be in (0, 3600] seconds, got {duration!r}")
    if not 1 <= fps <= 120:
        raise ValueError(f"fps must be in [1, 120], got {fps!r}")
    dest = pathlib.Path(dest)
    bar_h = max(4, size[1] // 45)
    tmp = temp_path(dest)
    try:  # reserve a unique temp name next to dest (normal umask-based permissions, unlike mkstemp)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as exc:
        raise RenderError(f"cannot write to {dest.parent}: {exc}") from exc
    try:
        caption = f"{duration:g}s · {aspect_ratio} · {'audio' if generate_audio else 'no audio'}"
        if seed is not None:
            caption += f" · seed {seed}"
        frame = await asyncio.to_thread(_compose_video_frame, size, prompt, seed, reference_image, caption, bar_h)
        args = _ffmpeg_args(str(tmp), size, duration, fps, generate_audio, bar_h, _palette(prompt, seed).accent)
        await _run_ffmpeg(args, tmp, dest, stdin=frame)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def _run_ffmpeg(args: list[str], tmp: pathlib.Path, dest: pathlib.Path, *, stdin: bytes | None = None) -> None:
    """Run ffmpeg (``args`` write ``tmp``; ``stdin`` fed to it) and move ``tmp`` onto ``dest``. ffmpeg is killed if
    the caller is canceled; RenderError with the end of its stderr if it fails. The caller removes ``tmp``."""
    try:
        await run_ffmpeg(args, stdin=stdin, limits=RENDER_LIMITS)
    except MediaError as exc:
        raise RenderError(str(exc)) from None
    os.replace(tmp, dest)


# --------------------------------------------------------------------------- lip sync

LIPSYNC_LABEL = "SANDBOX lip sync"


def lipsync_label_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where the label strip sits (x0, y0, x1, y1): across the frame, just above the progress bar of a sandbox clip."""
    w, h = size
    strip = max(18, min(w, h) // 10)
    bottom = h - max(4, h // 45) - max(2, h // 60)
    return 0, bottom - strip, w, bottom


def _lipsync_label(size: tuple[int, int]) -> bytes:
    """The yellow "SANDBOX lip sync" strip as a PNG the width of the frame."""
    x0, y0, x1, y1 = lipsync_label_box(size)
    img = Image.new("RGB", (x1 - x0, y1 - y0), _BANNER_BG)
    font = _font(int((y1 - y0) * 0.6))
    ImageDraw.Draw(img).text(((x1 - x0) // 2, (y1 - y0) // 2), LIPSYNC_LABEL, font=font, fill=_BANNER_FG, anchor="mm")
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _lipsync_timing(sync_mode: str, video_seconds: float, audio_seconds: float) -> tuple[float, str, bool]:
    """(output seconds, extra video filter, loop the video input) for a ``sync_mode`` of sync/lipsync-2-pro:
    ``cut_off`` ends with the shorter input, ``loop``/``bounce`` (simulated as a loop) and ``remap`` (the video
    retimed) last as long as the audio, ``silence`` as long as the longer input (the last frame held, audio padded)."""
    if sync_mode == "cut_off":
        return min(video_seconds, audio_seconds), "", False
    if sync_mode == "remap":
        return audio_seconds, f",setpts=PTS*{audio_seconds / video_seconds:.6f}", False
    if sync_mode == "silence":
        total = max(video_seconds, audio_seconds)
        hold = total - video_seconds
        return total, (f",tpad=stop_mode=clone:stop_duration={hold:.6f}" if hold > 0 else ""), False
    return audio_seconds, "", audio_seconds > video_seconds  # loop, bounce


async def render_lipsync(
    dest: pathlib.Path, *, video: pathlib.Path, audio: pathlib.Path, sync_mode: str = "loop", fps: int = 24
) -> None:
    """Atomically write the ``video`` clip with ``audio`` muxed in and a visible "SANDBOX lip sync" strip (H.264 +
    AAC MP4); its length follows ``sync_mode`` as the real model's does. RenderError if an input is unreadable."""
    dest = pathlib.Path(dest)
    v, a = await asyncio.gather(_probe(video), _probe(audio))
    if v.first_video is None or not (v.duration or 0) > 0:
        raise RenderError("the video input holds no video stream")
    if a.first_audio is None or not (a.duration or 0) > 0:
        raise RenderError("the audio input holds no audio stream")
    size = (v.first_video.width, v.first_video.height)
    total, retime, loop = _lipsync_timing(sync_mode, v.duration or 0, a.duration or 0)
    x0, y0, _, _ = lipsync_label_box(size)
    tmp = temp_path(dest)
    label = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.label.png")
    try:
        await asyncio.to_thread(label.write_bytes, await asyncio.to_thread(_lipsync_label, size))
        graph = (
            f"[0:v]fps={fps}{retime}[clip];[clip][2:v]overlay=x={x0}:y={y0},format=yuv420p[v];"
            "[1:a]aformat=channel_layouts=stereo,apad[a]"
        )
        args = [
            "-y", *(["-stream_loop", "-1"] if loop else []), "-i", str(video), "-i", str(audio),
            "-loop", "1", "-framerate", str(fps), "-i", str(label),
            "-filter_complex", graph, "-map", "[v]", "-map", "[a]", "-t", f"{total:.6f}",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-r", str(fps),
            "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", "-f", "mp4", str(tmp),
        ]  # fmt: skip
        await _run_ffmpeg(args, tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
        label.unlink(missing_ok=True)


# --------------------------------------------------------------------------- probing


async def _probe(path: pathlib.Path) -> MediaInfo:
    """An input of a lip sync described by :func:`mvserver.media.probe.probe`; RenderError if it cannot be read."""
    try:
        return await probe(path)
    except MediaTimeout as exc:
        raise RenderError(f"probing an input took too long: {exc}") from None
    except MediaError as exc:
        raise RenderError(f"cannot probe {path}: {exc}") from None
