"""The bus port: queue, relay and shared state, and the adapters behind it."""

from kdcube.bus.ports import (
    Bus,
    BusError,
    BusUnavailable,
    CancelOutcome,
    CancelResult,
    Claim,
    LeaseLost,
    Queue,
    QueueStats,
    Relay,
    RelayEvent,
    RelayRead,
    State,
    TurnJob,
    parse_event_id,
)

__all__ = [
    "Bus",
    "BusError",
    "BusUnavailable",
    "CancelOutcome",
    "CancelResult",
    "Claim",
    "LeaseLost",
    "Queue",
    "QueueStats",
    "Relay",
    "RelayEvent",
    "RelayRead",
    "State",
    "TurnJob",
    "parse_event_id",
]
