"""How a turn ended, and what that means on the wire and in the store."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import anyio
import structlog

from kdcube.bus import BusError, Relay, TurnJob
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
) -> bool | None:
    """Persist the outcome, then publish the terminal event and final status.

    The store records an outcome once, so whoever records it (a processor, or
    an ingress dropping a queued turn) is the one that publishes the terminal
    event: there is never a second one. ``final_status`` adds the closing
    ``conv_status``, for turns that had started.

    Returns True when this call ended the turn, False when it had ended
    already, and None when the database stayed out of reach: then nothing
    was published, and the turn must be left to be claimed again later.
    """
    try:
        ended = await _record(store, job, ending)
    except StoreUnavailable:
        log.error("store.finish_unreachable", turn_id=job.turn_id)
        return None
    except StoreError as exc:
        # Not an outage but a failure the database will repeat: the client
        # still deserves its terminal event.
        log.error("store.finish_failed", turn_id=job.turn_id, error=str(exc))
        ended = True
    if not ended:
        return False

    try:
        if ending.final_answer is not None:
            await emitter.complete(ending.final_answer)
        else:
            await emitter.error(
                ending.error_type or "error", ending.message or "", ending.reason
            )
        if final_status:
            await emitter.status(ending.conv_state, completion=ending.completion)
    except BusError as exc:
        log.error("relay.publish_failed", turn_id=job.turn_id, error=str(exc))
    return True


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
