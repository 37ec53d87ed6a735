"""Contract of the store: conversations and their turns, owned by one user.

Every read and write names the user, so no operation can reach another user's
conversation: to the caller it does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class StoreError(Exception):
    """Base of every error the store raises."""


class StoreUnavailable(StoreError):
    """The database cannot be reached; retry later."""


class ConversationNotFound(StoreError):
    """No conversation with that id belongs to the user."""


class TurnNotFound(StoreError):
    """No turn with that id exists (in that conversation, where one is named)."""


class TurnState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


UNFINISHED = frozenset({TurnState.QUEUED, TurnState.RUNNING})


class DeleteOutcome(StrEnum):
    DELETED = "deleted"
    NOT_FOUND = "not_found"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class NewTurn:
    user_id: str
    conversation_id: str
    create_conversation: bool
    bundle_id: str
    turn_id: str
    request_id: str
    message_kind: str
    prompt: str
    attachments: tuple[dict[str, Any], ...] = ()
    """Files of the message, already stored and scanned, as listed on the turn."""


@dataclass(frozen=True, slots=True)
class SubmitResult:
    conversation_created: bool
    busy: bool
    """Whether another turn of the conversation was queued or running."""


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    state: TurnState
    final_answer: str | None = None
    error_type: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TurnRecord:
    turn_id: str
    state: TurnState
    prompt: str
    final_answer: str | None
    error_type: str | None
    bundle_id: str
    message_kind: str
    attachments: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]
    """Files the bundle produced, in the order first added; unique by name."""
    created_at: int
    finished_at: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "turn_id": self.turn_id,
            "state": self.state.value,
            "prompt": self.prompt,
            "final_answer": self.final_answer,
            "error_type": self.error_type,
            "bundle_id": self.bundle_id,
            "message_kind": self.message_kind,
            "attachments": self.attachments,
            "artifacts": self.artifacts,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conversation_id: str
    title: str
    bundle_id: str
    state: str
    current_turn_id: str | None
    created_at: int
    updated_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "title": self.title,
            "bundle_id": self.bundle_id,
            "state": self.state,
            "current_turn_id": self.current_turn_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class ConversationDetail:
    summary: ConversationSummary
    turns: list[TurnRecord]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary.to_json(),
            "turns": [turn.to_json() for turn in self.turns],
        }


class Store(Protocol):
    async def submit_turn(self, new: NewTurn) -> SubmitResult:
        """Record a queued turn, creating its conversation when asked to.

        Raises ConversationNotFound when the conversation should exist and
        does not belong to the user. All or nothing.
        """

    async def start_turn(self, turn_id: str) -> bool:
        """Move a queued turn to running and its conversation to in_progress.

        False when the turn is no longer queued (cancelled or gone).
        """

    async def finish_turn(self, turn_id: str, outcome: TurnOutcome) -> bool:
        """Record a turn's outcome once; False if it had already finished."""

    async def turn_outcome(self, turn_id: str) -> TurnOutcome | None:
        """The recorded outcome of a finished turn; None while it is unfinished
        or when there is no such turn."""

    async def add_artifact(self, turn_id: str, record: dict[str, Any]) -> None:
        """List a file the turn produced on it, in whatever state the turn is.

        ``record`` is stored as given (JSON) and keyed by its ``name``: a record
        whose name is already listed replaces that entry in place, any other is
        appended. Atomic: concurrent adds to one turn all land.

        Raises ValueError when ``record["name"]`` is not a string, and
        TurnNotFound when there is no such turn.
        """

    async def unfinished_turns(self, user_id: str, conversation_id: str) -> list[str]:
        """Ids of the conversation's queued and running turns, oldest first.

        Raises ConversationNotFound.
        """

    async def conversation(
        self, user_id: str, conversation_id: str
    ) -> ConversationDetail:
        """Raises ConversationNotFound."""

    async def history(
        self,
        user_id: str,
        conversation_id: str,
        *,
        before_turn_id: str,
        limit: int = 20,
    ) -> list[TurnRecord]:
        """The ``limit`` turns that came just before ``before_turn_id``, oldest
        first; in every state, so the caller picks which ones count.

        Empty for the conversation's first turn. Read in one snapshot. Raises
        ValueError for a negative ``limit``, ConversationNotFound, and
        TurnNotFound when the turn is not in that conversation.
        """

    async def conversations(self, user_id: str) -> list[ConversationSummary]:
        """The user's conversations, newest first."""

    async def delete_conversation(
        self, user_id: str, conversation_id: str
    ) -> DeleteOutcome: ...

    async def interrupt_unfinished(self) -> int:
        """Mark every queued or running turn interrupted (start-up recovery)."""

    async def ping(self) -> None:
        """Return when the database answers; raise StoreUnavailable if not."""

    async def aclose(self) -> None: ...


def artifact_name(record: dict[str, Any]) -> str:
    """The key that makes an artifact record unique on its turn."""
    name = record.get("name")
    if not isinstance(name, str):
        raise ValueError(
            f"artifact record needs a string 'name', got {name!r}:"
            " name it as the file is listed, e.g. {'name': 'report.pdf', ...}"
        )
    return name


def check_history_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"history limit must be 0 or more, got {limit!r}")
