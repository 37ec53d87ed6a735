"""What a bundle sees: the turn context and the emitter it streams through.

A bundle is a Python package whose entry module defines::

    async def run(ctx: kdcube.sdk.TurnContext) -> str:
        await ctx.delta("Hello")
        return "Hello"

The processor calls ``run`` once per turn inside the turn's cancel scope. The
returned string is the final answer (``chat_complete``); an exception becomes
``chat_error`` of type ``bundle_error`` with a safe message. A module that
sets ``RERUN_SAFE = True`` is run once more when the processor running one of
its turns dies mid-turn (otherwise that turn ends as ``turn_interrupted``).
A cancelled turn
(user cancel, watchdog, shutdown) reaches the bundle as ordinary cancellation,
so ``finally`` blocks and ``async with`` exits run as usual.

Files the user sent with the prompt are listed in ``ctx.attachments`` (already
type-checked and virus-scanned) and read with ``ctx.open_attachment(name)``,
chunk by chunk, or ``await ctx.read_attachment(name)`` for small ones. Files
the bundle produces go to ``await ctx.artifact(name, data, mime=...)``. The
conversation so far is ``ctx.history``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kdcube.exec import Executor

__all__ = ["Attachment", "BundleRun", "Emitter", "PastTurn", "TurnContext"]


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file of the turn's message, as its record lists it."""

    name: str
    mime: str
    size: int


AttachmentOpener = Callable[[str], AsyncIterator[bytes]]
ArtifactSaver = Callable[[str, bytes, str], Awaitable[Attachment]]


@dataclass(frozen=True, slots=True)
class PastTurn:
    """An earlier turn of the conversation, for context."""

    turn_id: str
    prompt: str
    answer: str | None
    """The final answer; None for a turn that failed or was cancelled."""
    state: str


async def _no_storage(name: str, data: bytes, mime: str) -> Attachment:
    raise RuntimeError("this turn cannot store artifacts (no storage configured)")


async def _no_files(name: str) -> AsyncIterator[bytes]:
    raise LookupError(f"this turn has no attachment {name!r}")
    yield b""  # pragma: no cover - makes this an async generator


class Emitter(Protocol):
    async def delta(self, text: str, *, marker: str = "answer") -> None: ...

    async def step(
        self,
        step: str,
        *,
        status: str = "running",
        title: str | None = None,
        data: Mapping[str, Any] | None = None,
        agent: str | None = None,
    ) -> None: ...

    async def followups(self, suggestions: Sequence[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class TurnContext:
    tenant: str
    project: str
    user_id: str
    user_type: str
    session_id: str
    conversation_id: str
    turn_id: str
    bundle_id: str
    prompt: str
    config: Mapping[str, Any]
    emit: Emitter
    attachments: Sequence[Attachment] = ()
    opener: AttachmentOpener = _no_files
    exec: Executor | None = None
    """Runs code for the bundle (``kdcube.exec``); None where that is off."""
    history: Sequence[PastTurn] = ()
    """The conversation's earlier turns, oldest first (at most 20)."""
    saver: ArtifactSaver = _no_storage

    async def artifact(
        self, name: str, data: bytes | str, *, mime: str = "text/plain"
    ) -> Attachment:
        """Store a file the turn produced: it is listed on the turn (name made
        safe, a same-named one replaced) and its owner can download it."""
        body = data.encode() if isinstance(data, str) else data
        return await self.saver(name, body, mime)

    def open_attachment(self, name: str) -> AsyncIterator[bytes]:
        """Stream an attachment's bytes; LookupError when the turn has none by
        that name."""
        if not any(attachment.name == name for attachment in self.attachments):
            raise LookupError(f"this turn has no attachment {name!r}")
        return self.opener(name)

    async def read_attachment(self, name: str) -> bytes:
        """An attachment's bytes at once (at most 25 MB by the upload caps)."""
        return b"".join([chunk async for chunk in self.open_attachment(name)])

    async def delta(self, text: str, *, marker: str = "answer") -> None:
        """Stream a piece of text; ``marker`` names the channel (answer, thinking)."""
        await self.emit.delta(text, marker=marker)

    async def step(
        self,
        step: str,
        *,
        status: str = "running",
        title: str | None = None,
        data: Mapping[str, Any] | None = None,
        agent: str | None = None,
    ) -> None:
        """Report progress of a named step (a tool call, a search, a plan)."""
        await self.emit.step(step, status=status, title=title, data=data, agent=agent)

    async def followups(self, suggestions: Sequence[str]) -> None:
        """Offer prompts the user may want to send next."""
        await self.emit.followups(suggestions)


BundleRun = Callable[[TurnContext], Awaitable[str | None]]
