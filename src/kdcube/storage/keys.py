"""Object keys: relative, slash-separated, never able to escape the root."""

from __future__ import annotations

import unicodedata

_MAX_KEY_BYTES = 1024


class InvalidKey(ValueError):
    """A key that could escape the storage root or that backends reject."""


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is safe, else raise InvalidKey naming the problem.

    A prefix may be empty or end with a slash; a key may not.
    """
    if prefix and key == "":
        return key
    if not key or len(key.encode()) > _MAX_KEY_BYTES:
        raise InvalidKey(f"key must be 1 to {_MAX_KEY_BYTES} bytes, got {key!r}")
    if key.startswith("/") or "\\" in key:
        raise InvalidKey(f"key must be relative and use '/', got {key!r}")
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        raise InvalidKey(f"key must not contain control characters, got {key!r}")

    parts = key.split("/")
    body = parts[:-1] if prefix else parts
    if any(part in ("", ".", "..") for part in body):
        raise InvalidKey(f"key must not contain empty, '.' or '..' parts, got {key!r}")
    if prefix and parts[-1] in (".", ".."):
        raise InvalidKey(f"prefix must not end in '.' or '..', got {key!r}")
    return key
