"""The naive baseline: the usual first port of a video-generation script to aiohttp.

``POST /api/mv/generate_video`` calls Replicate with the synchronous ``replicate`` client inside the handler: it
creates the prediction, polls it in a ``time.sleep`` loop, downloads the output whole, writes it, then answers.
Every call blocks the event loop, so requests are served one after another. Only for ``bench.concurrency``.

``python -m bench.naive_server --port P --output-dir D`` with ``REPLICATE_API_TOKEN`` and ``MV_REPLICATE_BASE_URL``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
import replicate
from aiohttp import web

OUTPUT_DIR = web.AppKey("output_dir", Path)
POLL_SECONDS = web.AppKey("poll_seconds", float)


async def generate_video(request: web.Request) -> web.Response:
    body = await request.json()
    client = replicate.Client(api_token=os.environ["REPLICATE_API_TOKEN"], base_url=os.environ["MV_REPLICATE_BASE_URL"])
    inputs = {
        "prompt": body["prompt"],
        "duration": body.get("duration", 8),
        "aspect_ratio": "16:9",
        "generate_audio": True,
        "seed": body.get("seed"),
    }
    prediction = client.models.predictions.create(model="google/veo-3.1", input=inputs)
    while prediction.status not in ("succeeded", "failed", "canceled"):
        time.sleep(request.app[POLL_SECONDS])
        prediction.reload()
    if prediction.status != "succeeded":
        return web.json_response({"status": prediction.status, "error": prediction.error}, status=502)
    video = httpx.get(prediction.output, timeout=60).content
    video_id = str(uuid.uuid4())
    (request.app[OUTPUT_DIR] / f"{video_id}.mp4").write_bytes(video)
    return web.json_response({"status": "succeeded", "video_id": video_id, "bytes": len(video)})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--poll-seconds", type=float, default=0.25)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    app = web.Application()
    app[OUTPUT_DIR] = args.output_dir
    app[POLL_SECONDS] = args.poll_seconds
    app.router.add_post("/api/mv/generate_video", generate_video)
    app.router.add_get("/health", health)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
