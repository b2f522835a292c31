"""Song uploads: streamed, capped, identified by ffmpeg from their content, served back with Range."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from helpers import (
    UPLOAD,
    AppClient,
    artefact_file,
    artefact_json,
    dead_pid,
    heartbeat,
    lavfi,
    make_audio,
    stored,
    stored_names,
)

from mvserver.app import create_app
from mvserver.appkeys import SONGS, UPLOAD_SLOTS
from mvserver.audio.service import FORMATS as AUDIO_FORMATS
from mvserver.core.config import ConfigError, EnvSettings
from mvserver.media.probe import probe, stream_duration
from mvserver.media.run import ffmpeg_exe
from mvserver.sandbox.render import render_character_image, render_video

# (file name, ffmpeg output options, expected format, expected mime type, expected codec)
FORMATS = [
    ("song.mp3", [], "mp3", "audio/mpeg", "mp3"),
    ("song.wav", [], "wav", "audio/wav", "pcm_s16le"),
    ("song.m4a", ["-c:a", "aac"], "m4a", "audio/mp4", "aac"),
    ("song.aac", ["-c:a", "aac", "-f", "adts"], "aac", "audio/aac", "aac"),
    ("song.ogg", ["-c:a", "libvorbis"], "ogg", "audio/ogg", "vorbis"),
    ("song.opus", ["-c:a", "libopus", "-f", "ogg"], "ogg", "audio/ogg", "opus"),
    ("song.flac", [], "flac", "audio/flac", "flac"),
]


async def upload(
    client: TestClient, data: Any, content_type: str = "audio/mpeg", status: int = 201, **headers: str
) -> dict[str, Any]:
    response = await client.post(UPLOAD, data=data, headers={"Content-Type": content_type, **headers})
    assert response.status == status, await response.text()
    return await response.json()


def form(data: bytes, filename: str = "song.mp3", content_type: str = "audio/mpeg") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("file", data, filename=filename, content_type=content_type)
    return body


@pytest.mark.both_backends
@pytest.mark.parametrize(("name", "options", "fmt", "mime", "codec"), FORMATS)
async def test_each_format_is_identified_by_content_and_served_back(
    client: TestClient, tmp_path: Path, name: str, options: list[str], fmt: str, mime: str, codec: str
) -> None:
    data = make_audio(tmp_path / name, *options).read_bytes()
    body = await upload(client, data, content_type="audio/x-anything")  # the declared type is not trusted
    audio_id = body["audio_id"]
    assert uuid.UUID(audio_id).version == 4
    assert (body["format"], body["mime_type"], body["codec"]) == (fmt, mime, codec)
    assert body["duration"] == pytest.approx(2.0, abs=0.06)
    assert body["sample_rate"] == (48000 if codec == "opus" else 44100) and body["channels"] == 2
    assert body["size_bytes"] == len(data) and body["audio_url"] == f"/api/mv/get_audio/{audio_id}"
    sidecar = await artefact_json(client, f"audio/{audio_id}.json")
    assert sidecar["format"] == fmt and sidecar["duration"] == body["duration"]
    # Once saved, the song is encoded once more: an AAC copy for assembly and a small MP3 for Gemini.
    await client.app[SONGS].settled(audio_id)
    assert await stored_names(client, "audio") == sorted(
        [f"{audio_id}.json", f"{audio_id}{AUDIO_FORMATS[fmt].suffix}", f"{audio_id}.aac.m4a", f"{audio_id}.preview.mp3"]
    )
    async with artefact_file(client, f"audio/{audio_id}.aac.m4a") as path:
        copy = await probe(path)
    assert copy.first_audio is not None and (
        copy.first_audio.codec,
        copy.first_audio.sample_rate,
        copy.first_audio.channels,
    ) == ("aac", 48000, 2)
    assert copy.duration == pytest.approx(2.0, abs=0.06)
    async with artefact_file(client, f"audio/{audio_id}.preview.mp3") as path:
        small = await probe(path)
    assert small.first_audio is not None and (small.first_audio.codec, small.first_audio.channels) == ("mp3", 1)

    served = await client.get(body["audio_url"])
    assert served.status == 200 and served.headers["Content-Type"] == mime and await served.read() == data
    part = await client.get(body["audio_url"], headers={"Range": "bytes=10-109"})
    assert part.status == 206 and await part.read() == data[10:110]
    assert part.headers["Content-Range"] == f"bytes 10-109/{len(data)}"


async def test_multipart_with_one_file(client: TestClient, tmp_path: Path) -> None:
    data = make_audio(tmp_path / "x.flac", seconds=1.0, channels=1).read_bytes()
    response = await client.post(UPLOAD, data=form(data, filename="misleading.mp3"))
    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["format"] == "flac" and body["channels"] == 1
    assert response.headers["Location"] == body["audio_url"]


@pytest.mark.both_backends
@pytest.mark.parametrize("kind", ["text", "png", "video", "wma", "tiny", "huge_claim"])
async def test_what_is_not_an_accepted_song_is_400_and_leaves_nothing(
    client: TestClient, tmp_path: Path, kind: str
) -> None:
    if kind == "text":
        data = b"ID3 this is only text pretending to be an mp3\n" * 200
    elif kind == "png":
        data = render_character_image("a drummer")
    elif kind == "video":
        await render_video(tmp_path / "clip.mp4", prompt="a clip", duration=1)
        data = (tmp_path / "clip.mp4").read_bytes()
    elif kind == "wma":
        data = make_audio(tmp_path / "song.wma", "-c:a", "wmav2").read_bytes()
    elif kind == "tiny":
        data = make_audio(tmp_path / "tiny.wav", seconds=0.02).read_bytes()
    else:  # a WAV header that claims an hour of audio, followed by almost nothing
        data = make_audio(tmp_path / "cut.wav").read_bytes()[:600]
    error = (await upload(client, data, status=400))["error"]
    assert error["code"] == "invalid_audio" and error["field"] == "body" and error["message"]
    assert await stored_names(client, "audio") == []


async def test_too_many_channels_is_400(client: TestClient, tmp_path: Path) -> None:
    inputs = [arg for _ in range(12) for arg in ("-f", "lavfi", "-i", "sine=d=0.5")]
    path = tmp_path / "many.wav"
    subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            *inputs,
            "-filter_complex",
            "amerge=inputs=12",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    error = (await upload(client, path.read_bytes(), status=400))["error"]
    assert error["code"] == "invalid_audio" and "12 channels" in error["message"]
    assert stored(tmp_path) == []


async def test_a_body_over_the_cap_is_413_with_or_without_a_length(make_client: AppClient, tmp_path: Path) -> None:
    client = await make_client(MV_MAX_AUDIO_MB="0.05")  # 52428 bytes
    data = make_audio(tmp_path / "big.wav").read_bytes()  # about 350 kB
    error = (await upload(client, data, status=413))["error"]
    assert error["code"] == "request_too_large" and "52428" in error["message"]

    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < 64 << 20:  # bounded for the test; the server must stop long before
            sent += 1 << 16
            yield b"\0" * (1 << 16)

    response = await client.post(UPLOAD, data=endless(), headers={"Content-Type": "audio/wav"})
    assert response.status == 413
    assert sent < 16 << 20, sent  # the server answered and stopped reading long before the end
    assert stored(tmp_path) == []
    small = make_audio(tmp_path / "small.mp3", "-b:a", "32k", seconds=1.0).read_bytes()
    assert (await upload(client, small))["format"] == "mp3"  # the cap still lets small files through


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:3000"}, 403),
        ({"Origin": "http://evil.example"}, 403),
        ({"Sec-Fetch-Site": "same-origin"}, 201),
    ],
)
async def test_uploads_from_other_sites_are_refused(
    client: TestClient, tmp_path: Path, headers: dict[str, str], status: int
) -> None:
    data = make_audio(tmp_path / "s.mp3", seconds=0.5).read_bytes()
    response = await client.post(UPLOAD, data=form(data), headers=headers)
    assert response.status == status, await response.text()
    if status == 403:
        assert (await response.json())["error"]["code"] == "forbidden_origin"
        assert stored(tmp_path) == []


async def test_the_same_origin_is_accepted(client: TestClient, tmp_path: Path) -> None:
    data = make_audio(tmp_path / "s.mp3", seconds=0.5).read_bytes()
    origin = str(client.make_url("")).rstrip("/")
    await upload(client, data, Origin=origin)


async def test_wrong_content_type_and_bad_multipart(client: TestClient, tmp_path: Path) -> None:
    data = make_audio(tmp_path / "s.mp3", seconds=0.5).read_bytes()
    error = (await upload(client, data, content_type="text/plain", status=415))["error"]
    assert error["code"] == "unsupported_media_type" and error["field"] == "Content-Type"
    two = aiohttp.FormData()
    two.add_field("file", data, filename="a.mp3", content_type="audio/mpeg")
    two.add_field("other", data, filename="b.mp3", content_type="audio/mpeg")
    response = await client.post(UPLOAD, data=two)
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_audio"
    broken = await client.post(UPLOAD, data=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data"})
    assert broken.status == 400
    assert stored(tmp_path) == []


async def test_uploads_beyond_the_slots_get_503(client: TestClient, tmp_path: Path) -> None:
    release = asyncio.Event()

    async def held() -> AsyncIterator[bytes]:
        yield b"\0" * 1024
        await release.wait()

    pending = [
        asyncio.ensure_future(client.post(UPLOAD, data=held(), headers={"Content-Type": "audio/wav"})) for _ in range(4)
    ]
    try:
        async with asyncio.timeout(10):
            while not client.app[UPLOAD_SLOTS].locked():
                await asyncio.sleep(0.02)
        response = await client.post(UPLOAD, data=b"x", headers={"Content-Type": "audio/wav"})
        assert response.status == 503 and response.headers["Retry-After"]
        assert (await response.json())["error"]["code"] == "busy"
    finally:
        release.set()
        for response in await asyncio.gather(*pending):
            assert response.status == 400  # 1 kB of zeros is no audio
    assert stored(tmp_path) == []


async def test_get_audio_unknown_and_malformed(client: TestClient) -> None:
    missing = await client.get(f"/api/mv/get_audio/{uuid.uuid4()}")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
    malformed = await client.get("/api/mv/get_audio/..%2F..%2Fetc%2Fpasswd")
    assert malformed.status in (400, 404)
    bad = await client.get("/api/mv/get_audio/not-an-id")
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "audio_id"


async def test_a_client_that_leaves_mid_upload_leaves_nothing(
    client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_audio(tmp_path / "s.wav").read_bytes()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        f"POST {UPLOAD} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data[: len(data) // 2]
    )
    await writer.drain()
    async with asyncio.timeout(10):
        while not any(p.name.endswith(".part") for p in (tmp_path / "outputs" / "audio").iterdir()):
            await asyncio.sleep(0.01)
    writer.close()
    async with asyncio.timeout(10):
        while stored(tmp_path):
            await asyncio.sleep(0.02)
    assert "unhandled error" not in caplog.text
    assert (await upload(client, data, content_type="audio/wav"))["format"] == "wav"


def test_a_crash_leftover_upload_is_removed_at_start(live_env: dict[str, str]) -> None:
    outputs = Path(live_env["MV_OUTPUT_DIR"])
    audio_dir = outputs / "audio"
    audio_dir.mkdir(parents=True)
    heartbeat(outputs, "0badc0de0bad", dead_pid())  # the node that crashed: its process is gone
    leftover = audio_dir / f".{uuid.uuid4()}.0badc0de0bad-0123abcd.upload.part"
    leftover.write_bytes(b"half a song")
    create_app(live_env)
    assert not leftover.exists()


# -- files that name other files (ffconcat, HLS, image sequences) -----------------------------------------------------

GENERIC = "the file is not an audio file ffmpeg can read"


async def test_uploads_that_name_other_files_get_one_generic_error_whether_or_not_they_exist(
    client: TestClient, tmp_path: Path
) -> None:
    """The probe reads an upload with an allowed demuxer only, so a listing is never followed: the answer is the
    same for a sibling song that exists, one that does not, a playlist and an image sequence."""
    existing = (await upload(client, make_audio(tmp_path / "s.mp3").read_bytes()))["audio_id"]
    await client.app[SONGS].settled(existing)  # its copies are made
    audio_dir = tmp_path / "outputs" / "audio"
    for n in (1, 2, 3):
        (audio_dir / f"frame-{n:03d}.png").write_bytes(render_character_image("a frame"))
    before = stored(tmp_path)
    uploads = {
        "ffconcat naming an existing song": f"ffconcat version 1.0\nfile {existing}.mp3\n",
        "ffconcat naming a missing song": f"ffconcat version 1.0\nfile {uuid.uuid4()}.mp3\n",
        "HLS playlist": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{existing}.mp3\n#EXT-X-ENDLIST\n",
        "image2 pattern": "ffconcat version 1.0\nfile frame-%03d.png\n",
        "an image": render_character_image("a singer"),
    }
    errors = {}
    for name, data in uploads.items():
        errors[name] = (await upload(client, data.encode() if isinstance(data, str) else data, status=400))["error"]
    assert all(error == {"code": "invalid_audio", "message": GENERIC, "field": "body"} for error in errors.values()), (
        errors
    )
    assert stored(tmp_path) == before


# -- the longest song ---------------------------------------------------------------------------------------------


def silent_flac(path: Path, seconds: float) -> Path:
    """Minutes of 8 kHz mono silence: a FLAC of a few kB per minute."""
    return lavfi(path, "anullsrc=r=8000:cl=mono", "-t", str(seconds), "-c:a", "flac")


async def test_a_song_over_the_default_length_is_refused_from_its_header_before_any_decode(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = silent_flac(tmp_path / "long.flac", 25 * 60).read_bytes()
    assert len(data) < 300_000  # a small file, a long song
    decodes: list[Path] = []
    real = stream_duration

    async def counted(path: Path, *args: Any, **kwargs: Any) -> float:
        decodes.append(path)
        return await real(path, *args, **kwargs)

    monkeypatch.setattr("mvserver.audio.routes.stream_duration", counted)
    error = (await upload(client, data, content_type="audio/flac", status=400))["error"]
    assert error["code"] == "audio_too_long" and error["field"] == "body"
    assert "1500 s" in error["message"] and "1200 s" in error["message"] and "MV_MAX_AUDIO_SECONDS" in error["message"]
    assert decodes == [] and stored(tmp_path) == []


def understated_mp3(path: Path) -> Path:
    """2 s at 320 kb/s, then 60 s at 32 kb/s, without a Xing header: ffmpeg estimates ~8 s from the first frames."""
    parts = []
    for n, (source, seconds, rate) in enumerate([("sine", 2, "320k"), ("anullsrc=r=44100:cl=mono", 60, "32k")]):
        part = path.with_name(f"part{n}.mp3")
        subprocess.run(
            [
                ffmpeg_exe(),
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                source,
                "-t",
                str(seconds),
                "-ac",
                "1",
                "-ar",
                "44100",
                "-c:a",
                "libmp3lame",
                "-b:a",
                rate,
                "-write_xing",
                "0",
                "-id3v2_version",
                "0",
                str(part),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        parts.append(part.read_bytes())
    path.write_bytes(b"".join(parts))
    return path


async def test_a_header_that_understates_the_length_is_caught_by_a_bounded_decode(
    make_client: AppClient, tmp_path: Path
) -> None:
    song = understated_mp3(tmp_path / "lie.mp3")
    assert (await probe(song)).duration < 10
    assert await stream_duration(song, "a:0", decode=True, limit=31) == pytest.approx(31, abs=0.1)
    client = await make_client(MV_MAX_AUDIO_SECONDS="30")
    error = (await upload(client, song.read_bytes(), status=400))["error"]
    assert error["code"] == "audio_too_long" and "more than 30 s" in error["message"]
    assert stored(tmp_path) == []
    short = make_audio(tmp_path / "short.flac", seconds=29.0, rate=8000, channels=1).read_bytes()
    assert (await upload(client, short, content_type="audio/flac"))["duration"] == pytest.approx(29.0, abs=0.05)


def test_the_longest_song_setting() -> None:
    assert EnvSettings.from_env({}).max_audio_seconds == 1200.0
    assert EnvSettings.from_env({"MV_MAX_AUDIO_SECONDS": "600"}).max_audio_seconds == 600.0
    for bad in ("-1", "ten", "90000"):
        with pytest.raises(ConfigError, match="MV_MAX_AUDIO_SECONDS"):
            EnvSettings.from_env({"MV_MAX_AUDIO_SECONDS": bad})
