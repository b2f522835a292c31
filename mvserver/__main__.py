"""``python -m mvserver [--host H] [--port P]``: load ``.env``, validate settings, serve.

``python -m mvserver keys create NAME | list | revoke ID`` manages the API keys file named by ``MV_API_KEYS_FILE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

from dotenv import load_dotenv

from mvserver.core.config import ConfigError, EnvSettings
from mvserver.core.logs import AccessLogger, configure_logging
from mvserver.jobs import StoreUnavailable
from mvserver.web.access.auth import KeyLimits, create_key, read_keys, revoke_key
from mvserver.web.serving import run_app


def keys_main(argv: list[str]) -> int:
    """The ``keys`` subcommands; the new key is printed once, alone on the last line, and never stored."""
    parser = argparse.ArgumentParser(prog="mvserver keys", description="Manage the API keys in MV_API_KEYS_FILE.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="add a key and print it once")
    create.add_argument("name", help="who or what the key is for")
    for name, field in KeyLimits.model_fields.items():
        create.add_argument(
            f"--{name.replace('_', '-')}",
            type=float if "minute" in name or "budget" in name else int,
            help=f"default {field.default}",
        )
    create.add_argument("--admin", action="store_true", help="may read every key's usage (GET /api/mv/usage)")
    commands.add_parser("list", help="list the keys (ids, names, limits; never secrets)")
    revoke = commands.add_parser("revoke", help="revoke a key by id (the server stops accepting it within a second)")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    path_text = os.environ.get("MV_API_KEYS_FILE", "").strip()
    if not path_text:
        print(
            "mvserver keys: set MV_API_KEYS_FILE to the keys file path (YAML, or JSON if it ends in .json)",
            file=sys.stderr,
        )
        return 2
    path = Path(path_text)
    try:
        if args.command == "create":
            given = {name: getattr(args, name) for name in KeyLimits.model_fields if getattr(args, name) is not None}
            record, key = create_key(path, args.name, KeyLimits(**given), admin=args.admin)
            admin = "; admin" if record.admin else ""
            print(f"created key {record.id} ({record.name}) in {path}; limits: {record.limits.model_dump()}{admin}")
            print(
                f"webhook signing secret of this key (verifies its webhooks; not shown again): {record.webhook_secret}"
            )
            print("store this key now, it is not shown again:")
            print(key)
        elif args.command == "list":
            for record in read_keys(path).keys:
                state = f"revoked {record.revoked_at}" if record.revoked_at else "active"
                print(f"{record.id}\t{record.name}\t{record.created_at}\t{state}\t{record.limits.model_dump()}")
        else:
            revoked = revoke_key(path, args.key_id)
            if revoked is None:
                print(f"mvserver keys: no active key {args.key_id} in {path}", file=sys.stderr)
                return 1
            print(f"revoked key {revoked.id} ({revoked.name})")
    except (ConfigError, ValueError) as exc:
        print(f"mvserver keys: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    load_dotenv()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="mvserver", description="Music-video generation backend (python -m mvserver keys --help: API keys)."
    )
    parser.add_argument("--host", help="interface to bind (default MV_HOST or 127.0.0.1)")
    parser.add_argument("--port", help="port to bind (default MV_PORT or 8080)")
    args = parser.parse_args(argv)
    try:
        env = EnvSettings.from_env()
        # The command line wins over MV_HOST/MV_PORT; the settings carry the address actually used (debug print,
        # default allowed hosts).
        env = dataclasses.replace(
            env, host=args.host or env.host, port=env.port if args.port is None else _port(args.port)
        )
        configure_logging(env.log_format)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per provider poll is noise
        from mvserver.app import create_app  # here: the keys commands and --help need neither the app nor its SDKs

        app = create_app(env)
    except ConfigError as exc:
        print(f"mvserver: configuration error: {exc}", file=sys.stderr)
        return 2
    # ``kill -USR1 <pid>``: every thread's Python stack to stderr, for a node that seems stuck (no ptrace needed)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        run_app(
            app,
            host=env.host,
            port=env.port,
            access_log_class=AccessLogger,
            header_timeout=env.header_timeout_seconds or None,
        )
    except OSError as exc:  # the address is in use, or cannot be bound
        print(f"mvserver: cannot listen on {env.host}:{env.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"mvserver: job store unavailable: {exc}", file=sys.stderr)
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
