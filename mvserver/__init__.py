"""mvserver: an aiohttp backend for AI music-video generation."""

__version__ = "0.1.0"
