"""Identifiers minted by the platform and checks for identifiers clients send."""

from __future__ import annotations

import re
import uuid

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def new_id() -> str:
    return uuid.uuid4().hex


def is_client_id(value: str) -> bool:
    """Whether ``value`` is usable as a stream, conversation or turn id."""
    return _CLIENT_ID.fullmatch(value) is not None
