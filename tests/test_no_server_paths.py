"""No answer shows a server path: responses, job records, job events and error texts are scanned for the output
directory (and its ``outputs/…`` form), through an upload, an image, scenes, a video and a lip-sync job that fails
on a broken song file (ffmpeg names the file it could not read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import AppClient, artefact_file, artefacts_of, make_audio, read_sse

from mvserver.core.errors import ErrorInfo
from mvserver.openapi.schemas import AUDIO_SCHEMA

pytestmark = pytest.mark.both_stores


class Recorder:
    """Every body the client received, as text."""

    def __init__(self, client: TestClient):
        self.client = client
        self.bodies: list[str] = []

    async def json(self, method: str, path: str, status: int, **kwargs: Any) -> Any:
        response = await self.client.request(method, path, **kwargs)
        text = await response.text()
        self.bodies.append(text)
        assert response.status == status, text
        return json.loads(text)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events up to its final one (the stream closes after it)."""
        response = await self.client.get(f"/api/mv/jobs/{job_id}/events")
        events = [event async for event in read_sse(response)]
        self.bodies.extend(json.dumps(event["data"]) for event in events)
        return events


@pytest.mark.both_backends
async def test_no_response_or_job_event_shows_a_server_path(make_client: AppClient, tmp_path: Path) -> None:
    client = await make_client()
    outputs = tmp_path / "outputs"
    seen = Recorder(client)

    song = make_audio(tmp_path / "song.wav", seconds=10.0).read_bytes()
    uploaded = await seen.json("POST", "/api/mv/upload_audio", 201, data=song, headers={"Content-Type": "audio/wav"})
    assert "output_file" not in uploaded
    image = await seen.json(
        "POST",
        "/api/mv/generate_character_reference",
        200,
        json={"character_description": "a singer in a yellow raincoat", "number_of_images": 2},
    )
    assert "output_file" not in image and all("output_file" not in one for one in image["images"])
    scenes = await seen.json(
        "POST",
        "/api/mv/create_scenes",
        200,
        json={"idea": "a night train", "character_description": "a singer in a yellow raincoat", "number_of_scenes": 2},
    )
    assert "files" not in scenes
    video = await seen.json(
        "POST",
        "/api/mv/generate_video",
        202,
        json={"prompt": "a singer on a night platform", "duration": 8, "reference_image_id": image["image_id"]},
    )
    assert (await seen.events(video["job_id"]))[-1]["event"] == "succeeded"

    # The song breaks after its upload: the job's ffmpeg cut fails, and ffmpeg names the file it read (the stored
    # file, or on object storage its copy in the node's scratch directory).
    song_key = f"audio/{uploaded['audio_id']}.wav"
    await artefacts_of(client).put_bytes(song_key, b"RIFF not a wave file at all" * 100)
    lipsync = await seen.json(
        "POST", "/api/mv/lipsync", 202, json={"video_job_id": video["job_id"], "audio_id": uploaded["audio_id"]}
    )
    final = (await seen.events(lipsync["job_id"]))[-1]
    assert final["event"] == "failed" and final["data"]["error"]["code"] == "audio_cut_failed", final
    job = await seen.json("GET", f"/api/mv/jobs/{lipsync['job_id']}", 200)
    async with artefact_file(client, song_key) as read:
        assert read.name in job["error"]["message"], job["error"]  # the file is still named, not where it is
    await seen.json("GET", "/api/mv/jobs", 200)
    await seen.json("GET", f"/api/mv/get_scenes/{scenes['scenes_id']}.json", 200)

    forms = {str(outputs), str(outputs.resolve()), "outputs/", str(tmp_path)}
    for body in seen.bodies:
        assert not any(form in body for form in forms), body


def test_error_texts_name_files_but_never_where_they_are(tmp_path: Path) -> None:
    """Exception texts and ffmpeg output are cut at the source of every error (HTTP answers and job errors)."""
    from mvserver.core.errors import hide_paths_under

    hide_paths_under(tmp_path / "srv")
    where = tmp_path / "srv" / "videos" / ".clip.mp4.1a2b.part"
    info = ErrorInfo(
        "internal_error",
        f"FileNotFoundError: [Errno 2] No such file or directory: '{where}'",
        provider_error={"detail": [f"Unable to re-open {where} output file"]},
    )
    assert info.message == "FileNotFoundError: [Errno 2] No such file or directory: '.clip.mp4.1a2b.part'"
    assert info.provider_error == {"detail": ["Unable to re-open .clip.mp4.1a2b.part output file"]}
    url = f"see /api/mv/get_video/x or http://127.0.0.1:8080{where}"  # URLs and API paths stay as they are
    assert ErrorInfo("x", url).message == url


def test_the_openapi_document_has_no_server_path_fields() -> None:
    assert "output_file" not in AUDIO_SCHEMA["properties"] and "output_file" not in AUDIO_SCHEMA["required"]
