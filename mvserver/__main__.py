"""``python -m mvserver [--host H] [--port P]``: load ``.env``, validate settings, serve."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web
from dotenv import load_dotenv

from .app import create_app
from .config import ConfigError, EnvSettings
from .jobs import StoreUnavailable


def main(argv: list[str] | None = None) -> int:
    load_dotenv()
    parser = argparse.ArgumentParser(prog="mvserver", description="Music-video generation backend.")
    parser.add_argument("--host", help="interface to bind (default MV_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default MV_PORT or 8080)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per provider poll is noise
    try:
        env = EnvSettings.from_env()
        app = create_app(env)
    except ConfigError as exc:
        print(f"mvserver: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        web.run_app(app, host=args.host or env.host, port=args.port or env.port, access_log_format='%r %s %b %Tfs')
    except StoreUnavailable as exc:
        print(f"mvserver: job store unavailable: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
