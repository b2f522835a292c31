"""Lip-sync jobs through the real replicate client against the simulator: the uploaded window, the output clip,
cancel, restart resume, failures, every 400, the simulated model and the settings."""

from __future__ import annotations

import asyncio
import io
import subprocess
import wave
from pathlib import Path
from typing import Any

import pytest
import replicate
import yaml
from aiohttp.test_utils import TestClient, TestServer
from helpers import (
    _CODECS,
    FFMPEG,
    SINGER_PROMPT,
    artefact,
    artefact_file,
    artefact_json,
    artefact_keys,
    artefacts_of,
    events_of,
    lavfi,
    make_clip,
    make_song,
    probe_media,
    wait_for,
)
from PIL import Image
from yarl import URL

from mvserver.appkeys import JOBS, STORE
from mvserver.core.artefacts import new_id
from mvserver.core.config import ConfigError, EnvSettings, load_config
from mvserver.core.errors import ApiError
from mvserver.lipsync.service import Song, cut_args, cut_window, max_cut_bytes, plan_window
from mvserver.media.errors import DurationError, MediaError
from mvserver.sandbox.app import Simulator
from mvserver.sandbox.render import LIPSYNC_LABEL, lipsync_label_box

# -- helpers ------------------------------------------------------------------------------------------------------


async def submit(client: TestClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/mv/lipsync", json=body)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    assert response.headers["Location"] == accepted["status_url"]
    assert accepted["kind"] == "lipsync" and accepted["status"] == "queued"
    return accepted


def uploaded(sim: Simulator, url: str) -> Path:
    """The file the simulator's files API stored for one of its URLs."""
    _, _, file_id, name = URL(url).path.strip("/").split("/")
    return sim.state_dir / "files" / file_id / name


def prediction_inputs(sim: Simulator, prediction_id: str) -> dict[str, Any]:
    record = sim.load("predictions", prediction_id)
    assert record is not None and record["model"] == "sync/lipsync-2-pro"
    return record["input"]


def wav_frames(path: Path) -> tuple[wave._wave_params, bytes]:
    with wave.open(str(path), "rb") as handle:
        return handle.getparams(), handle.readframes(handle.getnframes())


def frame_at(path: Path, seconds: float) -> Image.Image:
    png = subprocess.run(
        [
            FFMPEG,
            "-nostdin",
            "-loglevel",
            "error",
            "-ss",
            str(seconds),
            "-i",
            str(path),
            "-frames:v",
            "1",
            "-f",
            "image2pipe",
            "-c:v",
            "png",
            "-",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    return Image.open(io.BytesIO(png)).convert("RGB")


async def clip_length(client: TestClient, clip_id: str) -> float:
    async with artefact_file(client, f"videos/{clip_id}.mp4") as path:
        return probe_media(path)["duration"]


async def windows_left(client: TestClient) -> list[str]:
    """The audio windows cut for lip-sync jobs still stored (each is removed once uploaded)."""
    return [key for key in await artefact_keys(client, "jobs") if ".lipsync." in key]


def count_routes(sim: Simulator, route: str) -> int:
    return sum(1 for name, _ in sim.requests if name == route)


# -- the job --------------------------------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_a_lipsync_job_uploads_the_window_and_serves_the_clip_with_the_song(
    client: TestClient, sim: Simulator, tmp_path: Path
) -> None:
    clip_id = await make_clip(client, sim, duration=4)
    sim.video_latency = 1.0  # the lip-sync job: long enough for progress events between the start and the end
    async with artefact_file(client, f"videos/{clip_id}.mp4") as clip_path:
        clip_seconds = probe_media(clip_path)["duration"]
    audio_id = await make_song(client, 12.0, "mp3")
    uploads_before = count_routes(sim, "replicate.files.create")

    accepted = await submit(client, video_job_id=clip_id, audio_id=audio_id, audio_start=2.5, temperature=0.7)
    events = await events_of(client, accepted["job_id"])
    names = [e["event"] for e in events]
    assert names[0] == "queued" and names[1] == "running" and names[-1] == "succeeded", names
    assert "progress" in names
    final = events[-1]["data"]
    assert final["kind"] == "lipsync" and final["model"] == "sync/lipsync-2-pro" and final["backend"] == "replicate"

    # What Replicate received: both files through its files API, and the options.
    inputs = prediction_inputs(sim, final["provider_prediction_id"])
    assert count_routes(sim, "replicate.files.create") == uploads_before + 2
    assert inputs["sync_mode"] == "cut_off" and inputs["temperature"] == 0.7 and inputs["active_speaker"] is False
    for key in ("video", "audio"):
        assert inputs[key].startswith("http://") and "/replicate/files/" in inputs[key], inputs[key]
    assert uploaded(sim, inputs["video"]).read_bytes() == await artefact(client, f"videos/{clip_id}.mp4")
    window = uploaded(sim, inputs["audio"])
    assert window.read_bytes()[:4] == b"RIFF"
    assert abs(probe_media(window)["duration"] - clip_seconds) < 0.05
    assert await windows_left(client) == []  # the cut is removed once uploaded

    # The job's request, as GET /jobs/{id} shows it.
    state = await (await client.get(accepted["status_url"])).json()
    request = state["request"]
    assert request["window"] == {"start": 2.5, "end": 2.5 + clip_seconds, "seconds": clip_seconds}
    assert request["clip_seconds"] == clip_seconds and request["song_seconds"] == 12.0
    assert {"sync_mode", "active_speaker", "audio_end"} <= set(request["defaults_applied"])
    assert request["project_id"] is None and request["scene_id"] is None

    # The output: the clip's length, H.264 with an AAC track, and the label drawn on it.
    response = await client.get(final["video_url"])
    assert response.status == 200 and response.headers["Content-Type"] == "video/mp4"
    out = tmp_path / "out.mp4"
    out.write_bytes(await response.read())
    assert out.stat().st_size == final["video_bytes"]
    media = probe_media(out)
    assert media["video_codec"] == "h264" and media["audio_codec"] == "aac"
    assert abs(media["duration"] - clip_seconds) < 0.1
    frame = frame_at(out, 1.0)
    x0, y0, x1, y1 = lipsync_label_box(frame.size)
    strip = frame.crop((x0 + 2, y0 + 2, x0 + 20, y1 - 2)).tobytes()
    pixels = [strip[i : i + 3] for i in range(0, len(strip), 3)]
    assert all(r > 200 and g > 160 and b < 90 for r, g, b in pixels), "the yellow label strip is missing"
    above = frame.crop((x0 + 2, y0 - 20, x0 + 20, y0 - 4)).tobytes()
    assert max(above[2::3]) < 120  # the clip itself shows above the strip (no yellow there)
    assert LIPSYNC_LABEL == "SANDBOX lip sync"
    ranged = await client.get(final["video_url"], headers={"Range": "bytes=0-99"})
    assert ranged.status == 206


@pytest.mark.both_backends
async def test_a_wav_song_is_stream_copied_sample_exact(client: TestClient, sim: Simulator) -> None:
    clip_id = await make_clip(client, sim, duration=4)
    clip_seconds = await clip_length(client, clip_id)
    audio_id = await make_song(client, 10.0, "wav", rate=48000)
    start = 3.0
    accepted = await submit(
        client, video_job_id=clip_id, audio_id=audio_id, audio_start=start, audio_end=start + clip_seconds
    )
    final = (await events_of(client, accepted["job_id"]))[-1]
    assert final["event"] == "succeeded", final
    window = uploaded(sim, prediction_inputs(sim, final["data"]["provider_prediction_id"])["audio"])
    params, frames = wav_frames(window)
    async with artefact_file(client, f"audio/{audio_id}.wav") as song_file:
        song_params, song = wav_frames(song_file)
    assert (params.nchannels, params.sampwidth, params.framerate) == (2, 2, 48000)
    assert abs(params.nframes / 48000 - clip_seconds) < 0.05
    offset = int(start * 48000) * 4
    assert frames == song[offset : offset + len(frames)]  # the very samples of the song, from audio_start


async def test_a_shorter_window_is_padded_with_silence_to_the_clip_length(client: TestClient, sim: Simulator) -> None:
    clip_id = await make_clip(client, sim, duration=4)
    clip_seconds = await clip_length(client, clip_id)
    audio_id = await make_song(client, 8.0, "m4a")
    accepted = await submit(client, video_job_id=clip_id, audio_id=audio_id, audio_start=1.0, audio_end=2.5)
    final = (await events_of(client, accepted["job_id"]))[-1]
    assert final["event"] == "succeeded", final
    window = uploaded(sim, prediction_inputs(sim, final["data"]["provider_prediction_id"])["audio"])
    params, frames = wav_frames(window)
    rate, step = params.framerate, params.nchannels * params.sampwidth
    assert abs(params.nframes / rate - clip_seconds) < 0.05
    sound, tail = frames[: int(1.4 * rate) * step], frames[int(1.6 * rate) * step :]
    assert max(sound) > 0 and tail and set(tail) == {0}  # the song for 1.5 s, then silence


async def test_cancel_stops_the_prediction(client: TestClient, sim: Simulator) -> None:
    clip_id = await make_clip(client, sim)
    audio_id = await make_song(client, 10.0)
    sim.video_latency = 30
    accepted = await submit(client, video_job_id=clip_id, audio_id=audio_id)
    running = await wait_for(client, accepted["job_id"], lambda s: s["provider_prediction_id"])
    response = await client.delete(accepted["status_url"])
    assert response.status == 200
    state = await response.json()
    assert state["status"] == "canceled" and state["error"]["code"] == "job_canceled"
    prediction_id = running["provider_prediction_id"]
    assert ("replicate.cancel", f"/replicate/v1/predictions/{prediction_id}/cancel") in sim.requests
    assert sim.load("predictions", prediction_id)["status"] == "canceled"
    gone = await client.get(f"/api/mv/get_video/{accepted['job_id']}")
    assert gone.status == 409 and (await gone.json())["error"]["code"] == "job_canceled"


async def test_with_webhooks_only_a_job_that_asks_for_provider_logs_gets_logs_webhooks(
    hook_client: Any, sim: Simulator
) -> None:
    client = await hook_client()
    clip_id = await make_clip(client, sim)
    audio_id = await make_song(client, 10.0)
    sim.video_latency = 0.5
    filters = []
    for asked in (False, True):
        accepted = await submit(client, video_job_id=clip_id, audio_id=audio_id, provider_logs=asked)
        events = await events_of(client, accepted["job_id"])
        assert events[-1]["event"] == "succeeded", events[-1]
        record = sim.load("predictions", events[-1]["data"]["provider_prediction_id"])
        filters.append(record["webhook_events_filter"])
    assert filters == [["start", "completed"], ["start", "logs", "completed"]]


async def test_a_running_job_resumes_with_the_same_prediction_after_a_restart(make_client: Any, sim: Simulator) -> None:
    first = await make_client()
    clip_id = await make_clip(first, sim)
    audio_id = await make_song(first, 10.0)
    sim.video_latency = 1.5
    accepted = await submit(first, video_job_id=clip_id, audio_id=audio_id, audio_start=1.0)
    running = await wait_for(
        first, accepted["job_id"], lambda s: s["provider_prediction_id"] and s["stage"] == "generating"
    )
    creates = count_routes(sim, "replicate.create")
    await first.close()  # shutdown mid-job: the record stays "running" with its prediction id

    second = await make_client()
    events = await events_of(second, accepted["job_id"])
    assert events[-1]["event"] == "succeeded", events[-1]
    assert events[-1]["data"]["provider_prediction_id"] == running["provider_prediction_id"]
    assert count_routes(sim, "replicate.create") == creates  # no second prediction
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert (await (await second.get(events[-1]["data"]["video_url"])).read())[4:8] == b"ftyp"


@pytest.mark.both_backends
async def test_a_job_stopped_before_its_prediction_existed_cuts_the_window_again(
    make_client: Any, sim: Simulator
) -> None:
    first = await make_client()
    clip_id = await make_clip(first, sim)
    audio_id = await make_song(first, 10.0)
    uploads = count_routes(sim, "replicate.files.create")
    sim.add_fault("replicate.files.create", "hang")  # the first upload never answers
    accepted = await submit(first, video_job_id=clip_id, audio_id=audio_id, audio_start=0.5)
    async with asyncio.timeout(10):
        while count_routes(sim, "replicate.files.create") == uploads:
            await asyncio.sleep(0.02)
    state = await (await first.get(accepted["status_url"])).json()
    assert state["status"] == "running" and state["provider_prediction_id"] is None
    await first.close()

    second = await make_client()
    events = await events_of(second, accepted["job_id"])
    assert events[-1]["event"] == "succeeded", events[-1]
    assert count_routes(sim, "replicate.create") == 2  # the clip's prediction and this one, once
    window = uploaded(sim, prediction_inputs(sim, events[-1]["data"]["provider_prediction_id"])["audio"])
    assert abs(probe_media(window)["duration"] - 4.0) < 0.05
    assert await windows_left(second) == []


async def test_a_failed_prediction_fails_the_job_with_the_provider_error(client: TestClient, sim: Simulator) -> None:
    clip_id = await make_clip(client, sim)
    audio_id = await make_song(client, 10.0)
    sim.add_fault("replicate.create", "fail_prediction", error="E006: no face found in the video")
    accepted = await submit(client, video_job_id=clip_id, audio_id=audio_id)
    final = (await events_of(client, accepted["job_id"]))[-1]
    assert final["event"] == "failed"
    error = final["data"]["error"]
    assert (
        error["code"] == "provider_prediction_failed" and error["provider_error"] == "E006: no face found in the video"
    )


@pytest.mark.both_backends
async def test_a_song_removed_before_the_start_fails_the_job_naming_it(make_client: Any, sim: Simulator) -> None:
    client = await make_client(MV_MAX_CONCURRENT_JOBS=1)
    clip_id = await make_clip(client, sim)
    audio_id = await make_song(client, 10.0)
    sim.video_latency = 30
    blocker = await (await client.post("/api/mv/generate_video", json={"prompt": SINGER_PROMPT, "duration": 4})).json()
    accepted = await submit(client, video_job_id=clip_id, audio_id=audio_id)
    await artefacts_of(client).delete(f"audio/{audio_id}.json")
    await client.delete(blocker["status_url"])
    state = await wait_for(client, accepted["job_id"], lambda s: s["status"] in ("failed", "succeeded"))
    assert state["status"] == "failed"
    assert state["error"]["code"] == "not_found" and state["error"]["field"] == "audio_id"


async def test_project_and_scene_ids_pass_through_unchanged(client: TestClient, sim: Simulator) -> None:
    clip_id = await make_clip(client, sim)
    audio_id = await make_song(client, 10.0)
    project_id, scene_id = new_id(), new_id()
    accepted = await submit(client, video_job_id=clip_id, audio_id=audio_id, project_id=project_id, scene_id=scene_id)
    job = await client.app[JOBS].get(accepted["job_id"])
    assert job is not None and job.kind == "lipsync"
    assert job.request["project_id"] == project_id and job.request["scene_id"] == scene_id
    await client.delete(accepted["status_url"])


@pytest.mark.both_backends
async def test_sandbox_mode_lipsyncs_with_the_built_in_simulator(make_client: Any, tmp_path: Path) -> None:
    client = await make_client(
        GEMINI_API_KEY=None,
        REPLICATE_API_TOKEN=None,
        GOOGLE_VERTEX_API_KEY=None,
        MV_REPLICATE_BASE_URL=None,
        MV_VERTEX_BASE_URL=None,
        MV_GEMINI_BASE_URL=None,
        MV_SANDBOX_VIDEO_SECONDS=0.3,
    )
    response = await client.post("/api/mv/generate_video", json={"prompt": SINGER_PROMPT, "duration": 4})
    clip = await wait_for(client, (await response.json())["job_id"], lambda s: s["status"] == "succeeded")
    audio_id = await make_song(client, 6.0, "wav")
    accepted = await submit(client, video_job_id=clip["job_id"], audio_id=audio_id, audio_start=2.0)
    assert accepted["sandbox"] is True
    final = (await events_of(client, accepted["job_id"]))[-1]
    assert final["event"] == "succeeded" and final["data"]["sandbox"] is True, final
    out = tmp_path / "sandbox.mp4"
    out.write_bytes(await (await client.get(final["data"]["video_url"])).read())
    media = probe_media(out)
    assert media["audio_codec"] == "aac" and abs(media["duration"] - 4.0) < 0.1


# -- bad requests ---------------------------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_bad_lipsync_requests_name_the_field(client: TestClient, sim: Simulator) -> None:
    clip_id = await make_clip(client, sim, duration=4)
    song = await make_song(client, 6.0)
    odd = await make_song(client, 6.0, sidecar={"format": "wma"})
    no_length = await make_song(client, 6.0)
    sidecar = await artefact_json(client, f"audio/{no_length}.json")
    await artefacts_of(client).put_json(
        f"audio/{no_length}.json", {k: v for k, v in sidecar.items() if k != "duration"}
    )
    sim.video_latency = 30
    pending = await (await client.post("/api/mv/generate_video", json={"prompt": SINGER_PROMPT, "duration": 4})).json()
    ok = {"video_job_id": clip_id, "audio_id": song}
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"video_job_id": new_id(), "audio_id": song}, 400, "clip_not_found", "video_job_id"),
        ({"video_job_id": pending["job_id"], "audio_id": song}, 400, "clip_not_ready", "video_job_id"),
        ({"video_job_id": "../../etc/passwd", "audio_id": song}, 400, "invalid_field", "video_job_id"),
        ({"audio_id": song}, 400, "missing_field", "video_job_id"),
        ({**ok, "audio_id": new_id()}, 404, "not_found", "audio_id"),
        ({**ok, "audio_id": no_length}, 404, "not_found", "audio_id"),
        ({**ok, "audio_id": odd}, 400, "invalid_audio", "audio_id"),
        ({**ok, "audio_start": -1}, 400, "invalid_field", "audio_start"),
        ({**ok, "audio_start": "1"}, 400, "invalid_field", "audio_start"),
        ({**ok, "audio_start": 6.0}, 400, "song_too_short", "audio_start"),
        ({**ok, "audio_start": 3.0}, 400, "song_too_short", "audio_start"),
        ({**ok, "audio_start": 3.0, "audio_end": 6.5}, 400, "song_too_short", "audio_end"),
        ({**ok, "audio_start": 0.5, "audio_end": 5.5}, 400, "window_too_long", "audio_end"),
        ({**ok, "audio_start": 2.0, "audio_end": 2.0}, 400, "invalid_field", "audio_end"),
        ({**ok, "audio_start": 2.0, "audio_end": 2.0 + 1e-9}, 400, "window_too_short", "audio_end"),
        ({**ok, "audio_start": 2.0, "audio_end": 2.49}, 400, "window_too_short", "audio_end"),
        ({**ok, "audio_start": 5.7, "audio_end": 6.04}, 400, "window_too_short", "audio_end"),  # 0.3 s of song
        ({**ok, "sync_mode": "stretch"}, 400, "invalid_field", "sync_mode"),
        ({**ok, "temperature": 1.5}, 400, "invalid_field", "temperature"),
        ({**ok, "active_speaker": "yes"}, 400, "invalid_field", "active_speaker"),
        ({**ok, "scene_id": new_id()}, 400, "invalid_field", "scene_id"),
        ({**ok, "project_id": "p1"}, 400, "invalid_field", "project_id"),
        ({**ok, "prompt": "sing"}, 400, "unknown_field", "prompt"),
    ]
    jobs_before = sorted(p.name for p in (client.app[STORE].root / "jobs").glob("*.json"))
    for body, status, code, field in cases:
        response = await client.post("/api/mv/lipsync", json=body)
        error = (await response.json())["error"]
        assert (response.status, error["code"], error.get("field")) == (status, code, field), (body, error)
    assert sorted(p.name for p in (client.app[STORE].root / "jobs").glob("*.json")) == jobs_before
    # integers are fine where seconds are asked for
    accepted = await submit(client, **ok, audio_start=1, audio_end=3, temperature=1)
    await client.delete(accepted["status_url"])
    shortest = await submit(client, **ok, audio_start=2.0, audio_end=2.5)  # exactly min_window_seconds
    await client.delete(shortest["status_url"])
    await client.delete(pending["status_url"])


def test_plan_window_and_the_cut_it_makes() -> None:
    assert plan_window(1.0, None, 4.0, 10.0, 0.5).end == 5.0
    assert plan_window(6.02, None, 4.0, 10.0, 0.5).end == 10.0  # within the tolerance: the last 20 ms are silence
    with pytest.raises(ApiError) as caught:
        plan_window(6.1, None, 4.0, 10.0, 0.5)
    assert caught.value.info.field == "audio_start"
    song = Song(Path("s.wav"), 10.0, "wav", 48000, 2)
    assert "copy" in cut_args(song, 1.0, 4.0, 4.0, Path("w.wav"))
    assert "copy" not in cut_args(song, 1.0, 2.0, 4.0, Path("w.wav"))  # padding needs a re-encode
    assert "copy" not in cut_args(Song(Path("s.wav"), 10.0, "wav", 96000, 2), 1.0, 4.0, 4.0, Path("w.wav"))
    assert "copy" not in cut_args(Song(Path("s.mp3"), 10.0, "mp3", 44100, 2), 1.0, 4.0, 4.0, Path("w.wav"))
    with pytest.raises(ApiError) as short:
        plan_window(2.0, 2.0 + 1e-9, 4.0, 10.0, 0.5)
    assert (short.value.info.code, short.value.info.field) == ("window_too_short", "audio_end")
    with pytest.raises(ApiError) as tiny_clip:
        plan_window(0.0, None, 0.2, 10.0, 0.5)
    assert tiny_clip.value.info.field == "video_job_id"
    for seconds, length in ((1e-9, 4.0), (4.0, 1e-9), (4e-7, 4.0)):
        with pytest.raises(DurationError):  # never "atrim=duration=0.000000", which ffmpeg reads as no limit
            cut_args(Song(Path("s.mp3"), 10.0, "mp3", 44100, 2), 1.0, seconds, length, Path("w.wav"))


@pytest.mark.parametrize(("fmt", "rate"), [("mp3", 44100), ("wav", 48000), ("wav", 96000)])
async def test_a_cut_writes_no_more_than_its_window_whatever_it_is_asked(tmp_path: Path, fmt: str, rate: int) -> None:
    """Even asked for 30 s of song under a 2 s clip (a planning bug), the cut stops at 2 s and its byte bound."""
    path = tmp_path / f"song.{fmt}"
    lavfi(path, f"sine=d=40:r={rate}", "-ac", "2", *_CODECS[fmt])
    song = Song(path, 40.0, fmt, rate, 2)
    dest = tmp_path / "window.wav"
    await cut_window(song, 1.0, 30.0, 2.0, dest, timeout=60)
    params, frames = wav_frames(dest)
    assert params.nframes / params.framerate == pytest.approx(2.0, abs=0.03)
    assert dest.stat().st_size <= max_cut_bytes(2.0)
    args = cut_args(song, 1.0, 30.0, 2.0, dest)
    output = args[args.index("-i") + 2 :]  # the options after the input file apply to the output
    assert output[output.index("-t") + 1] == "2.000000" and int(output[output.index("-fs") + 1]) <= max_cut_bytes(2.0)


async def test_a_song_file_that_lists_another_file_is_not_followed_by_the_cut(tmp_path: Path) -> None:
    """Every read of a saved song uses the demuxer of its format and the local file only: an ffconcat list saved under
    a song's name fails to cut instead of cutting the file it names."""
    real = tmp_path / "real.mp3"
    subprocess.run(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=d=6", str(real)],
        check=True,
        timeout=60,
    )
    fake = tmp_path / "fake.mp3"
    fake.write_text(f"ffconcat version 1.0\nfile {real.name}\n")
    with pytest.raises(MediaError):
        await cut_window(Song(fake, 6.0, "mp3", 44100, 1), 1.0, 4.0, 4.0, tmp_path / "w.wav", timeout=60)
    assert not (tmp_path / "w.wav").exists()


# -- the simulated model ----------------------------------------------------------------------------------------------


async def test_the_simulated_model_checks_its_input_and_cannot_read_local_files(
    sim: Simulator, sim_server: TestServer
) -> None:
    client = replicate.Client(api_token="r8_test", base_url=str(sim_server.make_url("/replicate")))
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await client.models.predictions.async_create(
            model="sync/lipsync-2-pro", input={"video": "not a url", "temperature": 2, "sync_mode": "x"}
        )
    assert caught.value.status == 422
    detail = caught.value.detail or ""
    for text in (
        "audio is required",
        "input.video: Does not match format 'uri'",
        "input.temperature: Must be less than or equal to 1",
        "input.sync_mode must be one of",
    ):
        assert text in detail, detail
    sim.video_latency = 0.1
    prediction = await client.models.predictions.async_create(
        model="sync/lipsync-2-pro", input={"video": "file:///etc/hostname", "audio": "file:///tmp/song.wav"}
    )
    await asyncio.sleep(0.15)
    prediction = await client.predictions.async_get(prediction.id)
    assert prediction.status == "failed" and "could not download file from file:///etc/hostname" in prediction.error


# -- settings and docs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["defaults"].update(sync_mode="remap") or d["allowed"].update(sync_mode=["cut_off"]), "sync_mode"),
        (lambda d: d["allowed"].update(sync_mode=["stretch"]), "allowed.sync_mode"),
        (lambda d: d["allowed"]["temperature"].update(max=2), "allowed.temperature.max"),
        (lambda d: d["defaults"].update(temperature=0.9) or d["allowed"]["temperature"].update(max=0.8), "temperature"),
        (lambda d: d.update(voice="alto"), "voice"),
        (lambda d: d["limits"].update(ffmpeg_concurrency=0), "limits.ffmpeg_concurrency"),
        (lambda d: d["limits"].update(min_window_seconds=0), "limits.min_window_seconds"),
    ],
)
def test_invalid_lipsync_settings_name_the_file_and_key(settings_dir: Path, change: Any, key: str) -> None:
    path = settings_dir / "lipsync.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_config(EnvSettings(settings_dir=settings_dir))
    assert str(path) in str(caught.value) and key in str(caught.value)


async def test_openapi_describes_the_lipsync_request_with_the_settings_defaults(client: TestClient) -> None:
    document = await (await client.get("/api/mv/openapi.json")).json()
    assert "202" in document["paths"]["/api/mv/lipsync"]["post"]["responses"]
    schema = document["components"]["schemas"]["LipsyncRequest"]
    assert set(schema["required"]) == {"video_job_id", "audio_id"}
    properties = schema["properties"]
    assert properties["sync_mode"]["default"] == "cut_off"
    assert set(properties["sync_mode"]["enum"]) == {"cut_off", "loop", "bounce", "silence", "remap"}
    assert properties["temperature"]["default"] == 0.5 and properties["temperature"]["maximum"] == 1.0
    assert "window_too_short" in document["paths"]["/api/mv/lipsync"]["post"]["responses"]["400"]["description"]
    upload_400 = document["paths"]["/api/mv/upload_audio"]["post"]["responses"]["400"]["description"]
    assert "audio_too_long" in upload_400 and "MV_MAX_AUDIO_SECONDS" in upload_400
