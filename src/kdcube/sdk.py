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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BundleRun", "Emitter", "TurnContext"]


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
