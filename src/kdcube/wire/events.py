"""The envelope every turn event carries, and the routes it travels on.

Routes are SSE event names; the envelope ``type`` is the semantic type. Both
are kept from upstream KDCube so its clients keep working.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Route(StrEnum):
    READY = "ready"
    CONV_STATUS = "conv_status"
    CHAT_START = "chat_start"
    CHAT_STEP = "chat_step"
    CHAT_DELTA = "chat_delta"
    CHAT_COMPLETE = "chat_complete"
    CHAT_ERROR = "chat_error"
    CHAT_SERVICE = "chat_service"
    SERVER_SHUTDOWN = "server_shutdown"


class ErrorType(StrEnum):
    CANCELLED = "cancelled"
    TURN_INTERRUPTED = "turn_interrupted"
    TIMEOUT = "timeout"
    BUNDLE_ERROR = "bundle_error"
    SUPERSEDED = "superseded"


TERMINAL_ROUTES = frozenset({Route.CHAT_COMPLETE, Route.CHAT_ERROR})


@dataclass(frozen=True, slots=True)
class TurnAddress:
    """Who a turn belongs to; every envelope of the turn repeats it."""

    tenant: str
    project: str
    user_id: str
    user_type: str
    session_id: str
    conversation_id: str
    turn_id: str
    request_id: str


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def envelope(
    address: TurnAddress,
    type_: str,
    *,
    data: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
    delta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ms = now_ms()
    body: dict[str, Any] = {
        "type": type_,
        "ts": ms,
        "timestamp": iso(ms),
        "service": {
            "request_id": address.request_id,
            "tenant": address.tenant,
            "project": address.project,
            "user": address.user_id,
            "user_type": address.user_type,
        },
        "conversation": {
            "session_id": address.session_id,
            "conversation_id": address.conversation_id,
            "turn_id": address.turn_id,
        },
        "event": event or {},
        "data": data or {},
    }
    if delta is not None:
        body["delta"] = delta
    return body


def conv_status(
    address: TurnAddress,
    state: str,
    *,
    current_turn_id: str | None,
    completion: str | None = None,
    updated_at: str | None = None,
) -> dict[str, Any]:
    data = {
        "state": state,
        "current_turn_id": current_turn_id,
        "completion": completion,
        "updated_at": updated_at or iso(now_ms()),
    }
    return envelope(address, "conv.status", data=data)


def chat_error(
    address: TurnAddress, error_type: str, message: str, *, reason: str | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {"error": message, "error_type": error_type}
    if reason is not None:
        data["reason"] = reason
    return envelope(address, "chat.error", data=data, event={"status": "error"})
