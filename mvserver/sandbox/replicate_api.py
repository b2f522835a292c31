"""Simulated Replicate HTTP API (filled in by the Replicate simulator work)."""

from __future__ import annotations

from aiohttp import web


def add_routes(router: web.UrlDispatcher) -> None:
    """No Replicate routes yet."""
