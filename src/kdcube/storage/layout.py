"""Where the platform keeps what it writes, the same on every storage backend.

Keys follow upstream KDCube's layout, so that tools written for its buckets
find things here too:
``cb/tenants/{tenant}/projects/{project}/{area}/{owner}/{conversation}/{turn}/...``
with ``area`` one of ``conversation``, ``attachments`` and ``executions``, and
``owner`` the user id (an anonymous caller's id carries its fingerprint).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

Area = Literal["conversation", "attachments", "executions"]

_UNSAFE = re.compile(r"[^\w.\- ()+@,=]+")
_MAX_NAME_CHARS = 120


@dataclass(frozen=True, slots=True)
class Layout:
    tenant: str
    project: str

    def turn_prefix(
        self, area: Area, owner: str, conversation_id: str, turn_id: str
    ) -> str:
        """The folder (ending in ``/``) of one turn's objects in an area."""
        root = f"cb/tenants/{self.tenant}/projects/{self.project}"
        return f"{root}/{area}/{_segment(owner)}/{conversation_id}/{turn_id}/"

    def artifacts_prefix(self, owner: str, conversation_id: str, turn_id: str) -> str:
        """The folder of the files a turn's bundle produced."""
        turn = self.turn_prefix("conversation", owner, conversation_id, turn_id)
        return turn + "artifacts/"

    def conversation_prefix(self, area: Area, owner: str, conversation_id: str) -> str:
        root = f"cb/tenants/{self.tenant}/projects/{self.project}"
        return f"{root}/{area}/{_segment(owner)}/{conversation_id}/"


def _segment(owner: str) -> str:
    # User ids may hold characters that are awkward in paths (':' of anonymous
    # ids is fine; '/' would create folders), so they are made path-safe.
    return owner.replace("/", "_")


def safe_file_name(name: str | None, *, fallback: str = "file") -> str:
    """A client's file name reduced to one safe path segment.

    Folders are dropped, unusual characters replaced, and the result is never
    empty, '.' or '..'.
    """
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFC", base)
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C")
    base = _UNSAFE.sub("_", base).strip(" .")
    if not base:
        base = fallback
    if len(base) > _MAX_NAME_CHARS:
        stem, dot, suffix = base.rpartition(".")
        keep = _MAX_NAME_CHARS - len(suffix) - 1
        base = f"{stem[:keep]}.{suffix}" if dot and keep > 0 else base[:_MAX_NAME_CHARS]
    return base


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``stem (2).ext`` and so on when a turn already has it."""
    if name not in taken:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    counter = 2
    while True:
        candidate = f"{stem} ({counter}){dot}{suffix}"
        if candidate not in taken:
            return candidate
        counter += 1
