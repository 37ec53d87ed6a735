"""Contracts of the bus: what every adapter (in-memory, Redis) must do.

The contract tests in ``tests/contract`` hold each adapter to these docstrings.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

_EVENT_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


class BusError(Exception):
    """Base of every error the bus raises."""


class BusUnavailable(BusError):
    """The backing service cannot be reached; retry later."""


class LeaseLost(BusError):
    """The claim's lease expired and the turn may belong to someone else now."""


def parse_event_id(value: str) -> tuple[int, int]:
    """Split ``<ms>-<seq>`` into a sortable pair, or raise ValueError."""
    match = _EVENT_ID.fullmatch(value)
    if match is None:
        raise ValueError(f"event id must look like <digits>-<digits>, got {value!r}")
    return int(match.group(1)), int(match.group(2))


def format_event_id(ms: int, seq: int) -> str:
    """Fixed width, so ids of one session sort as strings too."""
    return f"{ms:013d}-{seq:06d}"


@dataclass(frozen=True, slots=True)
class TurnJob:
    """A turn as it waits in the queue: everything a processor needs to run it."""

    turn_id: str
    conversation_id: str
    session_id: str
    stream_id: str | None
    request_id: str
    tenant: str
    project: str
    user_id: str
    user_type: str
    bundle_id: str
    prompt: str
    message_kind: str
    enqueued_at_ms: int
    announced: bool = False
    """Whether the ingress already published the turn's ``in_progress`` status."""
    attachments: list[dict[str, Any]] = field(default_factory=list)
    """The message's files as listed on the turn (name, mime, size, scan)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnJob:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Claim:
    """A turn held by one consumer under a lease.

    ``token`` is a fencing token: it grows with every claim of any turn, and an
    operation that carries a stale token fails with LeaseLost.
    ``deliveries`` counts claims of this turn (1 on the first); ``started``
    says whether an earlier holder had begun running it.
    """

    job: TurnJob
    consumer: str
    token: int
    deliveries: int
    started: bool


class CancelOutcome(StrEnum):
    DROPPED = "dropped"
    SIGNALLED = "signalled"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What a cancel did; ``job`` is the dropped turn when it was waiting."""

    outcome: CancelOutcome
    job: TurnJob | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int
    inflight: int
    oldest_wait_s: float = 0.0
    """How long the longest-waiting turn has been claimable (0 when none
    waits). A turn put back after its lease lapsed counts from then."""


class Queue(Protocol):
    """Turns waiting to run, handed out one conversation at a time."""

    async def enqueue(self, job: TurnJob, *, first: bool = False) -> None:
        """Make the turn claimable; ``first`` puts it ahead of its conversation's
        waiting turns."""

    async def claim(self, consumer: str, *, lease_s: float) -> Claim:
        """Wait for and take a turn whose conversation has none claimed.

        Turns of one conversation come out in enqueue order and never two at
        once. Conversations take turns: one whose turn was just acked waits
        behind those already waiting, so a long follow-up chain cannot starve
        other users. Cancelling the wait takes nothing.
        """

    async def renew(self, claim: Claim, *, lease_s: float) -> None:
        """Extend the lease, or raise LeaseLost."""

    async def mark_started(self, claim: Claim) -> None:
        """Record that the turn began running, or raise LeaseLost."""

    async def ack(self, claim: Claim) -> None:
        """Finish the turn and free its conversation, or raise LeaseLost."""

    async def cancel(self, turn_id: str) -> CancelResult:
        """Drop a waiting turn, or flag a claimed one and signal its holder."""

    async def cancel_requested(self, claim: Claim) -> bool:
        """Whether a cancel arrived for this claimed turn."""

    def watch_cancels(self) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """Turn ids whose cancel was requested while claimed, from now on."""

    async def take_waiting(self) -> list[TurnJob]:
        """Remove and return every turn not claimed (embedded shutdown only)."""

    async def stats(self) -> QueueStats: ...


@dataclass(frozen=True, slots=True)
class RelayEvent:
    id: str
    route: str
    data_json: str
    stream_id: str | None


@dataclass(frozen=True, slots=True)
class RelayRead:
    """Events after a cursor; ``cursor`` is where the next read starts.

    ``gap`` is true when events after the requested cursor may have been
    dropped by retention before this read.
    """

    events: list[RelayEvent]
    cursor: str
    gap: bool


class Relay(Protocol):
    """Each session's events, kept for replay and tailed live."""

    async def publish(
        self,
        session_id: str,
        route: str,
        data_json: str,
        *,
        stream_id: str | None,
        once: str | None = None,
    ) -> str | None:
        """Append an event and return its id; ids grow strictly per session.

        With ``once``, an event already published under the same key (within
        the retention period) is not published again, and None is returned:
        a turn's terminal event can then be announced again safely by whoever
        takes the turn over, without the client ever seeing it twice.
        """

    async def position(self, session_id: str) -> str:
        """A cursor that every future event of the session sorts after."""

    async def read(
        self, session_id: str, after: str, *, stream_id: str, timeout_s: float
    ) -> RelayRead:
        """Events after ``after`` that ``stream_id`` may see: those targeted at
        it or at no stream. Waits up to ``timeout_s`` when there are none."""


class State(Protocol):
    """Small shared records: sessions, counters, heartbeats, locks."""

    async def session_for(self, user_key: str, *, ttl_s: float) -> str:
        """The session id of a user, created on first use, renewed on each."""

    async def incr(self, key: str, *, window_s: float) -> int:
        """Count an occurrence in the current fixed window of ``window_s``."""

    async def beat(
        self, role: str, instance: str, info: dict[str, Any], *, ttl_s: float
    ) -> None:
        """Announce that an instance lives, with what it reports about itself."""

    async def alive(self, role: str) -> dict[str, dict[str, Any]]:
        """Instances of a role whose last beat has not expired."""

    async def add(self, tally: str, amounts: Mapping[str, float]) -> None:
        """Add each amount to its field of a named tally, all at once.

        A tally is a set of running totals that only the caller's amounts
        change and that never expires: counters that outlive every process
        (turn outcomes, refusals), read back with ``totals``.
        """

    async def totals(self, tally: str) -> dict[str, float]:
        """Every field of a tally with its total; empty when never added to."""

    async def lock(self, name: str, *, ttl_s: float) -> int | None:
        """Take a lock; returns a fencing token, or None when someone holds it."""

    async def unlock(self, name: str, token: int) -> bool:
        """Release a lock held with ``token``; False if it had expired or moved."""


class Bus(Protocol):
    @property
    def queue(self) -> Queue: ...

    @property
    def relay(self) -> Relay: ...

    @property
    def state(self) -> State: ...

    @property
    def durable(self) -> bool:
        """Whether waiting turns outlive this process."""
