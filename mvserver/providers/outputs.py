"""What the server accepts as a provider's output file: where it may come from, how large it may be, what it must be.

A prediction's ``output`` is a URL the provider (or anyone who can sign a webhook delivery) names; fetching it
blindly lets that URL reach loopback or internal services and fill the disk. So an output is fetched only from an
allowed origin (redirects included, each hop checked before it is requested), read only up to a size cap (cut off
while streaming), and kept only when its first bytes are the expected media. Every path that stores a provider
output goes through here: video and lip-sync downloads after a poll or a webhook, image reads, Vertex's inline
videos.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from mvserver.core.config import DEFAULT_PORTS, origin_entry
from mvserver.core.errors import ApiError

# Where Replicate serves prediction outputs (``https://replicate.delivery/...``, ``https://<x>.replicate.delivery``).
DEFAULT_REPLICATE_OUTPUT_HOSTS = ("https://replicate.delivery:443", "https://*.replicate.delivery:443")
HEAD_BYTES = 12  # enough for every signature below
Media = Literal["mp4", "image"]


def url_origin(url: URL) -> str | None:
    """``scheme://host:port`` of an absolute http(s) URL, else None."""
    if url.scheme not in DEFAULT_PORTS or not url.raw_host:
        return None
    return origin_entry(url.scheme, url.raw_host, url.port)


@dataclass(frozen=True)
class OutputHosts:
    """The origins outputs may be fetched from (normalised by :func:`~mvserver.core.config.origin_entry`)."""

    entries: tuple[str, ...]

    def allows(self, url: URL) -> bool:
        origin = url_origin(url)
        if origin is None:
            return False
        scheme, _, rest = origin.partition("://")
        for entry in self.entries:
            entry_scheme, _, entry_rest = entry.partition("://")
            if entry_scheme != scheme:
                continue
            if entry_rest == rest:
                return True
            if entry_rest.startswith("*."):
                suffix_host, _, entry_port = entry_rest[2:].rpartition(":")
                host, _, port = rest.rpartition(":")
                if port == entry_port and host.endswith("." + suffix_host):
                    return True
        return False

    def check(self, url: URL, provider: str) -> None:
        """ApiError (``provider_output_refused``) unless ``url`` may be fetched."""
        if not self.allows(url):
            raise ApiError(
                502,
                "provider_output_refused",
                f"{provider} named an output at {url_origin(url) or url.scheme + ':'}, which is not an "
                "allowed output host; nothing was fetched",
                provider=provider,
                provider_status="succeeded",
            )


def _is_mp4(head: bytes) -> bool:
    """An ISO base media file starts with its ``ftyp`` box (size, ``ftyp``, major brand, minor version)."""
    return len(head) >= HEAD_BYTES and head[4:8] == b"ftyp" and int.from_bytes(head[:4], "big") >= 16


def _is_image(head: bytes) -> bool:
    """PNG, JPEG or WebP, by signature."""
    return (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )


_CHECKS = {
    "mp4": (_is_mp4, "an MP4 (no ftyp box at the start)"),
    "image": (_is_image, "a readable image (PNG, JPEG or WebP)"),
}


def check_media(head: bytes, media: Media, provider: str) -> None:
    """ApiError (``provider_bad_output``) unless ``head``, the file's first bytes, is the expected media."""
    test, what = _CHECKS[media]
    if not test(head):
        raise ApiError(
            502,
            "provider_bad_output",
            f"{provider} output is not {what}",
            provider=provider,
            provider_status="succeeded",
        )


def too_large(provider: str, limit: int) -> ApiError:
    return ApiError(
        502,
        "provider_output_too_large",
        f"{provider} output is larger than {limit} bytes; not kept",
        provider=provider,
        provider_status="succeeded",
    )


async def checked_chunks(
    chunks: AsyncIterable[bytes], *, limit: int, media: Media, provider: str
) -> AsyncIterator[bytes]:
    """``chunks`` passed on while they stay within ``limit`` bytes (ApiError as soon as they pass it); at their end,
    ApiError unless the first bytes show the expected ``media``, so a caller that writes them (``write_stream``) keeps
    nothing. The media is judged on the whole transfer: a transfer cut short is reported as the transport error it
    is (and retried), whatever its first bytes were."""
    size = 0
    head = b""
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(provider, limit)
        if len(head) < HEAD_BYTES:
            head += chunk[: HEAD_BYTES - len(head)]
        yield chunk
    check_media(head, media, provider)
