"""Assembly jobs with real ffmpeg over sandbox clips, on the file and the Redis job store: the final MP4 (H.264 +
AAC, its length), stream copy, crossfades, every 400, cancel (no ffmpeg left), re-run after a restart, and the
project flow (assemble from the timeline, lip-sync a scene into a new version that the next assembly uses)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from helpers import (
    HOLDER,
    SINGER_PROMPT,
    AppClient,
    events_of,
    ffmpeg_folder,
    make_clip,
    make_song,
    proc_limit,
    read_sse,
    stored_names,
    wait_for,
)

from mvserver.appkeys import CONFIG, HEAVY_FFMPEG_SLOTS, JOBS, STORE
from mvserver.appkeys import PROJECTS as PROJECT_STORE
from mvserver.assembly import service as assembly_service
from mvserver.assembly.service import _field
from mvserver.core.artefacts import new_id
from mvserver.lipsync import service as lipsync_service
from mvserver.media.probe import MediaInfo, probe
from mvserver.projects import service as project_service
from mvserver.sandbox.app import Simulator
from mvserver.web.access.auth import create_key

pytestmark = pytest.mark.both_stores
FINAL = ("succeeded", "failed", "canceled")
PROJECTS = "/api/mv/projects"


async def assemble(client: TestClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/mv/assemble", json=body)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    assert accepted["kind"] == "assembly" and response.headers["Location"] == accepted["status_url"]
    assert set(accepted) >= {"job_id", "status_url", "events_url", "video_url"}
    return accepted


async def finished(client: TestClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    return await wait_for(client, job_id, lambda s: s["status"] in FINAL, timeout)


async def output_of(client: TestClient, state: dict[str, Any]) -> MediaInfo:
    """The served MP4, saved and probed with ffmpeg."""
    assert state["status"] == "succeeded", state
    data = await (await client.get(state["video_url"])).read()
    path = client.app[STORE].root / f"probe-{state['job_id']}.mp4"
    path.write_bytes(data)
    return await probe(path)


def assert_h264_aac(info: MediaInfo, seconds: float) -> None:
    assert info.first_video is not None and info.first_video.codec == "h264"
    assert info.first_audio is not None and info.first_audio.codec == "aac"
    assert info.duration is not None and abs(info.duration - seconds) <= 0.1, (info.duration, seconds)


async def error_of(response: Any) -> tuple[int, str | None]:
    return response.status, (await response.json())["error"].get("field")


def ffmpeg_writing(folder: Path) -> list[int]:
    """Pids of processes whose command line names a file under ``folder`` (the assembly's ffmpeg)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "ffmpeg" in cmdline and str(folder) in cmdline:
                pids.append(int(entry.name))
    return pids


# -- POST /api/mv/assemble ---------------------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_cut_assembly_of_whole_clips_is_stream_copied_with_the_song(client: TestClient, sim: Simulator) -> None:
    first, second = await make_clip(client, sim, 4), await make_clip(client, sim, 4)
    audio_id = await make_song(client, 20.0, "mp3")
    accepted = await assemble(
        client, clips=[{"job_id": first}, {"job_id": second}], audio_id=audio_id, audio_offset=3.0
    )
    async with client.get(accepted["events_url"]) as response:
        events = [e async for e in read_sse(response)]
    assert events[-1]["event"] == "succeeded", events[-1]
    assert any(e["event"] == "progress" and e["data"]["stage"] == "assembling" for e in events)
    state = await (await client.get(accepted["status_url"])).json()
    assert state["request"]["result"]["copied"] == [0, 1] and state["request"]["result"]["reencoded"] == []
    assert state["request"]["expected_seconds"] == pytest.approx(8.0, abs=0.05)
    assert_h264_aac(await output_of(client, state), 8.0)
    ranged = await client.get(state["video_url"], headers={"Range": "bytes=0-99"})
    assert ranged.status == 206 and len(await ranged.read()) == 100


@pytest.mark.both_backends
async def test_crossfade_with_trims_and_mixed_clip_audio(client: TestClient, sim: Simulator) -> None:
    first, second = await make_clip(client, sim, 4), await make_clip(client, sim, 4)
    audio_id = await make_song(client, 20.0, "wav")
    accepted = await assemble(
        client,
        clips=[{"job_id": first, "trim_in": 1.0}, {"job_id": second, "trim_out": 3.5}],
        audio_id=audio_id,
        transition="crossfade",
        crossfade_seconds=0.5,
        clip_audio="mix",
    )
    state = await finished(client, accepted["job_id"])
    expected = 3.0 + 3.5 - 0.5
    assert state["request"]["expected_seconds"] == pytest.approx(expected, abs=0.05)
    assert state["request"]["result"]["reencoded"] == [0, 1]
    assert_h264_aac(await output_of(client, state), expected)


async def test_every_bad_assembly_is_a_400_naming_the_field(client: TestClient, sim: Simulator) -> None:
    clip = await make_clip(client, sim, 4)
    audio_id = await make_song(client, 5.0, "mp3")
    sim.video_latency = 0.2
    response = await client.post(
        "/api/mv/generate_video",
        json={"prompt": SINGER_PROMPT, "duration": 4, "aspect_ratio": "9:16", "generate_audio": False},
    )
    portrait = (await response.json())["job_id"]
    assert (await finished(client, portrait))["status"] == "succeeded"
    sim.video_latency = 60.0
    running = await client.post("/api/mv/generate_video", json={"prompt": SINGER_PROMPT, "duration": 4})
    running_id = (await running.json())["job_id"]
    too_many = client.app[CONFIG].projects.limits.assembly_clips_max + 1
    cases: list[tuple[dict[str, Any], str]] = [
        ({"clips": []}, "clips"),
        ({"clips": [{"job_id": clip}] * too_many}, "clips"),
        ({"clips": [{"job_id": clip}, {"job_id": new_id()}]}, "clips.1.job_id"),
        ({"clips": [{"job_id": clip}, {"job_id": running_id}]}, "clips.1.job_id"),
        ({"clips": [{"job_id": "not-an-id"}]}, "clips.0.job_id"),
        ({"clips": [{"job_id": clip, "trim_out": 9.0}]}, "clips.0.trim_out"),
        ({"clips": [{"job_id": clip, "trim_in": 4.5}]}, "clips.0.trim_in"),
        ({"clips": [{"job_id": clip, "trim_in": 2.0, "trim_out": 1.0}]}, "clips.0.trim_out"),
        ({"clips": [{"job_id": clip}], "audio_id": audio_id, "audio_offset": 5.0}, "audio_offset"),
        ({"clips": [{"job_id": clip}], "audio_id": new_id()}, "audio_id"),
        ({"clips": [{"job_id": clip}, {"job_id": portrait}]}, "clips.1.job_id"),
        ({"clips": [{"job_id": clip}] * 2, "transition": "crossfade", "crossfade_seconds": 4.5}, "crossfade_seconds"),
        ({"clips": [{"job_id": clip}], "transition": "wipe"}, "transition"),
        ({"clips": [{"job_id": clip}], "clip_audio": "loud"}, "clip_audio"),
        ({"clips": [{"job_id": clip}], "fit": "stretch"}, "fit"),
        ({"clips": [{"job_id": clip}], "extra": 1}, "extra"),
    ]
    for body, field in cases:
        response = await client.post("/api/mv/assemble", json=body)
        assert await error_of(response) == (400, field), (body, await response.text())
    # the same mismatching clips are accepted with fit
    accepted = await assemble(client, clips=[{"job_id": clip}, {"job_id": portrait}], fit="letterbox")
    state = await finished(client, accepted["job_id"])
    info = await output_of(client, state)
    assert info.first_video is not None and abs(info.first_video.aspect - 16 / 9) < 0.01
    await client.post(f"/api/mv/jobs/{running_id}/cancel")


async def test_a_trim_or_crossfade_under_one_frame_is_a_400_and_one_frame_is_assembled(
    client: TestClient, sim: Simulator
) -> None:
    """One frame at the output's frame rate (24 fps here) is the least a trim may keep and the least a crossfade
    may last: less used to get a 202 and then fail (a trim) or run as no crossfade at all (1e-300)."""
    clip = await make_clip(client, sim, 4)
    frame = 1 / 24
    cases: list[tuple[dict[str, Any], str]] = [
        ({"clips": [{"job_id": clip, "trim_in": 1.0, "trim_out": 1.01}]}, "clips.0.trim_out"),
        ({"clips": [{"job_id": clip, "trim_in": 4.0 - frame / 4}]}, "clips.0.trim_in"),
        ({"clips": [{"job_id": clip}, {"job_id": clip, "trim_out": 1e-300}]}, "clips.1.trim_out"),
        (
            {"clips": [{"job_id": clip}] * 2, "transition": "crossfade", "crossfade_seconds": 1e-300},
            "crossfade_seconds",
        ),
        (
            {"clips": [{"job_id": clip}] * 2, "transition": "crossfade", "crossfade_seconds": frame * 0.9},
            "crossfade_seconds",
        ),
        ({"clips": [{"job_id": clip}], "transition": "crossfade", "crossfade_seconds": 1e-300}, "crossfade_seconds"),
    ]
    for body, field in cases:
        response = await client.post("/api/mv/assemble", json=body)
        assert await error_of(response) == (400, field), (body, await response.text())
    one_frame = await assemble(
        client, clips=[{"job_id": clip, "trim_in": 1.0, "trim_out": 1.0 + frame}, {"job_id": clip}]
    )
    one_frame_fade = await assemble(
        client, clips=[{"job_id": clip}] * 2, transition="crossfade", crossfade_seconds=frame
    )
    state = await finished(client, one_frame["job_id"])
    assert_h264_aac(await output_of(client, state), 4.0 + frame)
    state = await finished(client, one_frame_fade["job_id"])
    assert state["request"]["expected_seconds"] == pytest.approx(8.0 - frame, abs=1e-6)
    assert_h264_aac(await output_of(client, state), 8.0 - frame)


def test_media_field_names_become_api_field_names() -> None:
    assert _field("clips[2].trim_in") == "clips.2.trim_in"
    assert _field("clips[0]") == "clips.0"
    assert _field("song_offset") == "audio_offset" and _field("song") == "audio_id"


@pytest.mark.both_backends
async def test_cancel_kills_ffmpeg_and_leaves_nothing(client: TestClient, sim: Simulator) -> None:
    clip = await make_clip(client, sim, 8)
    accepted = await assemble(client, clips=[{"job_id": clip}] * 24, transition="crossfade", crossfade_seconds=0.5)
    videos = ffmpeg_folder(client, "videos")
    await wait_for(client, accepted["job_id"], lambda s: s["status"] == "running", 30)
    async with asyncio.timeout(30):
        while not ffmpeg_writing(videos):
            await asyncio.sleep(0.05)
    response = await client.post(f"/api/mv/jobs/{accepted['job_id']}/cancel")
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "canceled"
    assert ffmpeg_writing(videos) == []
    left = [name for name in await stored_names(client, "videos") if not name.startswith(clip)]
    assert left == []  # no output, no temporaries (the clip and its poster stay)


async def test_a_running_assembly_is_run_again_after_a_restart(make_client: AppClient, sim: Simulator) -> None:
    first = await make_client()
    clip = await make_clip(first, sim, 4)
    audio_id = await make_song(first, 60.0, "mp3")
    body = {"clips": [{"job_id": clip}] * 6, "transition": "crossfade", "crossfade_seconds": 0.5, "audio_id": audio_id}
    accepted = await assemble(first, **body)
    videos = first.app[STORE].root / "videos"
    await wait_for(first, accepted["job_id"], lambda s: s["status"] == "running", 30)
    async with asyncio.timeout(30):
        while not ffmpeg_writing(videos):
            await asyncio.sleep(0.05)
    await first.close()  # shutdown mid-run: the record stays running
    assert ffmpeg_writing(videos) == []

    second = await make_client()
    state = await finished(second, accepted["job_id"], 180)
    assert_h264_aac(await output_of(second, state), 6 * 4 - 5 * 0.5)


# -- limits: ffmpeg slots, request caps, what each ffmpeg may use, one run of a job at a time --------------------


def media_settings(settings_dir: Path, **sections: dict[str, Any]) -> None:
    """Change ``settings/media.yaml`` of the apps built afterwards (``ffmpeg={...}``, ``assembly={...}``)."""
    path = settings_dir / "media.yaml"
    data = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        data[name].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def times(events: list[dict[str, Any]], stage: str | None = None, name: str | None = None) -> list[float]:
    return [
        e["data"]["event_time"]
        for e in events
        if (stage is None or e["data"].get("stage") == stage) and (name is None or e["event"] == name)
    ]


async def test_ffmpeg_heavy_runs_take_turns_in_the_nodes_slots_within_their_limits(
    make_client: AppClient, settings_dir: Path, sim: Simulator
) -> None:
    """One slot: a second assembly and a lip-sync cut wait (stage "waiting") until the first assembly's ffmpeg is
    done; every ffmpeg of a job runs with the memory and thread limits of media.yaml."""
    media_settings(settings_dir, ffmpeg={"concurrency": 1, "memory_mb": 900, "threads": 1})
    client = await make_client()
    clip = await make_clip(client, sim, 8)
    audio_id = await make_song(client, 20.0, "mp3")
    videos = client.app[STORE].root / "videos"
    first = await assemble(
        client,
        clips=[{"job_id": clip}] * 8,
        transition="crossfade",
        crossfade_seconds=0.5,
        audio_id=audio_id,
        clip_audio="mix",
    )
    await wait_for(client, first["job_id"], lambda s: s["stage"] == "assembling", 30)
    second = await assemble(client, clips=[{"job_id": clip}] * 2)
    response = await client.post("/api/mv/lipsync", json={"video_job_id": clip, "audio_id": audio_id})
    assert response.status == 202, await response.text()
    lipsync_id = (await response.json())["job_id"]
    await wait_for(client, second["job_id"], lambda s: s["stage"] == "waiting", 30)
    checked = False
    async with asyncio.timeout(60):
        while not checked:  # the pieces are short-lived processes: read one that is still there
            for pid in ffmpeg_writing(videos):
                try:
                    memory = proc_limit(pid, "Max data size")
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                except (OSError, AssertionError):
                    continue
                if "-progress" not in args:  # a probe of the clips, not a run
                    continue
                assert memory == (str(900 << 20),) * 2
                assert args[args.index("-i") - 2 : args.index("-i")] == ["-threads", "1"]
                checked = True
                break
            await asyncio.sleep(0.02)
    assert len(ffmpeg_writing(videos)) <= 1
    states = [await finished(client, job_id) for job_id in (first["job_id"], second["job_id"], lipsync_id)]
    assert [s["status"] for s in states] == ["succeeded"] * 3, states
    before = max(times(await events_of(client, first["job_id"]), "assembling"))  # its ffmpeg's progress
    later = await events_of(client, second["job_id"])
    assert times(later, "waiting") and min(times(later, "assembling")) >= before
    lipsync = await events_of(client, lipsync_id)
    assert min(times(lipsync, "generating")) >= before  # its prediction exists only after its cut


async def test_what_one_assembly_may_ask_is_capped_with_a_400_naming_the_field(
    make_client: AppClient, settings_dir: Path, sim: Simulator
) -> None:
    media_settings(settings_dir, assembly={"output_seconds_max": 7.5, "graph_clips_max": 2})
    client = await make_client()
    clip = await make_clip(client, sim, 4)
    long_cut = await client.post("/api/mv/assemble", json={"clips": [{"job_id": clip}] * 2})
    assert await error_of(long_cut) == (400, "clips")
    assert "7.5" in (await long_cut.json())["error"]["message"]
    short_middle = [{"job_id": clip}, {"job_id": clip, "trim_out": 1.5}, {"job_id": clip}]
    response = await client.post(
        "/api/mv/assemble", json={"clips": short_middle, "transition": "crossfade", "crossfade_seconds": 1.0}
    )
    assert await error_of(response) == (400, "crossfade_seconds")  # 3 clips in one graph, 2 allowed
    assert (await response.json())["error"]["code"] == "graph_too_large"
    # just under both caps: two clips crossfaded by half a second last 7.5 s
    accepted = await assemble(client, clips=[{"job_id": clip}] * 2, transition="crossfade", crossfade_seconds=0.5)
    assert_h264_aac(await output_of(client, await finished(client, accepted["job_id"])), 7.5)

    response = await client.post(
        PROJECTS, json={"idea": "a song", "character_description": "a singer", "number_of_scenes": 2}
    )
    project = await response.json()
    patch = {"scenes": [{"id": s["id"], "prompt": SINGER_PROMPT, "duration": 4} for s in project["scenes"]]}
    response = await client.patch(
        f"{PROJECTS}/{project['project_id']}", json=patch, headers={"If-Match": project["etag"]}
    )
    assert response.status == 200, await response.text()
    sim.video_latency = 0.2
    response = await client.post(f"{PROJECTS}/{project['project_id']}/clips", json={"generate_audio": False})
    for job in (await response.json())["jobs"]:
        assert (await finished(client, job["job_id"]))["status"] == "succeeded"
    response = await client.post(f"{PROJECTS}/{project['project_id']}/assemble", json={})
    assert await error_of(response) == (400, "scenes")


async def test_an_ffmpeg_past_its_time_or_memory_limit_fails_the_job_clearly(
    make_client: AppClient, settings_dir: Path, sim: Simulator
) -> None:
    media_settings(settings_dir, ffmpeg={"timeout_base_seconds": 0.05, "timeout_seconds_per_output_second": 0})
    client = await make_client()
    clip = await make_clip(client, sim, 4)
    videos = client.app[STORE].root / "videos"
    accepted = await assemble(client, clips=[{"job_id": clip}] * 4, transition="crossfade")
    state = await finished(client, accepted["job_id"])
    assert state["status"] == "failed" and state["error"]["code"] == "assembly_timeout", state
    assert "0.05 s" in state["error"]["message"] and "timeout" in state["error"]["message"]
    assert ffmpeg_writing(videos) == [] and not list(videos.glob(f"*{accepted['job_id']}*"))

    await client.close()  # on Redis it would claim the next job too
    media_settings(settings_dir, ffmpeg={"timeout_base_seconds": 60, "memory_mb": 64})
    tight = await make_client()
    accepted = await assemble(tight, clips=[{"job_id": clip}] * 2, transition="crossfade")
    state = await finished(tight, accepted["job_id"])
    assert state["status"] == "failed" and state["error"]["code"] == "assembly_too_large", state
    assert "64 MiB" in state["error"]["message"] and "memory_mb" in state["error"]["message"]


async def test_a_resumed_assembly_waits_while_an_earlier_runs_ffmpeg_is_alive(
    make_client: AppClient, sim: Simulator
) -> None:
    """What an ffmpeg that outlived its server looks like to the next run of the job: the job's run lock held by
    another process. The job waits (stage "waiting", no ffmpeg) until that process is gone, then runs."""
    first = await make_client()
    clip = await make_clip(first, sim, 4)
    accepted = await assemble(first, clips=[{"job_id": clip}] * 6, transition="crossfade")
    job_id = accepted["job_id"]
    videos = first.app[STORE].root / "videos"
    await wait_for(first, job_id, lambda s: s["stage"] == "assembling", 30)
    lock = first.app[STORE].path("jobs", job_id, ".ffmpeg.lock")
    await first.close()  # shutdown mid-run: the job resumes at the next start
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert await asyncio.to_thread(holder.stdout.readline) == b"holding\n"
        second = await make_client()
        await wait_for(second, job_id, lambda s: s["stage"] == "waiting", 30)
        assert ffmpeg_writing(videos) == []
        holder.stdin.close()  # type: ignore[union-attr]
        released = holder.wait(timeout=10) == 0 and asyncio.get_running_loop().time()
        state = await finished(second, job_id)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert state["status"] == "succeeded", state
    assert_h264_aac(await output_of(second, state), 6 * 4 - 5 * 0.5)
    events = await events_of(second, job_id)
    waiting = [i for i, e in enumerate(events) if e["data"].get("stage") == "waiting"]
    assert waiting and any(e["data"].get("stage") == "assembling" for e in events[waiting[-1] :])
    assert released


# -- projects ------------------------------------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_project_assembly_and_a_lipsynced_scene_version(client: TestClient, sim: Simulator) -> None:
    audio_id = await make_song(client, 12.0, "mp3")
    response = await client.post(
        PROJECTS,
        json={
            "idea": "a song",
            "character_description": "a singer",
            "audio_id": audio_id,
            "audio_offset": 1.0,
            "number_of_scenes": 2,
        },
    )
    assert response.status == 201, await response.text()
    project = await response.json()
    pid = project["project_id"]
    scenes = [s["id"] for s in project["scenes"]]
    etag = project["etag"]
    patch = {"scenes": [{"id": s, "prompt": SINGER_PROMPT, "duration": 4} for s in scenes]}
    response = await client.patch(f"{PROJECTS}/{pid}", json=patch, headers={"If-Match": etag})
    assert response.status == 200, await response.text()

    # no clip yet: 400 naming the scene
    response = await client.post(f"{PROJECTS}/{pid}/assemble", json={})
    assert await error_of(response) == (400, "scenes.0")
    response = await client.post(f"{PROJECTS}/{pid}/scenes/{scenes[0]}/lipsync", json={})
    assert await error_of(response) == (400, "scenes.0")

    sim.video_latency = 0.2
    response = await client.post(f"{PROJECTS}/{pid}/clips", json={"generate_audio": False})
    assert response.status == 202, await response.text()
    clips = [j["job_id"] for j in (await response.json())["jobs"]]
    for job_id in clips:
        assert (await finished(client, job_id))["status"] == "succeeded"
    project = await (await client.get(f"{PROJECTS}/{pid}")).json()
    response = await client.patch(
        f"{PROJECTS}/{pid}", json={"scenes": [{"id": scenes[1], "trim_in": 0.5}]}, headers={"If-Match": project["etag"]}
    )
    assert response.status == 200, await response.text()

    response = await client.post(
        f"{PROJECTS}/{pid}/assemble", json={"transition": "cut", "crossfade_seconds": 0.5, "clip_audio": "drop"}
    )
    assert response.status == 202, await response.text()
    body = await response.json()
    assert set(body) >= {"job_id", "status_url", "events_url", "video_url", "project"}
    assert body["project"]["assembly_job_id"] == body["job_id"]
    state = await finished(client, body["job_id"])
    assert state["request"]["project_id"] == pid
    assert [c["job_id"] for c in state["request"]["clips"]] == clips
    assert_h264_aac(await output_of(client, state), 4.0 + 3.5)

    # lip-sync the second scene: its slice of the song starts at 1 + 4 = 5 s (trim_in 0.5 earlier for the clip)
    response = await client.post(f"{PROJECTS}/{pid}/scenes/{scenes[1]}/lipsync", json={})
    assert response.status == 202, await response.text()
    body = await response.json()
    lipsync_id = body["job"]["job_id"]
    scene = body["project"]["scenes"][1]
    assert [v["job_id"] for v in scene["versions"]] == [clips[1], lipsync_id]
    assert scene["awaited_job_id"] == lipsync_id and scene["chosen_job_id"] == clips[1]
    record = await (await client.get(f"/api/mv/jobs/{lipsync_id}")).json()
    assert record["kind"] == "lipsync"
    assert record["request"]["window"]["start"] == pytest.approx(4.5)
    assert record["request"]["window"]["end"] == pytest.approx(8.5)
    assert (record["request"]["project_id"], record["request"]["scene_id"]) == (pid, scenes[1])
    assert (await finished(client, lipsync_id))["status"] == "succeeded"

    project = await (await client.get(f"{PROJECTS}/{pid}")).json()
    assert project["scenes"][1]["chosen_job_id"] == lipsync_id
    response = await client.post(
        f"{PROJECTS}/{pid}/assemble", json={"transition": "crossfade", "crossfade_seconds": 0.5, "clip_audio": "mix"}
    )
    assert response.status == 202, await response.text()
    body = await response.json()
    state = await finished(client, body["job_id"])
    assert [c["job_id"] for c in state["request"]["clips"]] == [clips[0], lipsync_id]
    assert state["request"]["clips"][1]["trim_in"] == pytest.approx(0.5)
    assert_h264_aac(await output_of(client, state), 4.0 + 3.5 - 0.5)
    assert body["project"]["assembly_job_id"] == body["job_id"]


async def test_project_actions_refuse_unknown_options_and_ids(client: TestClient) -> None:
    response = await client.post(
        PROJECTS, json={"idea": "a song", "character_description": "a singer", "number_of_scenes": 1}
    )
    project = await response.json()
    pid, scene = project["project_id"], project["scenes"][0]["id"]
    assert await error_of(await client.post(f"{PROJECTS}/{pid}/assemble", json={"clips": []})) == (400, "clips")
    assert await error_of(await client.post(f"{PROJECTS}/{pid}/assemble", json={"transition": "x"})) == (
        400,
        "transition",
    )
    assert (await client.post(f"{PROJECTS}/{new_id()}/assemble", json={})).status == 404
    assert await error_of(await client.post(f"{PROJECTS}/{pid}/scenes/{scene}/lipsync", json={})) == (400, "audio_id")
    assert (await client.post(f"{PROJECTS}/{pid}/scenes/{new_id()}/lipsync", json={})).status == 404
    assert await error_of(
        await client.post(f"{PROJECTS}/{pid}/scenes/{scene}/lipsync", json={"audio_id": new_id()})
    ) == (400, "audio_id")


async def test_the_callers_key_owns_the_assembly_and_lipsync_jobs(
    make_client: AppClient, tmp_path: Path, sim: Simulator
) -> None:
    keys_file = tmp_path / "keys.yaml"
    record, key = create_key(keys_file, "alice")
    client = await make_client(MV_API_KEYS_FILE=keys_file, MV_URL_SIGNING_SECRET="s" * 40)
    auth = {"Authorization": f"Bearer {key}"}
    sim.video_latency = 0.2
    response = await client.post("/api/mv/generate_video", json={"prompt": SINGER_PROMPT, "duration": 4}, headers=auth)
    assert response.status == 202, await response.text()
    clip = (await response.json())["job_id"]
    async with asyncio.timeout(30):
        while (await client.app[JOBS].get(clip)).status != "succeeded":  # type: ignore[union-attr]
            await asyncio.sleep(0.05)
    audio_id = await make_song(client, 10.0, "mp3")
    response = await client.post("/api/mv/assemble", json={"clips": [{"job_id": clip}]}, headers=auth)
    assert response.status == 202, await response.text()
    job = await client.app[JOBS].get((await response.json())["job_id"])
    assert job is not None and job.owner == record.id and job.kind == "assembly"
    response = await client.post("/api/mv/lipsync", json={"video_job_id": clip, "audio_id": audio_id}, headers=auth)
    assert response.status == 202, await response.text()
    job = await client.app[JOBS].get((await response.json())["job_id"])
    assert job is not None and job.owner == record.id and job.kind == "lipsync"
    await client.app[JOBS].cancel(job.id)


async def project_with_clips(client: TestClient, sim: Simulator) -> tuple[str, list[str], list[str]]:
    """A project with a song and two scenes whose clips have just finished (not yet folded into the record)."""
    audio_id = await make_song(client, 12.0, "mp3")
    body = {"idea": "a song", "character_description": "a singer", "audio_id": audio_id, "number_of_scenes": 2}
    project = await (await client.post(PROJECTS, json=body)).json()
    pid, scenes = project["project_id"], [s["id"] for s in project["scenes"]]
    patch = {"scenes": [{"id": s, "prompt": SINGER_PROMPT, "duration": 4} for s in scenes]}
    response = await client.patch(f"{PROJECTS}/{pid}", json=patch, headers={"If-Match": project["etag"]})
    assert response.status == 200, await response.text()
    sim.video_latency = 0.2
    response = await client.post(f"{PROJECTS}/{pid}/clips", json={"generate_audio": False})
    assert response.status == 202, await response.text()
    clips = [j["job_id"] for j in (await response.json())["jobs"]]
    for job_id in clips:
        assert (await finished(client, job_id))["status"] == "succeeded"
    return pid, scenes, clips


class Reads:
    """Counts, while a request is answered, the project reads, settles, job-store reads and clip probes."""

    def __init__(self, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts = dict.fromkeys(("project_reads", "settles", "job_reads", "probes"), 0)
        store, engine = client.app[PROJECT_STORE], client.app[JOBS]
        self._count(monkeypatch, store, "get", "project_reads")
        put, inside = store.put, []

        async def put_reading_its_own(*args: Any, **kwargs: Any) -> Any:
            inside.append(True)  # a store's compare-and-set may read the record: that is the write, not a load
            try:
                return await put(*args, **kwargs)
            finally:
                inside.pop()

        monkeypatch.setattr(store, "put", put_reading_its_own)
        self._inside_put = inside
        self._count(monkeypatch, engine, "get", "job_reads")
        self._count(monkeypatch, project_service, "settle", "settles")
        # the probes of mvserver.media, counted in the services that call them
        self._count(monkeypatch, assembly_service, "probe_clips", "probes")
        self._count(monkeypatch, assembly_service, "probe", "probes")
        self._count(monkeypatch, lipsync_service, "probe", "probes")

    def _count(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, counter: str) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if not (counter == "project_reads" and self._inside_put):
                self.counts[counter] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@contextlib.asynccontextmanager
async def ffmpeg_slots_taken(client: TestClient) -> AsyncIterator[None]:
    """Every heavy ffmpeg slot held, so a job accepted meanwhile waits before it probes anything."""
    slots, held = client.app[HEAVY_FFMPEG_SLOTS], 0
    while not slots.locked():
        await slots.acquire()
        held += 1
    try:
        yield
    finally:
        for _ in range(held):
            slots.release()


async def test_a_project_assembly_loads_settles_and_probes_once(
    client: TestClient, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST …/assemble`` reads the project once (the compare-and-set of its link reuses it), settles it once (and
    its view once), reads each clip's job once and probes the clips once; the job runs the plan it was given."""
    pid, _, clips = await project_with_clips(client, sim)
    reads = Reads(client, monkeypatch)
    async with ffmpeg_slots_taken(client):
        response = await client.post(f"{PROJECTS}/{pid}/assemble", json={})
        assert response.status == 202, await response.text()
        counts = dict(reads.counts)
    assert counts == {"project_reads": 1, "settles": 2, "job_reads": len(clips), "probes": 1}
    body = await response.json()
    assert body["project"]["assembly_job_id"] == body["job_id"]
    assert [s["chosen_job_id"] for s in body["project"]["scenes"]] == clips
    state = await finished(client, body["job_id"])
    assert state["status"] == "succeeded" and [c["job_id"] for c in state["request"]["clips"]] == clips


async def test_a_scene_lipsync_loads_settles_and_reads_the_clip_once(
    client: TestClient, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST …/scenes/{id}/lipsync`` reads the project once, settles it once (and its view once), reads each
    version's job once (the clip check reuses the chosen one) and probes the clip once."""
    pid, scenes, clips = await project_with_clips(client, sim)
    reads = Reads(client, monkeypatch)
    async with ffmpeg_slots_taken(client):
        response = await client.post(f"{PROJECTS}/{pid}/scenes/{scenes[1]}/lipsync", json={})
        assert response.status == 202, await response.text()
        counts = dict(reads.counts)
        body = await response.json()
        await client.app[JOBS].cancel(body["job_id"])
    assert counts == {"project_reads": 1, "settles": 2, "job_reads": len(clips), "probes": 1}
    scene = body["project"]["scenes"][1]
    assert [v["job_id"] for v in scene["versions"]] == [clips[1], body["job_id"]]
    assert scene["awaited_job_id"] == body["job_id"] and scene["chosen_job_id"] == clips[1]


async def test_an_assembly_reads_each_clips_job_once_and_probes_once(
    client: TestClient, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clip listed several times is read from the job store once; all of them are probed in one run."""
    clip = await make_clip(client, sim, 4)
    reads = Reads(client, monkeypatch)
    async with ffmpeg_slots_taken(client):
        accepted = await assemble(client, clips=[{"job_id": clip}] * 3)
        counts = dict(reads.counts)
    assert counts == {"project_reads": 0, "settles": 0, "job_reads": 1, "probes": 1}
    state = await finished(client, accepted["job_id"])
    assert state["status"] == "succeeded" and [c["job_id"] for c in state["request"]["clips"]] == [clip] * 3
