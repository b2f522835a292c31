"""Saved songs: the accepted audio formats and the reader of a saved song's key and sidecar, for the audio routes
and the features that use songs (lip sync, assembly, projects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mvserver.appkeys import ARTEFACTS
from mvserver.core.artefacts import artefact_key, check_id
from mvserver.core.errors import ApiError
from mvserver.media.args import SONG_DEMUXERS
from mvserver.web.access.auth import owned_sidecar


@dataclass(frozen=True)
class AudioFormat:
    name: str
    mime_type: str
    suffix: str

    @property
    def demuxer(self) -> str:
        """The one ffmpeg demuxer every later read of a song in this format uses."""
        return SONG_DEMUXERS[self.suffix]


FORMATS = {
    fmt.name: fmt
    for fmt in (
        AudioFormat("mp3", "audio/mpeg", ".mp3"),
        AudioFormat("wav", "audio/wav", ".wav"),
        AudioFormat("m4a", "audio/mp4", ".m4a"),
        AudioFormat("aac", "audio/aac", ".aac"),
        AudioFormat("ogg", "audio/ogg", ".ogg"),
        AudioFormat("flac", "audio/flac", ".flac"),
    )
}
_BY_MIME = {fmt.mime_type: fmt for fmt in FORMATS.values()}


async def saved_audio(
    app: web.Application, audio_id: str, field: str = "audio_id", caller: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The artefact key and sidecar of a saved song (ApiError 400 for a malformed id, 404 if there is none or it
    belongs to another key than ``caller``)."""
    store = app[ARTEFACTS]
    check_id(audio_id, field)
    sidecar = await owned_sidecar(store, artefact_key("audio", audio_id, ".json"), caller)
    fmt = _BY_MIME.get(str(sidecar.get("mime_type"))) if sidecar is not None else None
    if sidecar is None or fmt is None or await store.stat(artefact_key("audio", audio_id, fmt.suffix)) is None:
        raise ApiError(404, "not_found", f"no audio with id {audio_id}", field=field)
    return artefact_key("audio", audio_id, fmt.suffix), sidecar
