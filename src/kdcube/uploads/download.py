"""Answering a download of a stored attachment with its bytes."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from quart import Response

from kdcube.storage import ObjectNotFound, Storage
from kdcube.wire.errors import not_found


async def attachment_response(
    storage: Storage, key: str, record: dict[str, Any]
) -> Response:
    """Stream the object to the owner as a download, never rendered inline.

    ``Content-Disposition: attachment`` and ``nosniff`` keep a browser from
    running an uploaded HTML or SVG file as a page of this origin.
    """
    try:
        info = await storage.head(key)
    except ObjectNotFound:
        raise not_found("attachment") from None

    headers = {
        "Content-Type": str(record.get("mime") or "application/octet-stream"),
        "Content-Length": str(info.size),
        "Content-Disposition": _disposition(str(record["name"])),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, no-store",
    }
    response = Response(storage.get(key), headers=headers)
    response.timeout = None
    return response


def _disposition(name: str) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"
