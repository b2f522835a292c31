"""Clip posters: every stored clip's first frame as a JPEG (``poster_url``), and its length and frame size in the job
JSON, so a storyboard grid needs no ``<video>`` per clip; on both job stores."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import PROMPT, AppClient, leftovers, read_sse, stored_names, submit, two_key_client, wait_for
from PIL import Image, ImageChops, ImageStat

from mvserver.appkeys import ARTEFACTS
from mvserver.core.artefacts import artefact_key
from mvserver.core.config import PosterSettings
from mvserver.jobs import Job
from mvserver.media import probe as probe_module
from mvserver.media import run as run_module
from mvserver.media.errors import MediaError
from mvserver.media.probe import probe
from mvserver.sandbox.app import Simulator
from mvserver.videos.posters import describe, stored_hook

pytestmark = pytest.mark.both_stores
FINAL = ("succeeded", "failed", "canceled")


async def finished(client: TestClient, job_id: str, **headers: str) -> dict[str, Any]:
    async with client.get(f"/api/mv/jobs/{job_id}/events", headers=headers) as response:
        events = [event async for event in read_sse(response)]
    assert events[-1]["event"] == "succeeded", events[-1]
    return events[-1]["data"]


def first_frame(video: bytes, tmp: Path) -> Image.Image:
    """Frame 0 of an MP4, decoded by ffmpeg itself."""
    source, frame = tmp / "clip.mp4", tmp / "frame.png"
    source.write_bytes(video)
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(source), "-frames:v", "1", str(frame)],
        check=True,
        timeout=60,
    )
    return Image.open(frame).convert("RGB")


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel (0..255)."""
    return sum(ImageStat.Stat(ImageChops.difference(a, b.resize(a.size))).mean) / 3


@pytest.mark.both_backends
async def test_a_finished_clip_has_its_first_frame_length_and_size(
    client: TestClient, sim: Simulator, tmp_path: Path
) -> None:
    job_id = (await submit(client, duration=4))["job_id"]
    final = await finished(client, job_id)  # the succeeded event carries it all
    assert final["poster_url"] == f"/api/mv/get_poster/{job_id}"
    assert (final["video_width"], final["video_height"]) == (640, 360)
    assert final["video_seconds"] == pytest.approx(4.0, abs=0.1)
    state = await (await client.get(f"/api/mv/jobs/{job_id}")).json()
    assert {k: state[k] for k in ("poster_url", "video_seconds", "video_width", "video_height")} == {
        k: final[k] for k in ("poster_url", "video_seconds", "video_width", "video_height")
    }

    response = await client.get(final["poster_url"])
    assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
    poster = Image.open(io.BytesIO(await response.read()))
    assert poster.format == "JPEG" and poster.size == (640, 360)
    video = await (await client.get(final["video_url"])).read()
    assert difference(poster.convert("RGB"), first_frame(video, tmp_path)) < 6  # the first frame (JPEG-compressed)
    assert (await client.get(final["poster_url"], headers={"If-None-Match": response.headers["ETag"]})).status == 304

    # an assembly is a clip too
    response = await client.post("/api/mv/assemble", json={"clips": [{"job_id": job_id, "trim_out": 2.5}]})
    assembly = await response.json()
    final = await finished(client, assembly["job_id"])
    assert final["video_seconds"] == pytest.approx(2.5, abs=0.1) and final["poster_url"]
    assert (await client.get(final["poster_url"])).status == 200


async def test_a_portrait_poster_fits_the_configured_size(make_client: AppClient, settings_dir: Path) -> None:
    path = settings_dir / "videos.yaml"
    videos = yaml.safe_load(path.read_text())
    videos["posters"] = {"max_side": 128, "timeout_seconds": 20, "concurrency": 1}
    path.write_text(yaml.safe_dump(videos, sort_keys=False))
    client = await make_client()
    job_id = (await submit(client, duration=4, aspect_ratio="9:16"))["job_id"]
    final = await finished(client, job_id)
    assert (final["video_width"], final["video_height"]) == (360, 640)
    poster = Image.open(io.BytesIO(await (await client.get(final["poster_url"])).read()))
    assert poster.size == (72, 128)


@pytest.mark.both_backends
async def test_the_poster_has_the_videos_access_rules(make_client: AppClient, tmp_path: Path, sim: Simulator) -> None:
    client, alice, bob = await two_key_client(make_client, tmp_path)
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    sim.video_latency = 1.0
    response = await client.post("/api/mv/generate_video", json={"prompt": PROMPT, "duration": 4}, headers=as_alice)
    job_id = (await response.json())["job_id"]
    poster = f"/api/mv/get_poster/{job_id}"
    early = await client.get(poster, headers=as_alice)
    assert early.status == 409 and (await early.json())["error"]["code"] == "video_not_ready"
    await finished(client, job_id, **as_alice)
    assert (await client.get(poster, headers=as_alice)).status == 200
    assert (await client.get(poster)).status == 401
    stranger = await client.get(poster, headers=as_bob)
    assert stranger.status == 404 and (await stranger.json())["error"]["code"] == "not_found"  # as if unknown
    state = await (await client.get(f"/api/mv/jobs/{job_id}", headers=as_alice)).json()
    signed = state["signed_urls"]["poster_url"]
    assert signed.startswith(poster + "?")
    assert (await client.get(signed)).status == 200  # an <img src> needs no header
    assert (await client.get(signed.replace("sig=", "sig=x"))).status == 403


@pytest.mark.both_backends
async def test_a_clip_ffmpeg_cannot_read_has_no_poster_and_the_job_is_unharmed(
    client: TestClient, tmp_path: Path
) -> None:
    store = client.app[ARTEFACTS]
    job = Job(id="0" * 8 + "-0000-4000-8000-" + "0" * 12, backend="replicate", model="m", sandbox=True, request={})
    clip, poster = artefact_key("videos", job.id, ".mp4"), artefact_key("videos", job.id, ".jpg")
    await store.put_bytes(clip, b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 1000)
    await stored_hook(client.app)(job, clip)  # logged, not raised
    assert (job.poster, job.video_seconds, job.video_width) == (False, None, None)
    assert await store.stat(poster) is None
    # the same clip is read as an MP4 only: a file of another format is not opened with its own demuxer
    png = tmp_path / "image.png"
    Image.new("RGB", (32, 32), "red").save(png, "PNG")
    await store.put_bytes(clip, png.read_bytes())
    with pytest.raises(MediaError):
        await describe(job, store, clip, PosterSettings())
    assert await store.stat(poster) is None
    assert await stored_names(client, "videos") == [f"{job.id}.mp4"]  # no temporary left behind


async def test_a_stored_clip_is_described_and_cut_by_one_ffmpeg_start(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = client.app[ARTEFACTS]
    source, audio = tmp_path / "clip.mp4", tmp_path / "audio.mp4"
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    lavfi = ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=24:duration=2", "-f", "lavfi", "-i", "sine=d=2"]
    subprocess.run([ffmpeg, "-v", "error", "-y", *lavfi, "-pix_fmt", "yuv420p", str(source)], check=True, timeout=60)
    subprocess.run([ffmpeg, "-v", "error", "-y", *lavfi[4:], str(audio)], check=True, timeout=60)
    expected = await probe(source, demuxers=["mov"])
    starts: list[Sequence[str]] = []
    real = run_module.spawn_ffmpeg

    async def counted(args: Sequence[str], *rest: Any, **options: Any) -> Any:
        starts.append(args)
        return await real(args, *rest, **options)

    monkeypatch.setattr(run_module, "spawn_ffmpeg", counted)
    monkeypatch.setattr(probe_module, "spawn_ffmpeg", counted)

    job = Job(id="1" * 8 + "-0000-4000-8000-" + "0" * 12, backend="replicate", model="m", sandbox=True, request={})
    clip, poster = artefact_key("videos", job.id, ".mp4"), artefact_key("videos", job.id, ".jpg")
    await store.put_bytes(clip, source.read_bytes())
    await describe(job, store, clip, PosterSettings(max_side=160))
    assert len(starts) == 1  # the header and the poster from the same run
    assert expected.duration is not None and job.video_seconds == round(expected.duration, 3)
    assert job.poster and (job.video_width, job.video_height) == (320, 240)
    image = Image.open(io.BytesIO(await store.get_bytes(poster)))
    assert image.format == "JPEG" and image.size == (160, 120)

    # an MP4 without a video stream is described by that one run too: not a clip, no poster, nothing noted
    starts.clear()
    sound = Job(id="2" * 8 + "-0000-4000-8000-" + "0" * 12, backend="replicate", model="m", sandbox=True, request={})
    clip, poster = artefact_key("videos", sound.id, ".mp4"), artefact_key("videos", sound.id, ".jpg")
    await store.put_bytes(clip, audio.read_bytes())
    await describe(sound, store, clip, PosterSettings())
    assert len(starts) == 1 and (sound.poster, sound.video_seconds, sound.video_width) == (False, None, None)
    assert await store.stat(poster) is None
    assert await leftovers(client.app, "videos") == []  # no temporary left behind


async def test_project_versions_show_posters_and_sizes(client: TestClient) -> None:
    response = await client.post(
        "/api/mv/projects", json={"idea": "a rooftop party", "character_description": "a DJ", "number_of_scenes": 1}
    )
    project = await response.json()
    pid, scene_id = project["project_id"], project["scenes"][0]["id"]
    response = await client.patch(
        f"/api/mv/projects/{pid}",
        headers={"If-Match": project["etag"]},
        json={"scenes": [{"id": scene_id, "prompt": PROMPT, "duration": 4}]},
    )
    assert response.status == 200, await response.text()
    job_id = (await (await client.post(f"/api/mv/projects/{pid}/clips")).json())["jobs"][0]["job_id"]
    queued = (await (await client.get(f"/api/mv/projects/{pid}")).json())["scenes"][0]
    assert queued["versions"][0]["poster_url"] is None and queued["chosen_poster_url"] is None
    await wait_for(client, job_id, lambda s: s["status"] in FINAL)
    scene = (await (await client.get(f"/api/mv/projects/{pid}")).json())["scenes"][0]
    version = scene["versions"][0]
    assert version["poster_url"] == scene["chosen_poster_url"] == f"/api/mv/get_poster/{job_id}"
    assert (version["video_width"], version["video_height"]) == (640, 360)
    assert version["video_seconds"] == pytest.approx(4.0, abs=0.1)
