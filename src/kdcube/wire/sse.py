"""Server-sent events framing."""

from __future__ import annotations

import json
from typing import Any

KEEPALIVE = b": keepalive\n\n"

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


def frame(route: str, data_json: str, event_id: str | None = None) -> bytes:
    """One SSE frame; ``data_json`` is already one line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {route}\ndata: {data_json}\n\n".encode()


def frame_obj(route: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    return frame(route, dumps(data), event_id)


def dumps(data: object) -> str:
    """Compact JSON on one line: SSE data lines must not contain newlines."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
