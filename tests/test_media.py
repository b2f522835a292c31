"""The ffmpeg toolkit against real files: sandbox-rendered clips, lavfi songs, the bundled ffmpeg."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import signal
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import HOLDER, exited, proc_limit
from PIL import Image

from mvserver.core.artefacts import temp_path
from mvserver.media import assemble as assembling
from mvserver.media.args import AUDIO_DEMUXERS, duration_arg, input_args, song_demuxer
from mvserver.media.assemble import AssemblyResult, Clip
from mvserver.media.errors import AssemblyInputError, DurationError, MediaError, MediaMemoryError, MediaTimeout
from mvserver.media.limits import DEFAULT_LIMITS, FfmpegLimits
from mvserver.media.probe import MediaInfo, probe, probe_and_write, probe_clips, stream_duration
from mvserver.media.run import ffmpeg_exe, run_ffmpeg, run_lock
from mvserver.media.song import AAC_FRAME_SECONDS, SongCopy
from mvserver.media.song import encode_song_copies as encode_copies
from mvserver.media.timeline import check_graph_clips, crossfade_pieces, graph_clips
from mvserver.sandbox.render import render_video

FPS = 24


async def assemble(clips: list[Clip], out: Path, **options: Any) -> AssemblyResult:
    """:func:`mvserver.media.assemble.assemble` naming its temporaries as the service does."""
    return await assembling.assemble(clips, out, temp_name=temp_path, **options)


async def encode_song_copies(song: Path, aac: Path, preview: Path, **options: Any) -> None:
    """:func:`mvserver.media.song.encode_song_copies` naming its temporaries as the service does."""
    await encode_copies(song, aac, preview, temp_name=temp_path, **options)


def ffmpeg(*args: str) -> str:
    proc = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.decode()


def make_song(path: Path, seconds: float, rate: int = 44100) -> Path:
    ffmpeg("-f", "lavfi", "-i", f"sine=f=330:d={seconds}:r={rate}", "-ac", "2", str(path))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sandbox clips: two 16:9 with audio (6 s, 4 s), one 16:9 without audio (4 s), one 9:16 (4 s)."""
    root = tmp_path_factory.mktemp("clips")
    specs = {"a": (6, "16:9", True), "b": (4, "16:9", True), "silent": (4, "16:9", False), "tall": (4, "9:16", True)}

    async def render() -> None:
        await asyncio.gather(
            *(
                render_video(
                    root / f"{name}.mp4", prompt=f"clip {name}", duration=d, aspect_ratio=ar, generate_audio=audio
                )
                for name, (d, ar, audio) in specs.items()
            )
        )

    asyncio.run(render())
    return {name: root / f"{name}.mp4" for name in specs}


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_song(tmp_path_factory.mktemp("song") / "song.mp3", 30)


def packet_hashes(path: Path, stream: str = "v:0") -> list[str]:
    """One hash per video packet as stored (stream copy): equal lists mean byte-identical video.

    The concat demuxer repeats the parameter sets (SPS/PPS) in the first keyframe of each file, so both sides are
    put in Annex B form, which has them in every keyframe, before hashing.
    """
    out = ffmpeg(
        "-i", str(path), "-map", f"0:{stream}", "-c", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "framemd5", "-"
    )
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines() if line and not line.startswith("#")]


def top_level_boxes(path: Path) -> list[str]:
    names, data = [], path.read_bytes()
    offset = 0
    while offset + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        names.append(name.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return names


async def check_output(path: Path, expected: float) -> MediaInfo:
    """H.264 + AAC, moov before mdat, and both streams within 0.1 s of ``expected``."""
    info = await probe(path)
    assert info.first_video is not None and info.first_video.codec == "h264"
    assert info.first_audio is not None and info.first_audio.codec == "aac"
    assert info.duration is not None and abs(info.duration - expected) <= 0.1, (info.duration, expected)
    video = await stream_duration(path, "v:0", fps=info.first_video.fps)
    audio = await stream_duration(path, "a:0", decode=True)
    assert abs(video - expected) <= 0.1 and abs(audio - expected) <= 0.1, (video, audio, expected)
    boxes = top_level_boxes(path)
    assert boxes.index("moov") < boxes.index("mdat")  # +faststart
    return info


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# -- probe ---------------------------------------------------------------------------------------------------------


async def test_probe_describes_a_sandbox_clip(clips: dict[str, Path]) -> None:
    info = await probe(clips["a"])
    assert info.container.startswith("mov,mp4") and info.duration == pytest.approx(6.0, abs=0.05)
    video = info.first_video
    assert video is not None
    assert (video.codec, video.width, video.height, video.pix_fmt, video.fps) == ("h264", 640, 360, "yuv420p", 24.0)
    assert video.time_base == "1/12288" and video.sar == (1, 1) and video.aspect == pytest.approx(16 / 9)
    audio = info.first_audio
    assert audio is not None and (audio.codec, audio.sample_rate, audio.channels) == ("aac", 48000, 2)
    assert (await probe(clips["silent"])).audio == ()
    assert await stream_duration(clips["a"], "v:0", fps=video.fps) == pytest.approx(6.0)


async def test_probe_and_write_reads_as_probe_does_and_writes_its_output(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    frame = tmp_path / "frame.png"
    info, failure = await probe_and_write(clips["a"], ["-map", "0:v:0", "-frames:v", "1", "-y", str(frame)])
    assert failure is None and info == await probe(clips["a"])
    assert Image.open(frame).size == (640, 360)
    # an output that cannot be written: the input is still described, and the failure says why
    missing = tmp_path / "missing.png"
    info, failure = await probe_and_write(clips["silent"], ["-map", "0:a:0", "-y", str(missing)], demuxers=["mov"])
    assert info == await probe(clips["silent"]) and failure is not None and "0:a:0" in failure
    assert not missing.exists()
    notes = tmp_path / "notes.mp4"
    notes.write_text("this is text with an .mp4 name\n" * 100)
    with pytest.raises(MediaError):
        await probe_and_write(notes, ["-map", "0:v:0", "-y", str(missing)], demuxers=["mov"])


@pytest.mark.parametrize(
    ("layout", "channels"), [("mono", 1), ("stereo", 2), ("5.1(side)", 6), ("7.1", 8), ("24 channels", 24), ("quad", 4)]
)
async def test_probe_counts_channels(tmp_path: Path, layout: str, channels: int) -> None:
    path = tmp_path / "tone.wav"
    if layout.endswith("channels"):
        inputs = [arg for _ in range(channels) for arg in ("-f", "lavfi", "-i", "sine=d=0.2")]
        ffmpeg(*inputs, "-filter_complex", f"amerge=inputs={channels}", str(path))
    else:
        ffmpeg("-f", "lavfi", "-i", "sine=d=0.2", "-af", f"aformat=channel_layouts={layout}", str(path))
    audio = (await probe(path)).first_audio
    assert audio is not None and audio.channels == channels


async def test_stream_lines_hidden_in_metadata_are_not_streams(tmp_path: Path) -> None:
    path = tmp_path / "tagged.mp3"
    fake = "x\n  Stream #0:7: Video: h264 (High), yuv420p, 7680x4320, 60 fps, 90k tbn\n  Duration: 99:00:00.00"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-metadata", f"title={fake}", str(path))
    info = await probe(path)
    assert info.video == () and len(info.audio) == 1
    assert info.duration == pytest.approx(1.0, abs=0.1)


async def test_probe_rejects_what_is_not_media(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp3"
    path.write_text("this is text with an .mp3 name\n" * 100)
    with pytest.raises(MediaError):
        await probe(path)


def ffconcat_naming(listing: Path, target: Path) -> Path:
    """A file with a song's name whose content is an ffconcat list naming another file beside it."""
    listing.write_text(f"ffconcat version 1.0\nfile {target.name}\n")
    return listing


async def test_a_client_file_is_read_only_with_an_allowed_demuxer_and_never_opens_another(tmp_path: Path) -> None:
    sibling = make_song(tmp_path / "sibling.mp3", 3)
    listing = ffconcat_naming(tmp_path / "upload.part", sibling)
    assert (await probe(listing)).container == "concat"  # what an unrestricted read does: it opens the sibling
    with pytest.raises(MediaError):
        await probe(listing, demuxers=AUDIO_DEMUXERS)
    with pytest.raises(MediaError):
        await stream_duration(listing, "a:0", decode=True, demuxers=AUDIO_DEMUXERS)
    fake_song = ffconcat_naming(tmp_path / "fake.mp3", sibling)  # read as mp3, as every read of a saved song is
    with pytest.raises(MediaError):
        await stream_duration(fake_song, "a:0", decode=True, demuxers=[song_demuxer(fake_song)])
    info = await probe(sibling, demuxers=AUDIO_DEMUXERS)  # a real song still reads
    assert info.container == "mp3" and info.duration == pytest.approx(3.0, abs=0.1)
    args = input_args(sibling, ["mp3"])
    assert args[:6] == ["-protocol_whitelist", "file", "-format_whitelist", "mp3", "-f", "mp3"]
    with pytest.raises(MediaError):
        input_args(sibling, ["concat"])


def test_a_duration_that_rounds_to_zero_is_never_formatted() -> None:
    assert duration_arg(0.5) == "0.500000" and duration_arg(1e-6) == "0.000001"
    for bad in (1e-9, 4e-7, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DurationError):
            duration_arg(bad)


async def test_an_assembly_song_that_names_another_file_is_refused(clips: dict[str, Path], tmp_path: Path) -> None:
    fake_song = ffconcat_naming(tmp_path / "song.mp3", make_song(tmp_path / "other.mp3", 10))
    with pytest.raises(AssemblyInputError) as error:
        await assemble([Clip(clips["b"])], tmp_path / "out.mp4", song=fake_song)
    assert error.value.field == "song"
    assert not (tmp_path / "out.mp4").exists()


# -- run_ffmpeg ----------------------------------------------------------------------------------------------------


async def test_run_ffmpeg_reports_progress_up_to_one(tmp_path: Path) -> None:
    seen: list[float] = []
    await run_ffmpeg(
        [
            "-f",
            "lavfi",
            "-i",
            "testsrc=d=3:s=160x90:r=24",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-y",
            str(tmp_path / "t.mp4"),
        ],
        duration=3.0,
        progress=seen.append,
    )
    assert seen and seen[-1] == 1.0 and seen == sorted(seen) and all(0 <= f <= 1 for f in seen)
    assert (await probe(tmp_path / "t.mp4")).duration == pytest.approx(3.0, abs=0.05)


async def test_run_ffmpeg_failure_carries_ffmpeg_words(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="No such file"):
        await run_ffmpeg(["-i", str(tmp_path / "missing.mp4"), "-f", "null", "-"])


async def test_run_ffmpeg_feeds_stdin_and_stops_feeding_an_ffmpeg_that_failed(tmp_path: Path) -> None:
    """The sandbox renderer pipes its frame in: the bytes reach ffmpeg, and an ffmpeg that stops reading (here it
    fails on the first bytes of 64 MiB, far more than a pipe holds) ends the run with its error, not a hang."""
    frame = io.BytesIO()
    Image.new("RGB", (64, 36), (200, 30, 30)).save(frame, "PNG")
    out = tmp_path / "still.mp4"
    args = ["-f", "png_pipe", "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4", "-y", str(out)]
    await run_ffmpeg(args, stdin=frame.getvalue())
    described = (await probe(out)).first_video
    assert described is not None and (described.width, described.height) == (64, 36)
    async with asyncio.timeout(30):
        with pytest.raises(MediaError, match="exited with status"):
            await run_ffmpeg(args, stdin=b"not a png" * (64 << 17))


def ffmpeg_processes(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "stat").read_text()
            except OSError:
                continue
            if marker.encode() in cmdline and ") Z" not in status:
                found.append(int(entry.name))
    return found


async def test_cancel_kills_ffmpeg_and_leaves_no_process(tmp_path: Path) -> None:
    marker = f"cancel-{uuid.uuid4().hex}"
    out = tmp_path / f"{marker}.mp4"
    started = asyncio.Event()

    def seen(fraction: float) -> None:
        started.set()

    task = asyncio.ensure_future(
        run_ffmpeg(
            [
                "-re",
                "-f",
                "lavfi",
                "-i",
                "testsrc=d=600:s=160x90:r=10",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-y",
                str(out),
            ],
            duration=600,
            progress=seen,
        )
    )
    async with asyncio.timeout(20):
        await started.wait()
    assert ffmpeg_processes(marker), "ffmpeg should be running"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ffmpeg_processes(marker) == []


async def test_a_timeout_kills_ffmpeg(tmp_path: Path) -> None:
    marker = f"timeout-{uuid.uuid4().hex}"
    with pytest.raises(MediaTimeout):
        await run_ffmpeg(
            [
                "-re",
                "-f",
                "lavfi",
                "-i",
                "testsrc=d=600:s=160x90:r=10",
                "-f",
                "null",
                "-metadata",
                f"comment={marker}",
                "-",
            ],
            timeout=0.5,
        )
    assert ffmpeg_processes(marker) == []


# -- limits: what one ffmpeg may use, and its life ----------------------------------------------------------------

PROJECT = Path(__file__).resolve().parent.parent
SLOW = ["-re", "-f", "lavfi", "-i", "testsrc=d=600:s=160x90:r=10"]  # runs for 10 minutes unless stopped


def children_of(parent: int, marker: str) -> list[int]:
    """Live processes started by ``parent`` whose command line contains ``marker``."""
    return [
        pid
        for pid in ffmpeg_processes(marker)
        if int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]) == parent
    ]


async def test_every_ffmpeg_runs_within_its_memory_thread_and_stack_limits(tmp_path: Path) -> None:
    marker = f"limits-{uuid.uuid4().hex}"
    started = asyncio.Event()
    task = asyncio.ensure_future(
        run_ffmpeg(
            [*SLOW, "-vf", "scale=320:180", "-metadata", f"comment={marker}", "-f", "null", "-"],
            duration=600,
            progress=lambda _: started.set(),
            limits=FfmpegLimits(memory_mb=300, threads=1),
        )
    )
    try:
        async with asyncio.timeout(20):
            await started.wait()
        [pid] = children_of(os.getpid(), marker)
        assert proc_limit(pid, "Max data size") == (str(300 << 20),) * 2
        assert proc_limit(pid, "Max stack size")[0] == str(2 << 20)  # thread stacks of 2 MiB, not 8
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert args[args.index("-i") - 2 : args.index("-i")] == ["-threads", "1"]  # the input's decoder
        assert args[-4:-1] == ["-threads", "1", "-"]  # the encoder: -threads right before the output
        assert {"-filter_threads", "-filter_complex_threads"} <= set(args)
        assert args[args.index("-filter_threads") + 1] == "1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_ffmpeg_out_of_memory_is_a_memory_error(tmp_path: Path) -> None:
    with pytest.raises(MediaMemoryError, match="limit of 64 MiB"):
        await run_ffmpeg(
            ["-f", "lavfi", "-i", "testsrc=d=2:s=1920x1080:r=24", "-c:v", "libx264", "-y", str(tmp_path / "big.mp4")],
            duration=2,
            limits=FfmpegLimits(memory_mb=64),
        )


async def test_the_time_limit_grows_with_the_output_and_kills_ffmpeg() -> None:
    limits = FfmpegLimits(timeout_base_seconds=0.2, timeout_seconds_per_output_second=0.1)
    assert limits.timeout(3.0) == pytest.approx(0.5) and limits.timeout(None) is None
    assert FfmpegLimits().timeout(100.0) is None  # no base: no time limit
    marker = f"slow-{uuid.uuid4().hex}"
    with pytest.raises(MediaTimeout, match=r"limit of 0\.5 s"):
        await run_ffmpeg([*SLOW, "-metadata", f"comment={marker}", "-f", "null", "-"], duration=3.0, limits=limits)
    assert ffmpeg_processes(marker) == []


CHILD = """
import asyncio, sys
from mvserver.media.run import run_ffmpeg
async def main():
    task = asyncio.ensure_future(run_ffmpeg([*sys.argv[2:], "-metadata", "comment=" + sys.argv[1], "-f", "null",
                                                   "-"], duration=600, progress=lambda f: print("running", flush=True)))
    await task
asyncio.run(main())
"""


async def test_ffmpeg_dies_with_the_process_that_started_it_even_on_kill_9(tmp_path: Path) -> None:
    marker = f"orphan-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, "-c", CHILD, marker, *SLOW], env=env, stdout=subprocess.PIPE)
    ffmpeg_pid = None
    try:
        assert parent.stdout is not None
        assert await asyncio.to_thread(parent.stdout.readline) == b"running\n"
        [ffmpeg_pid] = children_of(parent.pid, marker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert await exited(ffmpeg_pid, 10), "ffmpeg outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if ffmpeg_pid is not None and ffmpeg_processes(marker):  # the old behaviour: an orphan; end it
            os.kill(ffmpeg_pid, signal.SIGKILL)


async def test_a_run_lock_waits_for_its_holder_in_another_process_and_ffmpeg_inherits_it(tmp_path: Path) -> None:
    lock = tmp_path / "job.ffmpeg.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert await asyncio.to_thread(holder.stdout.readline) == b"holding\n"
        waiting = asyncio.Event()

        async def on_wait() -> None:
            waiting.set()

        async def take() -> None:
            async with run_lock(lock, on_wait=on_wait) as fd:
                marker = f"lock-{uuid.uuid4().hex}"
                started = asyncio.Event()
                run = asyncio.ensure_future(
                    run_ffmpeg(
                        [*SLOW, "-metadata", f"comment={marker}", "-f", "null", "-"],
                        duration=600,
                        progress=lambda _: started.set(),
                        hold=(fd,),
                    )
                )
                async with asyncio.timeout(20):
                    await started.wait()
                [pid] = children_of(os.getpid(), marker)
                assert lock in {Path(os.readlink(f"/proc/{pid}/fd/{n}")) for n in os.listdir(f"/proc/{pid}/fd")}
                probe = os.open(lock, os.O_RDWR)
                try:
                    with pytest.raises(BlockingIOError):  # held: by this run (and by its ffmpeg)
                        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                finally:
                    os.close(probe)
                run.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await run

        taking = asyncio.ensure_future(take())
        async with asyncio.timeout(10):
            await waiting.wait()
        assert not taking.done()
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(timeout=10)
        async with asyncio.timeout(30):
            await taking
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# -- assemble: cuts ------------------------------------------------------------------------------------------------


async def test_cuts_copy_whole_clips_and_encode_only_the_trimmed_one(
    clips: dict[str, Path], song: Path, tmp_path: Path
) -> None:
    out = tmp_path / "final.mp4"
    seen: list[float] = []
    edit = [Clip(clips["a"]), Clip(clips["b"], trim_in=0.5, trim_out=3.0), Clip(clips["silent"])]
    result = await assemble(edit, out, song=song, song_offset=2.0, progress=seen.append)
    assert result.copied == [0, 2] and result.reencoded == [1]
    assert result.duration == pytest.approx(6 + 2.5 + 4)
    info = await check_output(out, 12.5)
    assert info.first_video.width == 640 and info.first_video.height == 360
    hashes = packet_hashes(out)
    assert hashes[: 6 * FPS] == packet_hashes(clips["a"])  # clip a's video is in the output byte for byte
    assert hashes[-4 * FPS :] == packet_hashes(clips["silent"])
    assert len(hashes) == round(12.5 * FPS)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    assert leftovers(tmp_path) == []


async def test_cuts_without_trims_copy_everything(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "copy.mp4"
    result = await assemble([Clip(clips["b"]), Clip(clips["a"]), Clip(clips["b"])], out, clip_audio="keep")
    assert result.copied == [0, 1, 2] and result.reencoded == []
    await check_output(out, 14.0)
    assert packet_hashes(out) == packet_hashes(clips["b"]) + packet_hashes(clips["a"]) + packet_hashes(clips["b"])


async def test_without_song_or_clip_audio_the_audio_track_is_silent(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "quiet.mp4"
    await assemble([Clip(clips["b"]), Clip(clips["silent"])], out)
    await check_output(out, 8.0)
    volume = subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-hide_banner",
            "-i",
            str(out),
            "-map",
            "0:a",
            "-af",
            "volumedetect",
            "-f",
            "null",
            "-",
        ],
        capture_output=True,
        timeout=60,
    ).stderr.decode()
    assert "max_volume: -91" in volume  # digital silence


async def test_song_shorter_than_the_video_is_padded_with_silence(clips: dict[str, Path], tmp_path: Path) -> None:
    short = make_song(tmp_path / "short.wav", 3)
    out = tmp_path / "padded.mp4"
    await assemble([Clip(clips["a"]), Clip(clips["b"])], out, song=short, clip_audio="mix")
    await check_output(out, 10.0)


# -- assemble: the song's AAC copy ---------------------------------------------------------------------------------


def clicks_song(path: Path, seconds: float) -> Path:
    """A quiet tone with a loud 5 ms click every half second (at 0, 0.5, 1.0 ... s): the clicks mark song time."""
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"aevalsrc='0.05*sin(2*PI*330*t)+if(lt(mod(t\\,0.5)\\,0.005)\\,0.9\\,0)':s=44100:d={seconds}",
        "-ac",
        "2",
        str(path),
    )
    return path


def click_times(path: Path) -> list[float]:
    """Where the clicks of :func:`clicks_song` are in a file's decoded audio (seconds from its start)."""
    raw = subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-v",
            "error",
            "-i",
            str(path),
            "-map",
            "0:a:0",
            "-ac",
            "1",
            "-ar",
            "48000",
            "-f",
            "s16le",
            "-",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    samples = struct.unpack(f"<{len(raw) // 2}h", raw)
    times, last = [], -1.0
    for index, value in enumerate(samples):
        t = index / 48000
        if abs(value) > 0.5 * 32768 and t - last > 0.25:
            times.append(t)
            last = t
    return times


def audio_packets(path: Path) -> list[str]:
    out = ffmpeg("-i", str(path), "-map", "0:a:0", "-c", "copy", "-f", "framemd5", "-")
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines() if line and not line.startswith("#")]


async def test_a_cut_only_edit_copies_the_song_s_aac_packets_and_encodes_only_the_faded_end(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    song = clicks_song(tmp_path / "clicks.wav", 20.0)
    aac, small = tmp_path / "song.aac.m4a", tmp_path / "song.preview.mp3"
    await encode_song_copies(song, aac, small, duration=20.0)
    copy = SongCopy(aac, 20.0)
    edit = [Clip(clips["a"]), Clip(clips["b"])]
    copied = await assemble(edit, tmp_path / "copied.mp4", song=song, song_offset=3.1, song_copy=copy)
    encoded = await assemble(edit, tmp_path / "encoded.mp4", song=song, song_offset=3.1)
    assert (copied.audio, encoded.audio) == ("copied", "encoded")
    assert copied.copied == [0, 1]
    await check_output(tmp_path / "copied.mp4", 10.0)
    # Up to the last second the output's audio packets are the copy's, byte for byte, from the packet at 3.1 s.
    packets, source = audio_packets(tmp_path / "copied.mp4"), audio_packets(aac)
    first = source.index(packets[0])
    body = round(9.0 / AAC_FRAME_SECONDS) - 2
    assert packets[:body] == source[first : first + body]
    assert abs(first * AAC_FRAME_SECONDS - 3.1) <= 2 * AAC_FRAME_SECONDS  # (the copy's first is priming)
    # The song plays at the same times as when it is encoded: each click within one AAC frame (21 ms).
    heard, reference = click_times(tmp_path / "copied.mp4"), click_times(tmp_path / "encoded.mp4")
    assert len(heard) == len(reference) >= 18
    assert max(abs(a - b) for a, b in zip(heard, reference, strict=False)) <= AAC_FRAME_SECONDS + 1e-3
    assert abs(heard[0] - 0.4) <= AAC_FRAME_SECONDS + 1e-3  # the click at 3.5 s of the song
    # ... and it fades out over the last second as the encoded one does: no click is heard in its last 0.3 s.
    assert heard[-1] < 9.7 and reference[-1] < 9.7
    assert leftovers(tmp_path) == []
    # A song that ends within the fade is copied up to it and padded with silence to the video's end.
    padded = await assemble(edit, tmp_path / "padded.mp4", song=song, song_offset=10.5, song_copy=copy)
    assert padded.audio == "copied"
    await check_output(tmp_path / "padded.mp4", 10.0)
    # A song that ends before the fade, or clip audio mixed in, is encoded as before.
    mixed = await assemble(edit, tmp_path / "mixed.mp4", song=song, song_offset=3.1, song_copy=copy, clip_audio="mix")
    late = await assemble(edit, tmp_path / "late.mp4", song=song, song_offset=15.0, song_copy=copy)
    assert (mixed.audio, late.audio) == ("encoded", "encoded")


async def test_the_song_s_copies_and_its_packet_copy_run_within_the_limits_and_the_job_s_lock(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ffmpeg of the song's copies and of a cut-only edit that copies the song's packets gets the limits it
    is given (memory, threads on each output, the job's run lock), as every other assembly run does."""
    runs: list[tuple[list[str], FfmpegLimits, tuple[int, ...]]] = []
    real = run_ffmpeg

    async def recorded(args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append((list(args), kwargs.get("limits", DEFAULT_LIMITS), tuple(kwargs.get("hold", ()))))
        await real(args, **kwargs)

    for module in ("song", "assemble"):  # the song's copies, then the edit
        monkeypatch.setattr(f"mvserver.media.{module}.run_ffmpeg", recorded)
    limits = FfmpegLimits(memory_mb=900, threads=1)
    song = clicks_song(tmp_path / "clicks.wav", 20.0)
    aac, small = tmp_path / "song.aac.m4a", tmp_path / "song.preview.mp3"
    await encode_song_copies(song, aac, small, duration=20.0, limits=limits)
    [(args, used, _)] = runs
    assert used == limits
    first_output = args.index("-y")  # the AAC copy's temporary; the preview is the last output
    assert args[first_output - 4 : first_output - 2] == ["-threads", "1"]  # the AAC output's encoder too
    runs.clear()
    async with run_lock(tmp_path / "job.lock") as held:
        result = await assemble(
            [Clip(clips["a"]), Clip(clips["b"])],
            tmp_path / "out.mp4",
            song=song,
            song_offset=3.1,
            song_copy=SongCopy(aac, 20.0),
            limits=limits,
            hold=(held,),
        )
    assert result.audio == "copied"
    assert len(runs) == 2  # the faded end, then the mux of the copied video and audio
    assert all(used == limits and hold == (held,) for _, used, hold in runs), runs


# -- assemble: crossfade and fit -----------------------------------------------------------------------------------


async def test_crossfade_overlaps_clips_and_mixes_clip_audio(
    clips: dict[str, Path], song: Path, tmp_path: Path
) -> None:
    out = tmp_path / "xfade.mp4"
    edit = [Clip(clips["a"], trim_out=5.0), Clip(clips["silent"]), Clip(clips["b"], trim_in=1.0)]
    result = await assemble(edit, out, song=song, transition="crossfade", crossfade_seconds=0.5, clip_audio="mix")
    assert result.reencoded == [0, 1, 2] and result.copied == []
    assert result.duration == pytest.approx(5 + 4 + 3 - 2 * 0.5)
    await check_output(out, 11.0)


def test_crossfade_pieces_show_every_frame_once_and_decode_few_clips_at_a_time() -> None:
    pieces = crossfade_pieces([96, 96, 96], 12)
    assert [(p.parts, p.frames) for p in pieces] == [
        (((0, 0, 84),), 84),
        (((0, 84, 12), (1, 0, 12)), 12),
        (((1, 12, 72),), 72),
        (((1, 84, 12), (2, 0, 12)), 12),
        (((2, 12, 84),), 84),
    ]
    # a clip shorter than twice the crossfade has no stretch of its own: both its joins are one piece
    pieces = crossfade_pieces([96, 20, 96], 12)
    assert [p.parts for p in pieces][1] == ((0, 84, 12), (1, 0, 20), (2, 0, 12))
    for frames, fade in (([96] * 48, 12), ([96, 20, 30, 96, 13, 96], 12), ([13, 13, 13], 12), ([50], 12)):
        pieces = crossfade_pieces(frames, fade)
        assert sum(p.frames for p in pieces) == sum(frames) - (len(frames) - 1) * fade
        assert [k for p in pieces for k, _, _ in p.parts] == sorted(k for p in pieces for k, _, _ in p.parts)
    assert graph_clips([96] * 48, 12) == 2 and graph_clips([96, 20, 30, 96], 12) == 3
    assert graph_clips([96, 20, 24, 96], 12) == 4  # 24 frames = twice the crossfade: no stretch of its own
    assert graph_clips([96] * 3, None) == 1
    with pytest.raises(AssemblyInputError, match="at most 3") as error:
        check_graph_clips([96, 20, 24, 96], 12, 3)
    assert error.value.field == "crossfade_seconds"


PEAK = """
import asyncio, resource, sys
from pathlib import Path
from mvserver.core.artefacts import temp_path
from mvserver.media.assemble import Clip, assemble
from mvserver.media.limits import FfmpegLimits
clips = [Clip(Path(p)) for p in sys.argv[3:]] * int(sys.argv[2])
asyncio.run(assemble(clips, Path(sys.argv[1]), temp_name=temp_path, transition="crossfade", clip_audio="mix", fit="letterbox",
                           limits=FfmpegLimits(memory_mb=None, threads=None)))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


async def test_a_crossfade_needs_no_more_memory_for_more_clips(clips: dict[str, Path], tmp_path: Path) -> None:
    """One filter graph over every clip held every clip's decoder and frames at once: 12 clips of 640x360 peaked
    at ~410 MiB, 48 at ~1.05 GiB. Piece by piece, the peak of the largest ffmpeg does not grow with the clips."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}

    def peak_kib(repeat: int) -> int:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK,
                str(tmp_path / f"x{repeat}.mp4"),
                str(repeat),
                str(clips["b"]),
                str(clips["tall"]),
            ],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return int(done.stdout)

    few, many = await asyncio.gather(asyncio.to_thread(peak_kib, 2), asyncio.to_thread(peak_kib, 8))
    assert many < few * 1.25, (few, many)  # 4 clips vs 16 clips


async def test_different_aspect_ratios_need_fit(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "mixed.mp4"
    with pytest.raises(AssemblyInputError) as error:
        await assemble([Clip(clips["b"]), Clip(clips["tall"])], out)
    assert error.value.field == "clips[1]" and "aspect ratio" in str(error.value)
    assert not out.exists()
    for fit in ("letterbox", "crop"):
        result = await assemble([Clip(clips["b"]), Clip(clips["tall"])], out, fit=fit)
        assert result.copied == [0] and result.reencoded == [1]
        info = await check_output(out, 8.0)
        assert (info.first_video.width, info.first_video.height) == (640, 360)
    result = await assemble([Clip(clips["tall"]), Clip(clips["b"])], out, fit="crop", transition="crossfade")
    info = await check_output(out, 7.5)
    assert (info.first_video.width, info.first_video.height) == (360, 640)


@pytest.mark.parametrize(
    ("clip", "kwargs", "field"),
    [
        (Clip(Path("a"), trim_in=-1), {}, "clips[0].trim_in"),
        (Clip(Path("a"), trim_in=6.0), {}, "clips[0].trim_in"),
        (Clip(Path("a"), trim_out=9.0), {}, "clips[0].trim_out"),
        (Clip(Path("a"), trim_in=2.0, trim_out=1.0), {}, "clips[0].trim_out"),
        (Clip(Path("a")), {"song_offset": 45.0}, "song_offset"),
        (Clip(Path("a")), {"transition": "crossfade", "crossfade_seconds": 5.0}, "crossfade_seconds"),
        (Clip(Path("a")), {"transition": "wipe"}, "transition"),
    ],
)
async def test_bad_input_names_the_field(
    clips: dict[str, Path], song: Path, tmp_path: Path, clip: Clip, kwargs: dict, field: str
) -> None:
    first = Clip(clips["a"], clip.trim_in, clip.trim_out)
    with pytest.raises(AssemblyInputError) as error:
        await assemble([first, Clip(clips["b"])], tmp_path / "bad.mp4", song=song, **kwargs)
    assert error.value.field == field
    assert os.listdir(tmp_path) == []


async def test_unreadable_clip_and_empty_list(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(AssemblyInputError) as error:
        await assemble([Clip(junk)], tmp_path / "out.mp4")
    assert error.value.field == "clips[0]"
    with pytest.raises(AssemblyInputError) as empty:
        await assemble([], tmp_path / "out.mp4")
    assert empty.value.field == "clips"


async def test_a_cancelled_assembly_leaves_nothing_behind(clips: dict[str, Path], song: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    started = asyncio.Event()
    task = asyncio.ensure_future(
        assemble(
            [Clip(clips["a"], trim_in=0.1)] * 6,
            out_dir / "final.mp4",
            song=song,
            transition="crossfade",
            progress=lambda f: started.set(),
        )
    )
    async with asyncio.timeout(30):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(out_dir) == []
    assert ffmpeg_processes(str(out_dir)) == []


async def test_probe_clips_reads_many_files_in_one_run(clips: dict[str, Path]) -> None:
    described = await probe_clips([clips["a"], clips["tall"], clips["a"], clips["silent"]])
    assert [frames for _, frames in described] == [6 * FPS, 4 * FPS, 6 * FPS, 4 * FPS]
    assert [(i.first_video.width, i.first_video.height) for i, _ in described] == [
        (640, 360),
        (360, 640),
        (640, 360),
        (640, 360),
    ]
    assert [len(i.audio) for i, _ in described] == [1, 1, 1, 0]
