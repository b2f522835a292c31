"""``python -m mvserver.sandbox``: serve the provider simulator on its own, as a separate process.

Point a server at it with ``MV_GEMINI_BASE_URL=http://HOST:PORT/gemini``, ``MV_VERTEX_BASE_URL=.../vertex`` and
``MV_REPLICATE_BASE_URL=.../replicate`` plus any non-empty provider keys. ``GET /_sim/health`` answers 200 once it
is serving; faults are injected with ``POST /_sim/faults`` and listed (pending and taken effect) with
``GET /_sim/faults``. With ``MV_SIM_API_TOKEN`` set (read from the environment, so it does not show in the process
list), the Replicate routes answer only that token, and its holder alone gets the webhook signing secret: a server
that wants webhooks from this simulator uses that token as its ``REPLICATE_API_TOKEN``. Without it any token is taken
and the secret is given to no one.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
from pathlib import Path

from aiohttp import web

from mvserver.sandbox.app import Simulator, create_simulator_app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mvserver.sandbox", description="Serve the provider simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to bind (default 8090)")
    parser.add_argument("--state-dir", type=Path, required=True, help="where predictions, operations and files live")
    parser.add_argument("--video-latency", type=float, default=12.0, help="seconds a video prediction takes")
    parser.add_argument("--image-latency", type=float, default=1.5, help="seconds an image prediction takes")
    parser.add_argument("--scenes-latency", type=float, default=0.5, help="seconds a generateContent call takes")
    parser.add_argument(
        "--render-cache",
        action="store_true",
        help="identical video requests share one rendered MP4 (keeps ffmpeg out of benchmarks)",
    )
    parser.add_argument(
        "--render-cache-dir",
        type=Path,
        help="where --render-cache keeps the MP4s (default STATE_DIR/cache); several simulators may share one",
    )
    parser.add_argument(
        "--output-pad-bytes",
        type=int,
        default=0,
        help="append an MP4 free box of this many bytes to every rendered video",
    )
    parser.add_argument(
        "--max-concurrent-renders",
        type=int,
        default=2,
        help="outputs rendered at once (each may decode a 40 MP reference image); default 2",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return parser


def make_simulator(args: argparse.Namespace) -> Simulator:
    """The :class:`Simulator` the parsed command line describes."""
    if min(args.video_latency, args.image_latency, args.scenes_latency, args.output_pad_bytes) < 0:
        raise ValueError("latencies and --output-pad-bytes must not be negative")
    if args.max_concurrent_renders < 1:
        raise ValueError("--max-concurrent-renders must be at least 1")
    return Simulator(
        args.state_dir,
        video_latency=args.video_latency,
        image_latency=args.image_latency,
        scenes_latency=args.scenes_latency,
        render_cache=args.render_cache,
        render_cache_dir=args.render_cache_dir,
        output_pad_bytes=args.output_pad_bytes,
        max_concurrent_renders=args.max_concurrent_renders,
        api_token=os.environ.get("MV_SIM_API_TOKEN", "").strip() or None,
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def raise_open_files_limit() -> None:
    """Many concurrent jobs mean many sockets: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        simulator = make_simulator(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_files_limit()
    app = create_simulator_app(simulator)
    app.router.add_get("/_sim/health", health, name="sim.health")
    print(f"simulator on http://{args.host}:{args.port} (state in {args.state_dir})", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
