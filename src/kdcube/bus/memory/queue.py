"""In-memory turn queue with leases, fencing and per-conversation order."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from kdcube.bus.ports import (
    CancelOutcome,
    CancelResult,
    Claim,
    LeaseLost,
    QueueStats,
    TurnJob,
)


@dataclass(slots=True)
class _Waiting:
    job: TurnJob
    deliveries: int = 0
    started: bool = False
    since: float = field(default_factory=anyio.current_time)


@dataclass(slots=True)
class _Lease:
    claim: Claim
    expires_at: float
    started: bool = False
    cancel_requested: bool = False


@dataclass(slots=True)
class _Conversation:
    waiting: deque[_Waiting] = field(default_factory=deque)
    claimed_turn: str | None = None


class MemoryQueue:
    def __init__(self) -> None:
        self._conversations: dict[str, _Conversation] = {}
        # Conversations with a waiting turn and none claimed, oldest first. A
        # cancel that empties one takes it out, or a turn enqueued later would
        # inherit its place.
        self._ready: deque[str] = deque()
        self._leases: dict[str, _Lease] = {}
        self._last_token = 0
        self._changed = anyio.Event()
        self._cancel_watchers: set[MemoryObjectSendStream[str]] = set()

    async def enqueue(self, job: TurnJob, *, first: bool = False) -> None:
        await anyio.lowlevel.checkpoint()
        conversation = self._conversations.setdefault(
            job.conversation_id, _Conversation()
        )
        if first:
            conversation.waiting.appendleft(_Waiting(job))
        else:
            conversation.waiting.append(_Waiting(job))

        self._mark_ready(job.conversation_id, conversation)
        self._notify()

    async def claim(self, consumer: str, *, lease_s: float) -> Claim:
        # Checkpoint before taking, never after: a cancel that lands between
        # taking a turn and returning it would strand the turn under a lease.
        await anyio.lowlevel.checkpoint()
        while True:
            now = anyio.current_time()
            self._expire_leases(now)
            claim = self._take(consumer, now + lease_s)
            if claim is not None:
                return claim

            changed = self._changed
            with anyio.move_on_after(self._until_next_expiry(now)):
                await changed.wait()

    async def renew(self, claim: Claim, *, lease_s: float) -> None:
        await anyio.lowlevel.checkpoint()
        lease = self._current_lease(claim)
        lease.expires_at = anyio.current_time() + lease_s

    async def mark_started(self, claim: Claim) -> None:
        await anyio.lowlevel.checkpoint()
        self._current_lease(claim).started = True

    async def ack(self, claim: Claim) -> None:
        await anyio.lowlevel.checkpoint()
        self._current_lease(claim)
        del self._leases[claim.job.turn_id]
        self._release_conversation(claim.job.conversation_id, front=False)
        self._notify()

    async def cancel(self, turn_id: str) -> CancelResult:
        await anyio.lowlevel.checkpoint()
        lease = self._leases.get(turn_id)
        if lease is not None:
            lease.cancel_requested = True
            for watcher in self._cancel_watchers:
                watcher.send_nowait(turn_id)
            return CancelResult(CancelOutcome.SIGNALLED)

        for conversation_id, conversation in self._conversations.items():
            for waiting in conversation.waiting:
                if waiting.job.turn_id == turn_id:
                    conversation.waiting.remove(waiting)
                    if conversation.claimed_turn is None and not conversation.waiting:
                        self._ready.remove(conversation_id)
                    self._forget_if_idle(conversation_id, conversation)
                    return CancelResult(CancelOutcome.DROPPED, waiting.job)

        return CancelResult(CancelOutcome.NOT_FOUND)

    async def cancel_requested(self, claim: Claim) -> bool:
        await anyio.lowlevel.checkpoint()
        return self._current_lease(claim).cancel_requested

    @asynccontextmanager
    async def watch_cancels(self) -> AsyncIterator[AsyncIterator[str]]:
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        self._cancel_watchers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._cancel_watchers.discard(send)
            send.close()

    async def take_waiting(self) -> list[TurnJob]:
        await anyio.lowlevel.checkpoint()
        jobs = [
            waiting.job
            for conversation in self._conversations.values()
            for waiting in conversation.waiting
        ]
        for conversation_id, conversation in list(self._conversations.items()):
            conversation.waiting.clear()
            self._forget_if_idle(conversation_id, conversation)
        self._ready.clear()
        return jobs

    async def stats(self) -> QueueStats:
        await anyio.lowlevel.checkpoint()
        waiting = [w for c in self._conversations.values() for w in c.waiting]
        oldest = min((w.since for w in waiting), default=None)
        age = 0.0 if oldest is None else anyio.current_time() - oldest
        return QueueStats(
            ready=len(waiting), inflight=len(self._leases), oldest_wait_s=age
        )

    def _take(self, consumer: str, expires_at: float) -> Claim | None:
        while self._ready:
            conversation_id = self._ready.popleft()
            conversation = self._conversations.get(conversation_id)
            if conversation is None or conversation.claimed_turn is not None:
                continue
            if not conversation.waiting:
                continue

            waiting = conversation.waiting.popleft()
            waiting.deliveries += 1
            self._last_token += 1
            claim = Claim(
                job=waiting.job,
                consumer=consumer,
                token=self._last_token,
                deliveries=waiting.deliveries,
                started=waiting.started,
            )
            conversation.claimed_turn = waiting.job.turn_id
            self._leases[waiting.job.turn_id] = _Lease(
                claim, expires_at, started=waiting.started
            )
            return claim

        return None

    def _expire_leases(self, now: float) -> None:
        expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in expired:
            job = lease.claim.job
            del self._leases[job.turn_id]
            conversation = self._conversations[job.conversation_id]
            conversation.waiting.appendleft(
                _Waiting(job, lease.claim.deliveries, lease.started)
            )
            self._release_conversation(job.conversation_id, front=True)

    def _current_lease(self, claim: Claim) -> _Lease:
        self._expire_leases(anyio.current_time())
        lease = self._leases.get(claim.job.turn_id)
        if lease is None or lease.claim.token != claim.token:
            raise LeaseLost(f"turn {claim.job.turn_id} is no longer held by this claim")
        return lease

    def _release_conversation(self, conversation_id: str, *, front: bool) -> None:
        conversation = self._conversations[conversation_id]
        conversation.claimed_turn = None
        if not conversation.waiting:
            del self._conversations[conversation_id]
            return

        if front:
            self._ready.appendleft(conversation_id)
        else:
            self._ready.append(conversation_id)

    def _forget_if_idle(
        self, conversation_id: str, conversation: _Conversation
    ) -> None:
        if conversation.claimed_turn is None and not conversation.waiting:
            del self._conversations[conversation_id]

    def _mark_ready(self, conversation_id: str, conversation: _Conversation) -> None:
        # A conversation enters the ready line when its first turn arrives and
        # re-enters when its claimed turn is released, never twice at once.
        if conversation.claimed_turn is None and len(conversation.waiting) == 1:
            self._ready.append(conversation_id)

    def _until_next_expiry(self, now: float) -> float:
        if not self._leases:
            return math.inf
        return max(0.0, min(lease.expires_at for lease in self._leases.values()) - now)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
