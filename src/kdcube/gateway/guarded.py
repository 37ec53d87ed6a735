"""The store seen through the ``postgres`` circuit breaker.

While the breaker is open, every call fails at once with ``CircuitOpen``
instead of waiting on a database known to be down; ``StoreUnavailable``
errors are what open it. The other store errors (a conversation not found)
say nothing about the database's health and pass through uncounted.
"""

from __future__ import annotations

from typing import Any

from kdcube.gateway.breakers import CircuitBreaker
from kdcube.store import (
    ConversationDetail,
    ConversationSummary,
    DeleteOutcome,
    NewTurn,
    Store,
    StoreUnavailable,
    SubmitResult,
)
from kdcube.store.ports import TurnOutcome, TurnRecord

_FAILURES = (StoreUnavailable,)


class GuardedStore:
    def __init__(self, store: Store, breaker: CircuitBreaker) -> None:
        self._store = store
        self._breaker = breaker

    async def submit_turn(self, new: NewTurn) -> SubmitResult:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.submit_turn(new)

    async def start_turn(self, turn_id: str) -> bool:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.start_turn(turn_id)

    async def finish_turn(self, turn_id: str, outcome: TurnOutcome) -> bool:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.finish_turn(turn_id, outcome)

    async def turn_outcome(self, turn_id: str) -> TurnOutcome | None:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.turn_outcome(turn_id)

    async def add_artifact(self, turn_id: str, record: dict[str, Any]) -> None:
        async with self._breaker.guard(failures=_FAILURES):
            await self._store.add_artifact(turn_id, record)

    async def history(
        self,
        user_id: str,
        conversation_id: str,
        *,
        before_turn_id: str,
        limit: int = 20,
    ) -> list[TurnRecord]:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.history(
                user_id, conversation_id, before_turn_id=before_turn_id, limit=limit
            )

    async def unfinished_turns(self, user_id: str, conversation_id: str) -> list[str]:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.unfinished_turns(user_id, conversation_id)

    async def conversation(
        self, user_id: str, conversation_id: str
    ) -> ConversationDetail:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.conversation(user_id, conversation_id)

    async def conversations(self, user_id: str) -> list[ConversationSummary]:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.conversations(user_id)

    async def delete_conversation(
        self, user_id: str, conversation_id: str
    ) -> DeleteOutcome:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.delete_conversation(user_id, conversation_id)

    async def interrupt_unfinished(self) -> int:
        async with self._breaker.guard(failures=_FAILURES):
            return await self._store.interrupt_unfinished()

    async def ping(self) -> None:
        # Readiness probes must see the database itself, not the breaker.
        await self._store.ping()

    async def aclose(self) -> None:
        await self._store.aclose()
