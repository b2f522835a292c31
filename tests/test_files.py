"""Songs, images and scene lists are served like videos: byte ranges, and a bad ``Range`` answered with the JSON
error shape."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest
from aiohttp.test_utils import TestClient

# The server serves the bytes itself: from the output directory, or streaming the object (a redirect leaves ranges
# to the store).
pytestmark = [pytest.mark.both_backends, pytest.mark.artefact_backends("local", "s3-proxy")]


async def a_song(client: TestClient, tmp_path: Path) -> tuple[str, bytes]:
    """Upload a one-second WAV tone; its URL and bytes."""
    path = tmp_path / "tone.wav"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(path)],
        check=True,
        timeout=60,
    )
    response = await client.post("/api/mv/upload_audio", data=path.read_bytes(), headers={"Content-Type": "audio/wav"})
    assert response.status == 201, await response.text()
    return (await response.json())["audio_url"], path.read_bytes()


async def an_image(client: TestClient) -> tuple[str, bytes]:
    response = await client.post("/api/mv/generate_character_reference", json={"character_description": "a cat"})
    assert response.status == 200, await response.text()
    url = (await response.json())["image_url"]
    return url, await (await client.get(url)).read()


async def a_scene_list(client: TestClient) -> tuple[str, bytes]:
    response = await client.post(
        "/api/mv/create_scenes", json={"idea": "a train", "character_description": "a cat", "number_of_scenes": 1}
    )
    assert response.status == 200, await response.text()
    url = (await response.json())["urls"]["markdown"]
    return url, await (await client.get(url)).read()


@pytest.mark.parametrize("kind", ["song", "image", "scene list"])
async def test_a_bad_range_is_a_json_416_and_a_good_one_a_206(client: TestClient, tmp_path: Path, kind: str) -> None:
    makers = {
        "song": lambda: a_song(client, tmp_path),
        "image": lambda: an_image(client),
        "scene list": lambda: a_scene_list(client),
    }
    url, data = await makers[kind]()
    size = len(data)
    part = await client.get(url, headers={"Range": "bytes=2-9"})
    assert part.status == 206 and await part.read() == data[2:10]
    for header in (f"bytes={size}-", "bytes=0-1,5-9"):
        response = await client.get(url, headers={"Range": header})
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{size}"
        assert response.headers["Content-Type"].startswith("application/json")
        error = (await response.json())["error"]
        assert error == {
            "code": "range_not_satisfiable",
            "field": "Range",
            "message": f"the Range header must be one byte range inside the {size}-byte {kind}",
        }
