"""How a turn ended, and what that means on the wire and in the store."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import anyio
import structlog

from kdcube.bus import BusError, Relay, State, TurnJob
from kdcube.metrics.tallies import count_turn
from kdcube.proc.emitter import TurnEmitter
from kdcube.store import Store, StoreError, StoreUnavailable, TurnOutcome, TurnState
from kdcube.wire.events import ErrorType, TurnAddress

log = structlog.get_logger("kdcube.turns")

RECORD_PATIENCE_S = 10.0
"""How long ending a turn waits for an unreachable database."""


class StopReason(StrEnum):
    """Why a turn's cancel scope was cancelled from outside the bundle."""

    CANCELLED = "cancelled"
    IDLE = "idle"
    WALL = "wall"
    LEASE_LOST = "lease_lost"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class Ending:
    state: TurnState
    final_answer: str | None = None
    error_type: str | None = None
    message: str | None = None
    reason: str | None = None

    @classmethod
    def from_outcome(cls, outcome: TurnOutcome) -> Ending:
        return cls(
            outcome.state,
            final_answer=outcome.final_answer,
            error_type=outcome.error_type,
            message=outcome.error,
        )

    @classmethod
    def completed(cls, answer: str) -> Ending:
        return cls(TurnState.COMPLETED, final_answer=answer)

    @classmethod
    def failed(cls, error_type: str, message: str, reason: str | None = None) -> Ending:
        return cls(
            TurnState.FAILED, error_type=error_type, message=message, reason=reason
        )

    @classmethod
    def cancelled(cls) -> Ending:
        return cls(
            TurnState.CANCELLED,
            error_type=ErrorType.CANCELLED,
            message="The turn was cancelled.",
        )

    @classmethod
    def interrupted(cls, reason: str) -> Ending:
        return cls(
            TurnState.INTERRUPTED,
            error_type=ErrorType.TURN_INTERRUPTED,
            message="The turn was interrupted before it finished.",
            reason=reason,
        )

    @classmethod
    def stopped(cls, reason: StopReason) -> Ending:
        if reason is StopReason.CANCELLED:
            return cls.cancelled()
        if reason is StopReason.IDLE:
            return cls.failed(
                ErrorType.TIMEOUT, "The bundle went quiet for too long.", "idle"
            )
        if reason is StopReason.WALL:
            return cls.failed(ErrorType.TIMEOUT, "The turn ran out of time.", "wall")
        return cls.interrupted(
            "server_shutdown" if reason is StopReason.SHUTDOWN else reason
        )

    @property
    def conv_state(self) -> str:
        calm = self.state in (TurnState.COMPLETED, TurnState.CANCELLED)
        return "idle" if calm else "error"

    @property
    def completion(self) -> str:
        if self.error_type == ErrorType.TIMEOUT:
            return "timeout"
        return {
            TurnState.COMPLETED: "completed",
            TurnState.CANCELLED: "cancelled",
            TurnState.INTERRUPTED: "interrupted",
        }.get(self.state, "error")

    def outcome(self) -> TurnOutcome:
        return TurnOutcome(self.state, self.final_answer, self.error_type, self.message)


async def end_turn(
    store: Store,
    emitter: TurnEmitter,
    job: TurnJob,
    ending: Ending,
    *,
    final_status: bool,
    counts: State | None = None,
) -> bool | None:
    """Record the outcome, then announce it: the terminal event, and the
    closing ``conv_status`` when ``final_status`` (for turns that had started).
    With ``counts``, an outcome recorded by this call is also counted there
    for the metrics (once per turn, as the store records once).

    The store records an outcome once, so an outcome recorded earlier (by an
    ingress dropping a queued turn, or by a processor that then died) wins
    over ``ending``. Either way the recorded outcome is announced, under
    once-keys: a processor that died between recording and announcing is
    covered by whoever takes the turn over, and no client sees two terminal
    events.

    Returns True when this call recorded the outcome, False when it had been
    recorded before, and None when the database stayed out of reach: then
    nothing was announced, and the turn must be left to be claimed again.
    """
    try:
        recorded_now = await _record(store, job, ending)
    except StoreUnavailable:
        log.error("store.finish_unreachable", turn_id=job.turn_id)
        return None
    except StoreError as exc:
        # Not an outage but a failure the database will repeat: the client
        # still deserves its terminal event.
        log.error("store.finish_failed", turn_id=job.turn_id, error=str(exc))
        recorded_now = True

    if recorded_now and counts is not None:
        # Before the announcement: whoever sees the terminal event may read
        # the count (and the processor acks right after announcing).
        await count_turn(counts, ending.state.value)
    announced = ending if recorded_now else await _recorded(store, job)
    if announced is not None:
        await _announce(emitter, job, announced, final_status=final_status)
    return recorded_now


async def _recorded(store: Store, job: TurnJob) -> Ending | None:
    try:
        outcome = await store.turn_outcome(job.turn_id)
    except StoreError as exc:
        log.error("store.outcome_unreadable", turn_id=job.turn_id, error=str(exc))
        return None
    return None if outcome is None else Ending.from_outcome(outcome)


async def _announce(
    emitter: TurnEmitter, job: TurnJob, ending: Ending, *, final_status: bool
) -> None:
    terminal_once, status_once = f"{job.turn_id}:terminal", f"{job.turn_id}:status"
    try:
        if ending.final_answer is not None:
            await emitter.complete(ending.final_answer, once=terminal_once)
        else:
            await emitter.error(
                ending.error_type or "error",
                ending.message or "",
                ending.reason,
                once=terminal_once,
            )
        if final_status:
            await emitter.status(
                ending.conv_state, completion=ending.completion, once=status_once
            )
    except (BusError, TimeoutError) as exc:
        log.error("relay.publish_failed", turn_id=job.turn_id, error=str(exc))


async def _record(store: Store, job: TurnJob, ending: Ending) -> bool:
    """Record the outcome, retrying while the database is briefly away."""
    delay = 0.05
    with anyio.move_on_after(RECORD_PATIENCE_S):
        while True:
            try:
                return await store.finish_turn(job.turn_id, ending.outcome())
            except StoreUnavailable:
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
    raise StoreUnavailable(f"could not record the outcome of turn {job.turn_id}")


def address_of(job: TurnJob) -> TurnAddress:
    return TurnAddress(
        tenant=job.tenant,
        project=job.project,
        user_id=job.user_id,
        user_type=job.user_type,
        session_id=job.session_id,
        conversation_id=job.conversation_id,
        turn_id=job.turn_id,
        request_id=job.request_id,
    )


def emitter_for(relay: Relay, job: TurnJob) -> TurnEmitter:
    return TurnEmitter(relay, address_of(job), job.stream_id)
