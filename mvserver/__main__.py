"""``python -m mvserver [--host H] [--port P]``: load ``.env``, validate settings, serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from aiohttp import web
from dotenv import load_dotenv

from .app import create_app
from .config import ConfigError, EnvSettings


def main(argv: list[str] | None = None) -> int:
    load_dotenv()
    parser = argparse.ArgumentParser(prog="mvserver", description="Music-video generation backend.")
    parser.add_argument("--host", help="interface to bind (default MV_HOST or 127.0.0.1)")
    parser.add_argument("--port", help="port to bind (default MV_PORT or 8080)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per provider poll is noise
    try:
        env = EnvSettings.from_env()
        # The command line wins over MV_HOST/MV_PORT; the settings carry the address actually used (debug print,
        # default allowed hosts).
        env = dataclasses.replace(env, host=args.host or env.host,
                                  port=env.port if args.port is None else _port(args.port))
        app = create_app(env)
    except ConfigError as exc:
        print(f"mvserver: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        web.run_app(app, host=env.host, port=env.port, access_log_format='%r %s %b %Tfs')
    except OSError as exc:  # the address is in use, or cannot be bound
        print(f"mvserver: cannot listen on {env.host}:{env.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _port(raw: str) -> int:
    """A TCP port from ``--port``; ConfigError (one line, exit 2) for anything else."""
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"--port {raw!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port (0 to 65535)")
    return port


if __name__ == "__main__":
    sys.exit(main())
