"""Assembling clips into one video (:func:`assemble`).

Assembly with cuts stream-copies the video of every clip that is used whole and whose codec parameters match the
output (concat demuxer); only trimmed, rescaled or mismatching clips are re-encoded, each into its own segment.
Crossfades re-encode everything, piece by piece (:func:`mvserver.media.timeline.crossfade_pieces`): a clip's middle
alone, each join with ``xfade`` from the two clips it joins, so one ffmpeg decodes two clips at a time however many
there are; the pieces are then joined like cuts and the audio crossfaded (``acrossfade``). The audio track (the song,
clip audio, or silence) is AAC, so the output is H.264 + AAC in an MP4 with ``+faststart``: encoded in the final run,
or, for a cut-only edit of the song alone with the song's AAC copy made at upload
(:func:`mvserver.media.song.encode_song_copies`), copied from that copy packet by packet with only the faded last
second encoded again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mvserver.media.args import duration_arg, input_args, song_demuxer, song_input_args
from mvserver.media.errors import AssemblyInputError, MediaError, MediaTimeout
from mvserver.media.limits import DEFAULT_LIMITS, FfmpegLimits
from mvserver.media.probe import MediaInfo, VideoStream, probe, probe_clips
from mvserver.media.run import ProgressCallback, TempName, fsync_replace, run_ffmpeg
from mvserver.media.song import AAC_ARGS, AAC_FRAME_SECONDS, AUDIO_BITRATE, AUDIO_RATE, SongCopy
from mvserver.media.timeline import (
    ASPECT_TOLERANCE,
    Piece,
    check_graph_clips,
    crossfade_frames,
    crossfade_pieces,
    kept_frames,
    output_fps,
    output_frames,
)

Transition = Literal["cut", "crossfade"]


ClipAudio = Literal["drop", "keep", "mix"]


Fit = Literal["letterbox", "crop"]


SONG_FADE_SECONDS = 1.0


MIX_CLIP_VOLUME = 0.3  # clip audio "mixed under the song" sits about 10 dB below it


X264 = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20"]


@dataclass(frozen=True)
class Clip:
    """One clip of the edit: a file and the part of it to use (seconds; ``trim_out`` None means to the end)."""

    path: Path
    trim_in: float = 0.0
    trim_out: float | None = None


@dataclass
class AssemblyResult:
    path: Path
    duration: float  # the expected length: clip lengths after trims, minus crossfade overlaps
    copied: list[int] = field(default_factory=list)  # indices of clips whose video was stream-copied
    reencoded: list[int] = field(default_factory=list)  # indices of clips that were decoded and encoded again
    elapsed_seconds: float = 0.0
    # "copied": the song's AAC packets were copied (only the faded end encoded); "encoded": the audio was encoded
    audio: Literal["copied", "encoded"] = "encoded"


@dataclass
class _Source:
    index: int
    clip: Clip
    info: MediaInfo
    video: VideoStream
    length: float  # measured video length of the whole file
    start: float  # trim in, snapped to a frame
    frames: int  # frames used after trims

    @property
    def duration(self) -> float:
        return self.frames / (self.video.fps or 24.0)

    @property
    def trimmed(self) -> bool:
        return self.start > 0 or self.frames < round(self.length * (self.video.fps or 24.0))


async def _load_sources(clips: Sequence[Clip]) -> list[_Source]:
    try:
        described = await probe_clips([clip.path for clip in clips])
    except MediaTimeout:
        raise
    except MediaError:
        described = None
    if described is None or any(info.first_video is None or frames < 1 for info, frames in described):
        for index, clip in enumerate(clips):  # find the clip to blame, one at a time
            name = f"clips[{index}]"
            try:
                info = await probe(clip.path)
            except MediaError as exc:
                raise AssemblyInputError(name, f"{name} is not a readable video: {exc}") from None
            if info.first_video is None:
                raise AssemblyInputError(name, f"{name} has no video stream")
        raise MediaError("ffmpeg could not read the clips together")
    first = described[0][0].first_video
    assert first is not None
    out_fps = output_fps(first)
    return [
        _source(i, clip, info, frames, out_fps)
        for i, (clip, (info, frames)) in enumerate(zip(clips, described, strict=False))
    ]


def _source(index: int, clip: Clip, info: MediaInfo, frame_count: int, out_fps: float) -> _Source:
    """Check a clip's trims against its measured length; snap them to whole frames."""
    name = f"clips[{index}]"
    video = info.first_video
    assert video is not None
    fps = video.fps or 24.0
    try:
        first, frames = kept_frames(clip.trim_in, clip.trim_out, frame_count, fps, out_fps)
    except AssemblyInputError as exc:
        raise AssemblyInputError(f"{name}.{exc.field}", f"{name}.{exc}") from None
    return _Source(index, clip, info, video, frame_count / fps, first / fps, frames)


def _fit_filter(source: VideoStream, width: int, height: int, fit: Fit | None) -> str:
    """Scale a clip to the output size; letterbox or crop when its aspect ratio differs."""
    if (source.width, source.height, source.sar) == (width, height, (1, 1)):
        return "setsar=1"
    if abs(source.aspect - width / height) <= ASPECT_TOLERANCE or fit is None:
        return f"scale={width}:{height},setsar=1"
    if fit == "letterbox":
        return (
            f"scale={width}:{height}:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2,setsar=1"
        )
    return f"scale={width}:{height}:force_original_aspect_ratio=increase,crop={width}:{height},setsar=1"


def _check_aspects(sources: list[_Source], fit: Fit | None) -> None:
    target = sources[0].video.aspect
    for source in sources[1:]:
        if fit is None and abs(source.video.aspect - target) > ASPECT_TOLERANCE:
            v = source.video
            raise AssemblyInputError(
                f"clips[{source.index}]",
                f"clips[{source.index}] is {v.width}x{v.height}, a different aspect ratio from clips[0] "
                f"({sources[0].video.width}x{sources[0].video.height}); pass fit letterbox or crop",
            )


def _audio_graph(
    sources: list[_Source],
    first_input: int,
    song_input: int | None,
    total: float,
    clip_audio: ClipAudio,
    crossfade: float | None,
) -> str:
    """The filter graph that ends in ``[aout]``: song, clip audio or silence, at 48 kHz stereo, ``total`` long."""
    fmt = f"aresample={AUDIO_RATE},aformat=sample_fmts=fltp:sample_rates={AUDIO_RATE}:channel_layouts=stereo"
    parts: list[str] = []
    tracks: list[str] = []
    if clip_audio != "drop":
        labels = []
        for n, source in enumerate(sources):
            d = source.duration
            if source.info.first_audio is not None:
                parts.append(
                    f"[{first_input + n}:a:0]{fmt},atrim=start={source.start:.6f},asetpts=PTS-STARTPTS,"
                    f"apad,atrim=end={duration_arg(d)}[ca{n}]"
                )
            else:
                parts.append(
                    f"anullsrc=r={AUDIO_RATE}:cl=stereo,aformat=sample_fmts=fltp,atrim=end={duration_arg(d)}[ca{n}]"
                )
            labels.append(f"[ca{n}]")
        if crossfade:
            current = labels[0]
            for n, label in enumerate(labels[1:], 1):
                parts.append(f"{current}{label}acrossfade=d={duration_arg(crossfade)}[cx{n}]")
                current = f"[cx{n}]"
            parts.append(f"{current}anull[clipmix]")
        else:
            parts.append(f"{''.join(labels)}concat=n={len(labels)}:v=0:a=1[clipmix]")
        volume = MIX_CLIP_VOLUME if clip_audio == "mix" and song_input is not None else 1.0
        parts.append(f"[clipmix]volume={volume}[clips]")
        tracks.append("[clips]")
    if song_input is not None:
        fade = min(SONG_FADE_SECONDS, total / 4)
        parts.append(
            f"[{song_input}:a:0]{fmt},apad,atrim=end={duration_arg(total)},"
            f"afade=t=out:st={total - fade:.6f}:d={duration_arg(fade)}[song]"
        )
        tracks.insert(0, "[song]")
    if not tracks:
        parts.append(f"anullsrc=r={AUDIO_RATE}:cl=stereo,atrim=end={duration_arg(total)}[aout]")
    elif len(tracks) == 1:
        parts.append(f"{tracks[0]}anull[aout]")
    else:
        parts.append(f"{''.join(tracks)}amix=inputs=2:duration=first:normalize=0,atrim=end={duration_arg(total)}[aout]")
    return ";".join(parts)


def _audio_inputs(sources: list[_Source], clip_audio: ClipAudio) -> list[str]:
    return [arg for s in sources for arg in ("-i", str(s.clip.path))] if clip_audio != "drop" else []


def _song_inputs(song: Path | None, offset: float) -> list[str]:
    return ["-ss", f"{offset:.6f}", *song_input_args(song)] if song is not None else []


OUTPUT_ARGS = ["-c:a", "aac", "-b:a", AUDIO_BITRATE, "-movflags", "+faststart", "-f", "mp4"]


@dataclass(frozen=True)
class _Runner:
    """How every ffmpeg of one assembly runs: its limits, the descriptors it inherits (the job's run lock), and how
    the temporaries it writes are named (the caller's rule)."""

    temp: TempName
    limits: FfmpegLimits = DEFAULT_LIMITS
    hold: tuple[int, ...] = ()

    async def __call__(self, args: Sequence[str], *, duration: float, progress: ProgressCallback | None) -> None:
        await run_ffmpeg(args, duration=duration, progress=progress, limits=self.limits, hold=self.hold)


def _target(first: VideoStream) -> VideoStream:
    """The output's video parameters: the first clip's when they can be copied, else H.264 yuv420p of its size."""
    if first.codec == "h264" and first.pix_fmt == "yuv420p" and first.fps and first.sar == (1, 1):
        return first
    return VideoStream(
        0, "h264", "High", first.width, first.height, "yuv420p", first.fps or 24.0, first.time_base or "1/12288"
    )


def _segment_output(target: VideoStream, frames: int, dest: Path) -> list[str]:
    """Output arguments of a video-only segment the concat demuxer can join to others made alike."""
    fps = target.fps or 24.0
    args = ["-an", "-sn", "-dn", "-frames:v", str(frames), *X264, "-pix_fmt", target.pix_fmt, "-r", f"{fps:g}"]
    if target.timescale:
        args += ["-video_track_timescale", str(target.timescale)]
    return [*args, "-f", "mp4", "-y", str(dest)]


async def _encode_segment(
    source: _Source, dest: Path, target: VideoStream, fit: Fit | None, progress: ProgressCallback | None, run: _Runner
) -> None:
    """Re-encode one clip's used part into a video-only segment the concat demuxer can join to copied clips."""
    fps = target.fps or 24.0
    vf = f"{_fit_filter(source.video, target.width, target.height, fit)},fps={fps:g},format={target.pix_fmt}"
    args = [
        "-ss",
        f"{source.start:.6f}",
        "-i",
        str(source.clip.path),
        "-map",
        "0:v:0",
        "-vf",
        vf,
        *_segment_output(target, source.frames, dest),
    ]
    await run(args, duration=source.duration, progress=progress)


def _quoted(path: Path) -> str:
    """A path as an ffconcat ``file`` line takes it (single-quoted, quotes escaped)."""
    return "'" + str(path).replace("'", "'\\''") + "'"


def _concat_list(entries: list[tuple[Path, float]]) -> str:
    return "ffconcat version 1.0\n" + "".join(f"file {_quoted(p)}\nduration {duration_arg(d)}\n" for p, d in entries)


class _Progress:
    """Maps the progress of each ffmpeg step onto one 0..1 fraction, weighted by the work each step does."""

    def __init__(self, callback: ProgressCallback | None, weights: list[float]):
        self.callback, self.weights = callback, weights
        self.total = sum(weights) or 1.0

    def step(self, n: int) -> ProgressCallback | None:
        if self.callback is None:
            return None
        before = sum(self.weights[:n])
        callback = self.callback
        return lambda f: callback(min(1.0, (before + f * self.weights[n]) / self.total))


async def _song_audio_list(
    song: SongCopy, offset: float, total: float, out: Path, temps: list[Path], run: _Runner
) -> Path | None:
    """An ffconcat list of the song's audio under a cut-only video: the AAC copy's packets from ``offset`` up to
    the fade (a packet boundary), then the rest, faded out (and padded with silence where the song ends first),
    decoded from the copy and encoded again. The copied part starts with the packet that holds ``offset`` (at most
    one 21 ms AAC frame early), and the encoded part begins with the encoder's one frame of priming: that is all
    the seam costs. None when the song ends before the fade (it is then encoded whole, padded)."""
    fade = min(SONG_FADE_SECONDS, total / 4)
    first = math.floor(offset / AAC_FRAME_SECONDS + 1e-9)
    split = max(first + 1, round((offset + total - fade) / AAC_FRAME_SECONDS)) * AAC_FRAME_SECONDS
    end = offset + total
    if split > song.duration:
        return None
    tail = run.temp(out, "tail")
    temps.append(tail)
    if split < end - 1e-6:
        await run(
            [
                "-ss",
                f"{split:.6f}",
                *input_args(song.path, ["mov"]),
                "-t",
                duration_arg(end - split),
                "-map",
                "0:a:0",
                "-af",
                f"afade=t=out:st=0:d={duration_arg(end - split)},apad",
                *AAC_ARGS,
                "-f",
                "mp4",
                "-y",
                str(tail),
            ],
            duration=end - split,
            progress=None,
        )
    listing = run.temp(out, "audiolist")
    temps.append(listing)
    text = f"ffconcat version 1.0\nfile {_quoted(song.path)}\ninpoint {offset:.6f}\noutpoint {min(split, end):.6f}\n"
    if split < end - 1e-6:
        text += f"file {_quoted(tail)}\n"
    await asyncio.to_thread(listing.write_text, text)
    return listing


async def _final_run(
    sources: list[_Source],
    entries: list[tuple[Path, float]],
    tmp: Path,
    out: Path,
    song: Path | None,
    song_offset: float,
    clip_audio: ClipAudio,
    crossfade: float | None,
    total: float,
    progress: ProgressCallback | None,
    run: _Runner,
    temps: list[Path],
) -> None:
    """The video segments joined by the concat demuxer (copied) and the audio track encoded: the song, the clips'
    audio (cut to each clip's used part, joined by concat or acrossfade) or silence."""
    listing = run.temp(out, "list")
    temps.append(listing)
    await asyncio.to_thread(listing.write_text, _concat_list(entries))
    song_input = 1 if song is not None else None
    first_clip_input = 2 if song is not None else 1
    graph = _audio_graph(sources, first_clip_input, song_input, total, clip_audio, crossfade)
    args = [
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(listing),
        *_song_inputs(song, song_offset),
        *_audio_inputs(sources, clip_audio),
        "-filter_complex",
        graph,
        "-map",
        "0:v:0",
        "-map",
        "[aout]",
        "-c:v",
        "copy",
        *OUTPUT_ARGS,
        "-t",
        duration_arg(total),
        "-y",
        str(tmp),
    ]
    await run(args, duration=total, progress=progress)


async def _assemble_cuts(
    sources: list[_Source],
    tmp: Path,
    out: Path,
    song: Path | None,
    song_offset: float,
    clip_audio: ClipAudio,
    fit: Fit | None,
    progress: ProgressCallback | None,
    result: AssemblyResult,
    temps: list[Path],
    run: _Runner,
    song_copy: SongCopy | None = None,
) -> None:
    # The output takes the first clip's parameters; clips that differ are encoded to match them.
    target = _target(sources[0].video)
    copyable = [not s.trimmed and s.video.copy_key() == target.copy_key() for s in sources]
    encode = [s for s, ok in zip(sources, copyable, strict=False) if not ok]
    total = sum(s.duration for s in sources)
    tracker = _Progress(progress, [4 * s.duration for s in encode] + [total])
    entries: list[tuple[Path, float]] = []
    segments: dict[int, Path] = {}
    for n, source in enumerate(encode):
        segments[source.index] = segment = run.temp(out, f"seg{source.index}")
        temps.append(segment)
        await _encode_segment(source, segment, target, fit, tracker.step(n), run)
    for source, ok in zip(sources, copyable, strict=False):
        entries.append((source.clip.path if ok else segments[source.index], source.duration))
        (result.copied if ok else result.reencoded).append(source.index)
    audio_list = None
    if song_copy is not None and clip_audio == "drop":
        audio_list = await _song_audio_list(song_copy, song_offset, total, out, temps, run)
    if audio_list is None:
        await _final_run(
            sources,
            entries,
            tmp,
            out,
            song,
            song_offset,
            clip_audio,
            None,
            total,
            tracker.step(len(encode)),
            run,
            temps,
        )
        return
    listing = run.temp(out, "list")
    temps.append(listing)
    await asyncio.to_thread(listing.write_text, _concat_list(entries))
    args = [
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(listing),
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
        str(audio_list),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        "-c",
        "copy",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        "-t",
        duration_arg(total),
        "-y",
        str(tmp),
    ]
    await run(args, duration=total, progress=tracker.step(len(encode)))
    result.audio = "copied"


def _output_frames(source: _Source, fps: float) -> int:
    return output_frames(source.duration, fps)


async def _encode_piece(
    piece: Piece,
    sources: list[_Source],
    dest: Path,
    target: VideoStream,
    fit: Fit | None,
    fade: int,
    progress: ProgressCallback | None,
    run: _Runner,
) -> None:
    """One piece of a crossfade, video only: its clips trimmed at input, fitted, resampled to the output's frame rate
    and chained with ``xfade``."""
    fps = target.fps or 24.0
    inputs: list[str] = []
    chains: list[str] = []
    for n, (k, begin, count) in enumerate(piece.parts):
        source = sources[k]
        inputs += [
            "-ss",
            f"{source.start + begin / fps:.6f}",
            "-t",
            duration_arg((count + 1) / fps),
            "-i",
            str(source.clip.path),
        ]
        chains.append(
            f"[{n}:v:0]{_fit_filter(source.video, target.width, target.height, fit)},fps={fps:g},"
            f"format={target.pix_fmt},trim=end_frame={count},setpts=PTS-STARTPTS,settb=AVTB[v{n}]"
        )
    current, length = "[v0]", piece.parts[0][2]
    for n, (_, _, count) in enumerate(piece.parts[1:], 1):
        chains.append(
            f"{current}[v{n}]xfade=transition=fade:duration={duration_arg(fade / fps)}:"
            f"offset={(length - fade) / fps:.6f}[x{n}]"
        )
        current, length = f"[x{n}]", length + count - fade
    chains.append(f"{current}null[vout]")
    args = [
        *inputs,
        "-filter_complex",
        ";".join(chains),
        "-map",
        "[vout]",
        *_segment_output(target, piece.frames, dest),
    ]
    await run(args, duration=piece.frames / fps, progress=progress)


async def _assemble_crossfade(
    sources: list[_Source],
    tmp: Path,
    out: Path,
    song: Path | None,
    song_offset: float,
    fade: int,
    clip_audio: ClipAudio,
    fit: Fit | None,
    progress: ProgressCallback | None,
    result: AssemblyResult,
    temps: list[Path],
    run: _Runner,
) -> float:
    """Crossfades piece by piece (:func:`crossfade_pieces`), each piece encoded on its own; the pieces are joined by
    the concat demuxer (copied) in the final run, which also encodes the audio with ``acrossfade`` joins."""
    first = _target(sources[0].video)
    fps = output_fps(sources[0].video)
    target = VideoStream(0, "h264", "High", first.width, first.height, "yuv420p", fps, first.time_base or "1/12288")
    frames = [_output_frames(s, fps) for s in sources]
    pieces = crossfade_pieces(frames, fade)
    total_frames = sum(frames) - (len(frames) - 1) * fade
    length = total_frames / fps
    tracker = _Progress(progress, [4 * piece.frames / fps for piece in pieces] + [length])
    entries: list[tuple[Path, float]] = []
    for n, piece in enumerate(pieces):
        segment = run.temp(out, f"piece{n}")
        temps.append(segment)
        await _encode_piece(piece, sources, segment, target, fit, fade, tracker.step(n), run)
        entries.append((segment, piece.frames / fps))
    await _final_run(
        sources,
        entries,
        tmp,
        out,
        song,
        song_offset,
        clip_audio,
        fade / fps,
        length,
        tracker.step(len(pieces)),
        run,
        temps,
    )
    result.reencoded.extend(s.index for s in sources)
    return length


async def assemble(
    clips: Sequence[Clip],
    out: Path,
    *,
    temp_name: TempName,
    song: Path | None = None,
    song_offset: float = 0.0,
    transition: Transition = "cut",
    crossfade_seconds: float = 0.5,
    clip_audio: ClipAudio = "drop",
    fit: Fit | None = None,
    progress: ProgressCallback | None = None,
    limits: FfmpegLimits = DEFAULT_LIMITS,
    hold: Sequence[int] = (),
    graph_clips_max: int | None = None,
    song_copy: SongCopy | None = None,
) -> AssemblyResult:
    """Join ``clips`` into one H.264 + AAC MP4 at ``out`` (written atomically); return what was done.

    ``song_copy``: the song's AAC copy. A cut-only edit with the song alone (``clip_audio`` drop) that the song
    covers then copies its packets instead of encoding the song (``result.audio`` says which was done).

    Every ffmpeg runs within ``limits`` and inherits ``hold`` (see :func:`run_lock`); a crossfade whose pieces would
    decode more than ``graph_clips_max`` clips in one filter graph is refused. Raises AssemblyInputError (with
    ``field``) for input that does not fit the clips, MediaError when ffmpeg fails (MediaTimeout, MediaMemoryError).
    Cancelling the task kills ffmpeg and removes every temporary file (each named by ``temp_name``, next to ``out``).
    """
    started = time.monotonic()
    if not clips:
        raise AssemblyInputError("clips", "clips must hold at least one clip")
    if transition not in ("cut", "crossfade"):
        raise AssemblyInputError("transition", "transition must be cut or crossfade")
    if clip_audio not in ("drop", "keep", "mix"):
        raise AssemblyInputError("clip_audio", "clip_audio must be drop, keep or mix")
    if fit not in (None, "letterbox", "crop"):
        raise AssemblyInputError("fit", "fit must be null, letterbox or crop")
    if song is None and song_copy is not None:
        song = song_copy.path
    sources = await _load_sources(clips)
    _check_aspects(sources, fit)
    if song is not None and not (song_copy is not None and transition == "cut" and clip_audio == "drop"):
        await _check_song(song, song_offset)
    elif song_copy is not None and not 0 <= song_offset < song_copy.duration:
        raise AssemblyInputError("song_offset", f"song_offset must be in [0, {song_copy.duration:.3f}) seconds")
    result = AssemblyResult(path=out, duration=0.0)
    run = _Runner(temp_name, limits, tuple(hold))
    tmp = run.temp(out, "out")
    temps = [tmp]
    try:
        if transition == "crossfade" and len(sources) > 1:
            fps = output_fps(sources[0].video)
            fade = crossfade_frames(crossfade_seconds, fps)
            frames = [_output_frames(s, fps) for s in sources]
            if not fade < min(frames):
                raise AssemblyInputError(
                    "crossfade_seconds",
                    f"crossfade_seconds must be below the shortest clip ({min(frames) / fps:.3f} s)",
                )
            if graph_clips_max is not None:
                check_graph_clips(frames, fade, graph_clips_max)
            result.duration = await _assemble_crossfade(
                sources, tmp, out, song, song_offset, fade, clip_audio, fit, progress, result, temps, run
            )
        else:
            result.duration = sum(s.duration for s in sources)
            await _assemble_cuts(
                sources, tmp, out, song, song_offset, clip_audio, fit, progress, result, temps, run, song_copy
            )
        await asyncio.to_thread(fsync_replace, tmp, out)
    finally:
        for path in temps:
            path.unlink(missing_ok=True)
    result.elapsed_seconds = round(time.monotonic() - started, 3)
    return result


async def _check_song(song: Path, offset: float) -> None:
    try:
        info = await probe(song, demuxers=[song_demuxer(song)])
    except MediaError as exc:
        raise AssemblyInputError("song", f"song is not a readable audio file: {exc}") from None
    if info.first_audio is None:
        raise AssemblyInputError("song", "song has no audio stream")
    if offset < 0 or (info.duration is not None and offset >= info.duration):
        raise AssemblyInputError("song_offset", f"song_offset must be in [0, {info.duration or 0:.3f}) seconds")
