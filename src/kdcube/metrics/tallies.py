"""What processes record on the bus for the metrics role to read.

Each record is one ``State.add`` on a named tally. Recording never fails the
work it describes: a bus error or a slow bus costs the count, not the turn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import anyio
import structlog

from kdcube.bus.ports import BusError, State

log = structlog.get_logger("kdcube.metrics")

TURNS = "metrics:turns"
"""Field: a turn's recorded outcome (completed, failed, cancelled, interrupted)."""
REJECTIONS = "metrics:rejections"
"""Field: why the gateway refused a request (its ``reason``)."""
QUEUE_WAIT = "metrics:queue-wait"
"""Fields: a bucket's upper bound (``"0.5"``, ``"+Inf"``) -> turns whose wait
fell in it and above the previous bound; ``sum`` -> seconds waited in all."""
TURN_DURATION = "metrics:turn-seconds"
"""The same fields for the time a processor spent on a turn, from its claim
to its recorded outcome."""

WAIT_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    math.inf,
)
"""Upper bounds (seconds) of the queue wait and turn duration histograms,
the last one open."""
WAIT_SUM = "sum"

_RECORD_S = 2.0


def bound_field(bound: float) -> str:
    """The tally field of a bucket bound: ``0.05``, ``1``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


def wait_bucket(seconds: float) -> float:
    """The bound of the bucket that a wait of ``seconds`` falls in."""
    return next(bound for bound in WAIT_BUCKETS if seconds <= bound)


async def count_turn(state: State, outcome: str) -> None:
    await _add(state, TURNS, {outcome: 1})


async def count_rejection(state: State, reason: str) -> None:
    await _add(state, REJECTIONS, {reason: 1})


async def observe_queue_wait(state: State, seconds: float) -> None:
    await _observe(state, QUEUE_WAIT, seconds)


async def observe_turn_duration(state: State, seconds: float) -> None:
    await _observe(state, TURN_DURATION, seconds)


async def _observe(state: State, tally: str, seconds: float) -> None:
    seconds = max(0.0, seconds)
    amounts = {bound_field(wait_bucket(seconds)): 1.0, WAIT_SUM: seconds}
    await _add(state, tally, amounts)


async def _add(state: State, tally: str, amounts: Mapping[str, float]) -> None:
    with anyio.move_on_after(_RECORD_S) as scope:
        try:
            await state.add(tally, amounts)
        except BusError as exc:
            log.warning("metrics.record_failed", tally=tally, error=str(exc))
    if scope.cancelled_caught:
        log.warning("metrics.record_timed_out", tally=tally, after_s=_RECORD_S)
