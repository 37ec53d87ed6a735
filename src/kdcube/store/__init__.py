"""The store port: conversations and turns, and the adapters behind it."""

from kdcube.store.ports import (
    ConversationDetail,
    ConversationNotFound,
    ConversationSummary,
    DeleteOutcome,
    NewTurn,
    Store,
    StoreError,
    StoreUnavailable,
    SubmitResult,
    TurnNotFound,
    TurnOutcome,
    TurnRecord,
    TurnState,
)

__all__ = [
    "ConversationDetail",
    "ConversationNotFound",
    "ConversationSummary",
    "DeleteOutcome",
    "NewTurn",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "SubmitResult",
    "TurnNotFound",
    "TurnOutcome",
    "TurnRecord",
    "TurnState",
]
