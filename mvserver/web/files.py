"""Serving saved files: aiohttp's FileResponse, whose 416 carries the JSON error shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from mvserver.core.errors import ErrorInfo


class SavedFileResponse(web.FileResponse):
    """aiohttp's FileResponse (sendfile, single ranges, ETag/304, RFC 9110 precondition order), except that its
    416 carries the JSON error body every other error has instead of an empty body of the file's type (``noun``
    names the file in the message: video, song, image).

    FileResponse decides on 416 (a range past the end, or a multi-range or malformed ``Range``) after the
    conditional headers, sets ``Content-Range: bytes */<size>`` and the status, and only then sends the headers;
    hooking ``set_status`` is what lets the body follow that exact decision rather than a second parse of it.
    """

    _error_body: bytes | None = None

    def __init__(self, path: Path, *, noun: str, **kwargs: Any):
        super().__init__(path, **kwargs)
        self._noun = noun

    def set_status(self, status: int, reason: str | None = None) -> None:
        super().set_status(status, reason)
        if status == web.HTTPRequestRangeNotSatisfiable.status_code and not self.prepared:
            size = self.headers.get("Content-Range", "").rpartition("/")[2]
            error = ErrorInfo(
                "range_not_satisfiable",
                f"the Range header must be one byte range inside the {size}-byte {self._noun}",
                field="Range",
            )
            self._error_body = json.dumps({"error": error.to_dict()}).encode()
            self.content_type = "application/json"
            self.content_length = len(self._error_body)

    async def prepare(self, request: web.BaseRequest) -> Any:
        writer = await super().prepare(request)
        if self._error_body is not None and request.method != "HEAD":
            await self.write(self._error_body)
        return writer
