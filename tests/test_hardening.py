"""Limits and consistency found by trying the service as an outsider: prompt size, decompression bombs, debug mode,
the integer rule, malformed headers, file modes and base64 variants."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import resource
import stat
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
import yaml
from aiohttp.test_utils import TestClient, TestServer
from helpers import PROJECT, AppClient, LiveApp, module_loop
from PIL import Image

from mvserver.sandbox import gemini_api, render
from mvserver.sandbox.app import Simulator

VIDEO = "/api/mv/generate_video"
PROMPT = "A getaway driver roller-skates through a neon disco."
LIMITS = yaml.safe_load((PROJECT / "settings" / "videos.yaml").read_text())["limits"]


def no_jobs(tmp_path: Path) -> bool:
    return not [path for path in (tmp_path / "outputs" / "jobs").rglob("*") if path.is_file()]


async def error_of(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status == status, await response.text()
    return (await response.json())["error"]


# -- 1. the rendered full prompt is capped -------------------------------------------------------------------------


async def test_a_rules_template_that_repeats_the_prompt_is_refused(
    client: TestClient, sim: Simulator, tmp_path: Path
) -> None:
    template = "{{ prompt }}" * 300  # 3,600 characters of template -> ~16,000 of prompt
    response = await client.post(VIDEO, json={"prompt": PROMPT, "video_rules_template": template})
    error = await error_of(response)
    assert error["field"] == "video_rules_template" and str(LIMITS["full_prompt_max_chars"]) in error["message"]
    assert no_jobs(tmp_path) and sim.requests == []


async def test_a_long_prompt_plus_the_configured_rules_is_refused_naming_prompt(client: TestClient) -> None:
    prompt = "a" * (LIMITS["full_prompt_max_chars"] - 10)  # within text_max_chars, but not with the rules appended
    error = await error_of(await client.post(VIDEO, json={"prompt": prompt}))
    assert error["field"] == "prompt"
    # the same prompt alone fits
    response = await client.post(VIDEO, json={"prompt": prompt, "video_rules_template": "", "duration": 4})
    assert response.status == 202
    await client.delete(f"/api/mv/jobs/{(await response.json())['job_id']}")


async def test_a_full_prompt_at_the_limit_is_accepted(client: TestClient) -> None:
    limit = LIMITS["full_prompt_max_chars"]
    template = "x" * (limit - len(PROMPT) - 2)  # prompt + "\n\n" + rules == limit
    response = await client.post(VIDEO, json={"prompt": PROMPT, "video_rules_template": template, "duration": 4})
    assert response.status == 202, await response.text()
    job = await (await client.get(f"/api/mv/jobs/{(await response.json())['job_id']}")).json()
    assert len(job["request"]["full_prompt"]) == limit
    await client.delete(f"/api/mv/jobs/{job['job_id']}")


# -- 3. decompression bombs ----------------------------------------------------------------------------------------

BOMB_SIDE = 13_000  # 169 megapixels; a 1-bit PNG of zeros is ~20 KB


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of side x side black pixels, built without allocating its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BOMB = png_bomb()


def test_the_bomb_is_a_small_valid_png() -> None:
    assert len(BOMB) < 100_000
    with Image.open(io.BytesIO(BOMB)) as image:
        assert image.size == (BOMB_SIDE, BOMB_SIDE) and image.format == "PNG"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_an_inline_bomb_is_refused_before_decoding(client: TestClient, sim: Simulator, tmp_path: Path) -> None:
    before = peak_rss_mib()
    for encoded in (base64.b64encode(BOMB).decode(), "data:image/png;base64," + base64.b64encode(BOMB).decode()):
        response = await client.post(VIDEO, json={"prompt": PROMPT, "reference_image_base64": encoded})
        error = await error_of(response)
        assert error["field"] == "reference_image_base64" and f"{BOMB_SIDE}x{BOMB_SIDE}" in error["message"]
    assert no_jobs(tmp_path) and sim.requests == []
    assert peak_rss_mib() - before < 100  # decoding would have taken ~170 MiB at 8 bits per pixel


async def test_a_saved_image_id_that_is_a_bomb_is_refused(client: TestClient, tmp_path: Path) -> None:
    """An image file replaced on disk (or any future path that saves client images) is checked as well."""
    image_id = str(uuid.uuid4())
    images = tmp_path / "outputs" / "images"
    (images / f"{image_id}.png").write_bytes(BOMB)
    (images / f"{image_id}.json").write_text(json.dumps({"image_id": image_id, "mime_type": "image/png"}))
    response = await client.post(VIDEO, json={"prompt": PROMPT, "reference_image_id": image_id})
    error = await error_of(response)
    assert error["field"] == "reference_image_id" and "pixels" in error["message"]
    assert no_jobs(tmp_path)


async def test_an_image_within_the_pixel_limit_is_accepted(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("1", (8000, 4500)).save(buffer, "PNG")  # 36 MP, under the 40 MP limit
    response = await client.post(
        VIDEO,
        json={"prompt": PROMPT, "duration": 8, "reference_image_base64": base64.b64encode(buffer.getvalue()).decode()},
    )
    assert response.status == 202, await response.text()
    await client.delete(f"/api/mv/jobs/{(await response.json())['job_id']}")


def test_the_simulator_refuses_a_bomb_from_its_header() -> None:
    assert render.oversized_image(BOMB) == f"{BOMB_SIDE}x{BOMB_SIDE}"
    assert render._decode_reference(BOMB, (640, 360)) is None
    body = {
        "instances": [
            {
                "prompt": PROMPT,
                "image": {"bytesBase64Encoded": base64.b64encode(BOMB).decode(), "mimeType": "image/png"},
            }
        ]
    }
    with pytest.raises(gemini_api.InvalidArgument, match="pixels"):
        gemini_api.parse_video_request(body)


async def test_the_replicate_simulator_fails_a_prediction_with_a_bomb(sim_server: TestServer, sim: Simulator) -> None:
    sim.video_latency = 0.1
    transport = httpx.AsyncHTTPTransport()
    rc = replicate.Client(
        api_token="r8_test", base_url=f"{str(sim_server.make_url('')).rstrip('/')}/replicate", transport=transport
    )
    rc.poll_interval = 0.05
    before = peak_rss_mib()
    try:
        prediction = await rc.models.predictions.async_create(
            model="google/veo-3.1",
            input={"prompt": PROMPT, "reference_images": ["data:image/png;base64," + base64.b64encode(BOMB).decode()]},
        )
        async with asyncio.timeout(20):
            await prediction.async_wait()
    finally:
        await transport.aclose()
    assert prediction.status == "failed" and "pixels" in prediction.error
    assert peak_rss_mib() - before < 100


# -- 5. debug output never changes the answer ------------------------------------------------------------------------


@pytest.mark.parametrize("debug", ["true", "false"])
async def test_deep_json_is_a_400_with_or_without_debug_mode(
    make_client: AppClient, debug: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(MV_DEBUG_MODE=debug)
    deep = {"prompt": PROMPT, "extra": json.loads("[" * 600 + "]" * 600)}
    with caplog.at_level("INFO"):
        response = await client.post(VIDEO, json=deep)
        error = await error_of(response)
    assert error["code"] == "unknown_field" and error["field"] == "extra"
    assert "Traceback" not in caplog.text and len(caplog.text.splitlines()) < 200


# -- 8. one integer rule; the OpenAPI document says what the server does --------------------------------------------


async def test_integral_floats_are_integers_everywhere(client: TestClient) -> None:
    response = await client.post(
        "/api/mv/create_scenes",
        json={
            "idea": "a heist at a roller disco",
            "character_description": "a getaway driver",
            "number_of_scenes": 2.0,
        },
    )
    assert response.status == 200, await response.text()
    assert len((await response.json())["scenes"]) == 2
    response = await client.post(VIDEO, json={"prompt": PROMPT, "seed": 256.0, "duration": 4.0})
    assert response.status == 202, await response.text()
    job = await (await client.get(f"/api/mv/jobs/{(await response.json())['job_id']}")).json()
    assert job["request"]["seed"] == 256 and isinstance(job["request"]["seed"], int)
    assert job["request"]["duration"] == 4 and isinstance(job["request"]["duration"], int)
    await client.delete(f"/api/mv/jobs/{job['job_id']}")
    for body in ({"seed": 1.5}, {"seed": True}, {"duration": 4.5}, {"duration": "4"}, {"seed": "1"}):
        error = await error_of(await client.post(VIDEO, json={"prompt": PROMPT, **body}))
        assert error["field"] == next(iter(body))


async def test_the_openapi_document_states_the_rules(client: TestClient) -> None:
    document = await (await client.get("/api/mv/openapi.json")).json()
    assert "8.0" in document["info"]["description"]
    video = document["components"]["schemas"]["GenerateVideoRequest"]["properties"]
    assert video["prompt"]["pattern"] and "pattern" not in video["negative_prompt"]
    scenes = document["paths"]["/api/mv/get_scenes/{scenes_id}.{ext}"]["get"]["responses"]["200"]["content"]
    assert set(scenes) == {"application/json", "text/markdown"}
    responses = document["paths"]["/api/mv/get_video/{video_id}"]["get"]["responses"]
    assert "video/mp4" in responses["206"]["content"] and "application/json" in responses["416"]["content"]
    posted = document["paths"]["/api/mv/generate_video"]["post"]["responses"]
    assert {"403", "415", "421"} <= set(posted)


async def test_whitespace_only_text_matches_the_published_pattern(client: TestClient) -> None:
    import re

    document = await (await client.get("/api/mv/openapi.json")).json()
    pattern = re.compile(document["components"]["schemas"]["GenerateVideoRequest"]["properties"]["prompt"]["pattern"])
    for text in (" ", "\u3000\t\n", "\u2028\u00a0", "\x85 "):
        assert not pattern.search(text)
        error = await error_of(await client.post(VIDEO, json={"prompt": text}))
        assert error["field"] == "prompt"
    for text in ("\x1c", "\ufeff", " a "):
        assert pattern.search(text)
        response = await client.post(VIDEO, json={"prompt": text, "duration": 4})
        assert response.status == 202, (text, await response.text())
        await client.delete(f"/api/mv/jobs/{(await response.json())['job_id']}")


async def test_a_malformed_header_is_a_400_without_a_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    raw = (
        b"GET /api/mv/health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\xff: x\r\n\r\n",
        b"POST /api/mv/create_scenes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
    )
    with caplog.at_level(logging.DEBUG):
        for request in raw:
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.split(b"\r\n", 1)[0].endswith(b"400 Bad Request"), answer
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 2 and all(r.exc_info is None and "\n" not in r.getMessage() for r in records), records
    assert "Traceback" not in caplog.text


# -- 10. file modes and base64 variants ------------------------------------------------------------------------------


async def test_every_saved_file_is_0644(client: TestClient, tmp_path: Path) -> None:
    response = await client.post(
        "/api/mv/create_scenes", json={"idea": "a heist", "character_description": "a driver", "number_of_scenes": 1}
    )
    assert response.status == 200
    response = await client.post("/api/mv/generate_character_reference", json={"character_description": "a driver"})
    assert response.status == 200
    response = await client.post(VIDEO, json={"prompt": PROMPT, "duration": 4})
    job_id = (await response.json())["job_id"]
    async with asyncio.timeout(20):
        while (await (await client.get(f"/api/mv/jobs/{job_id}")).json())["status"] != "succeeded":
            await asyncio.sleep(0.05)
    outputs = tmp_path / "outputs"
    files = {
        path: stat.S_IMODE(path.stat().st_mode)
        for kind in ("scenes", "images", "videos")
        for path in (outputs / kind).iterdir()
    }
    files[outputs / "jobs" / f"{job_id}.json"] = stat.S_IMODE((outputs / "jobs" / f"{job_id}.json").stat().st_mode)
    assert {path.suffix for path in files} >= {".json", ".md", ".png", ".mp4"}
    assert set(files.values()) == {0o644}, {p.name: oct(m) for p, m in files.items()}


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (61, 37), "orange").save(buffer, "PNG")  # odd sizes: the base64 needs padding
    return buffer.getvalue()


@pytest.mark.parametrize(
    "variant",
    [
        "standard",
        "unpadded",
        "url-safe",
        "url-safe unpadded",
        "wrapped at 76",
        "wrapped at 64 with LF",
        "data URI wrapped",
    ],
)
@module_loop
async def test_base64_variants_are_accepted(module_live: LiveApp, variant: str) -> None:
    client = module_live[0]
    data = png_bytes()
    text = base64.b64encode(data).decode()
    if "url-safe" in variant:
        text = base64.urlsafe_b64encode(data).decode()
        assert "-" in text or "_" in text
    if "unpadded" in variant:
        assert text.endswith("=")
        text = text.rstrip("=")
    if "wrapped" in variant:
        text = base64.encodebytes(data).decode().replace("\n", "\r\n")
        if "64" in variant:
            text = "\n".join(text.replace("\r\n", "")[i : i + 64] for i in range(0, len(text), 64))
    if "data URI" in variant:
        text = "data:image/png;base64," + text
    response = await client.post(VIDEO, json={"prompt": PROMPT, "duration": 8, "reference_image_base64": text})
    assert response.status == 202, await response.text()
    await client.delete(f"/api/mv/jobs/{(await response.json())['job_id']}")


@pytest.mark.parametrize(
    "text",
    [
        "a+b-" + base64.b64encode(b"x" * 30).decode(),
        "====",
        "YQ=",
        "Y",
        "YWJj$ZA==",
        base64.b64encode(b"x" * 30).decode() + "==",
    ],
)
@module_loop
async def test_malformed_base64_is_refused(module_live: LiveApp, text: str) -> None:
    client = module_live[0]
    error = await error_of(await client.post(VIDEO, json={"prompt": PROMPT, "reference_image_base64": text}))
    assert error["field"] == "reference_image_base64"


async def test_an_image_beyond_pillows_own_limit_is_refused_naming_pixels(client: TestClient) -> None:
    huge = png_bomb(20_000)  # 400 MP: Pillow itself raises DecompressionBombError on open
    assert render.oversized_image(huge)
    response = await client.post(
        VIDEO, json={"prompt": PROMPT, "reference_image_base64": base64.b64encode(huge).decode()}
    )
    error = await error_of(response)
    assert error["field"] == "reference_image_base64" and "pixels" in error["message"]
