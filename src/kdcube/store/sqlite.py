"""SQLite store for the embedded mode.

One connection used from worker threads one call at a time: each store
operation is a single transaction inside a single thread hop, so a cancelled
caller never leaves a half-written change behind (anyio waits for the thread).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from kdcube.store.ports import (
    UNFINISHED,
    ConversationDetail,
    ConversationNotFound,
    ConversationSummary,
    DeleteOutcome,
    NewTurn,
    StoreError,
    SubmitResult,
    TurnNotFound,
    TurnOutcome,
    TurnRecord,
    TurnState,
    artifact_name,
    check_history_limit,
)
from kdcube.wire.events import now_ms

T = TypeVar("T")

_TITLE_CHARS = 80
_SUMMARY_COLUMNS = (
    "conversation_id, title, bundle_id, state, current_turn_id, created_at, updated_at"
)
_TURN_COLUMNS = (
    "turn_id, state, prompt, final_answer, error_type, bundle_id, message_kind,"
    " attachments, artifacts, created_at, finished_at"
)
# A turn's history in one statement. ``anchor`` has one row when the user owns
# the conversation, whose seq is NULL when the turn is not in it; the LEFT JOIN
# keeps that row when nothing came before, so an empty history, a missing turn
# and a missing conversation each read differently.
_HISTORY = f"""
WITH anchor AS (
    SELECT t.seq FROM conversations c
    LEFT JOIN turns t
        ON t.conversation_id = c.conversation_id AND t.turn_id = :turn_id
    WHERE c.conversation_id = :conversation_id AND c.user_id = :user_id
),
recent AS (
    SELECT seq, {_TURN_COLUMNS} FROM turns
    WHERE conversation_id = :conversation_id AND seq < (SELECT seq FROM anchor)
    ORDER BY seq DESC LIMIT :limit
)
SELECT anchor.seq, recent.* FROM anchor LEFT JOIN recent ON 1 ORDER BY recent.seq
"""


def migrate(connection: sqlite3.Connection) -> list[int]:
    """Apply the packaged migrations not yet applied; returns their numbers."""
    connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    applied = {
        row[0] for row in connection.execute("SELECT version FROM schema_migrations")
    }
    folder = resources.files("kdcube.store.migrations.sqlite")
    scripts = sorted(
        (p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name
    )
    done = []
    for script in scripts:
        version = int(script.name.split("_", 1)[0])
        if version in applied:
            continue

        connection.executescript(
            f"BEGIN;\n{script.read_text()}\n"
            f"INSERT INTO schema_migrations VALUES ({version}, {now_ms()});\nCOMMIT;"
        )
        done.append(version)

    return done


class SqliteStore:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._one_at_a_time = anyio.CapacityLimiter(1)

    async def submit_turn(self, new: NewTurn) -> SubmitResult:
        return await self._run(self._submit_turn, new)

    async def start_turn(self, turn_id: str) -> bool:
        return await self._run(self._start_turn, turn_id)

    async def finish_turn(self, turn_id: str, outcome: TurnOutcome) -> bool:
        return await self._run(self._finish_turn, turn_id, outcome)

    async def turn_outcome(self, turn_id: str) -> TurnOutcome | None:
        return await self._run(self._turn_outcome, turn_id)

    async def unfinished_turns(self, user_id: str, conversation_id: str) -> list[str]:
        return await self._run(self._unfinished_turns, user_id, conversation_id)

    async def conversation(
        self, user_id: str, conversation_id: str
    ) -> ConversationDetail:
        return await self._run(self._conversation, user_id, conversation_id)

    async def add_artifact(self, turn_id: str, record: dict[str, Any]) -> None:
        await self._run(self._add_artifact, turn_id, artifact_name(record), record)

    async def history(
        self,
        user_id: str,
        conversation_id: str,
        *,
        before_turn_id: str,
        limit: int = 20,
    ) -> list[TurnRecord]:
        check_history_limit(limit)
        return await self._run(
            self._history, user_id, conversation_id, before_turn_id, limit
        )

    async def conversations(self, user_id: str) -> list[ConversationSummary]:
        return await self._run(self._conversations, user_id)

    async def delete_conversation(
        self, user_id: str, conversation_id: str
    ) -> DeleteOutcome:
        return await self._run(self._delete_conversation, user_id, conversation_id)

    async def interrupt_unfinished(self) -> int:
        return await self._run(self._interrupt_unfinished)

    async def ping(self) -> None:
        await self._run(self._db.execute, "SELECT 1")

    async def aclose(self) -> None:
        await self._run(self._db.close)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(
                partial(fn, *args), limiter=self._one_at_a_time
            )
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc

    def _submit_turn(self, new: NewTurn) -> SubmitResult:
        now = now_ms()
        with _transaction(self._db):
            owner = self._owner(new.conversation_id)
            created = owner is None and new.create_conversation
            if created:
                self._db.execute(
                    "INSERT INTO conversations VALUES (?, ?, ?, ?, 'idle', NULL, ?, ?)",
                    (
                        new.conversation_id,
                        new.user_id,
                        new.bundle_id,
                        new.prompt[:_TITLE_CHARS],
                        now,
                        now,
                    ),
                )
            elif owner != new.user_id:
                raise ConversationNotFound(new.conversation_id)

            busy, seq = self._db.execute(
                "SELECT COALESCE(SUM(state IN ('queued', 'running')), 0),"
                " COALESCE(MAX(seq), 0) + 1 FROM turns WHERE conversation_id = ?",
                (new.conversation_id,),
            ).fetchone()
            self._db.execute(
                "INSERT INTO turns (turn_id, conversation_id, seq, bundle_id,"
                " request_id, message_kind, prompt, attachments, state, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (
                    new.turn_id,
                    new.conversation_id,
                    seq,
                    new.bundle_id,
                    new.request_id,
                    new.message_kind,
                    new.prompt,
                    json.dumps(list(new.attachments)),
                    now,
                ),
            )
            self._db.execute(
                "UPDATE conversations SET updated_at = ? WHERE conversation_id = ?",
                (now, new.conversation_id),
            )
        return SubmitResult(conversation_created=created, busy=busy > 0)

    def _start_turn(self, turn_id: str) -> bool:
        now = now_ms()
        with _transaction(self._db):
            row = self._db.execute(
                "UPDATE turns SET state = 'running', started_at = ?"
                " WHERE turn_id = ? AND state = 'queued' RETURNING conversation_id",
                (now, turn_id),
            ).fetchone()
            if row is None:
                return False

            self._db.execute(
                "UPDATE conversations SET state = 'in_progress', current_turn_id = ?,"
                " updated_at = ? WHERE conversation_id = ?",
                (turn_id, now, row[0]),
            )
        return True

    def _finish_turn(self, turn_id: str, outcome: TurnOutcome) -> bool:
        now = now_ms()
        with _transaction(self._db):
            row = self._db.execute(
                "UPDATE turns SET state = ?, final_answer = ?, error_type = ?,"
                " error = ?, finished_at = ?"
                " WHERE turn_id = ? AND state IN ('queued', 'running')"
                " RETURNING conversation_id",
                (
                    outcome.state.value,
                    outcome.final_answer,
                    outcome.error_type,
                    outcome.error,
                    now,
                    turn_id,
                ),
            ).fetchone()
            if row is None:
                return False

            settled = "idle" if outcome.state in _CALM_ENDINGS else "error"
            self._db.execute(
                "UPDATE conversations SET updated_at = ?,"
                " state = CASE WHEN current_turn_id = ? THEN ? ELSE state END"
                " WHERE conversation_id = ?",
                (now, turn_id, settled, row[0]),
            )
        return True

    def _turn_outcome(self, turn_id: str) -> TurnOutcome | None:
        row = self._db.execute(
            "SELECT state, final_answer, error_type, error FROM turns WHERE turn_id = ?",
            (turn_id,),
        ).fetchone()
        return _finished_outcome(row)

    def _unfinished_turns(self, user_id: str, conversation_id: str) -> list[str]:
        self._require_owner(user_id, conversation_id)
        rows = self._db.execute(
            "SELECT turn_id FROM turns WHERE conversation_id = ?"
            " AND state IN ('queued', 'running') ORDER BY seq",
            (conversation_id,),
        ).fetchall()
        return [row[0] for row in rows]

    def _conversation(self, user_id: str, conversation_id: str) -> ConversationDetail:
        row = self._db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM conversations"
            " WHERE conversation_id = ? AND user_id = ?",
            (conversation_id, user_id),
        ).fetchone()
        if row is None:
            raise ConversationNotFound(conversation_id)

        turns = self._db.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE conversation_id = ? ORDER BY seq",
            (conversation_id,),
        ).fetchall()
        return ConversationDetail(ConversationSummary(*row), [_turn(t) for t in turns])

    def _add_artifact(self, turn_id: str, name: str, record: dict[str, Any]) -> None:
        # Read, change, write: BEGIN IMMEDIATE makes this the only writer of
        # the database until COMMIT, in this process and any other.
        with _transaction(self._db):
            row = self._db.execute(
                "SELECT artifacts FROM turns WHERE turn_id = ?", (turn_id,)
            ).fetchone()
            if row is None:
                raise TurnNotFound(turn_id)

            listed = _with_artifact(json.loads(row[0]), name, record)
            self._db.execute(
                "UPDATE turns SET artifacts = ? WHERE turn_id = ?",
                (json.dumps(listed), turn_id),
            )

    def _history(
        self, user_id: str, conversation_id: str, before_turn_id: str, limit: int
    ) -> list[TurnRecord]:
        rows = self._db.execute(
            _HISTORY,
            {
                "user_id": user_id,
                "conversation_id": conversation_id,
                "turn_id": before_turn_id,
                "limit": limit,
            },
        ).fetchall()
        if not rows:
            raise ConversationNotFound(conversation_id)
        if rows[0][0] is None:
            raise TurnNotFound(before_turn_id)
        # Columns: the anchor's seq, the turn's seq, then _TURN_COLUMNS.
        return [_turn(row[2:]) for row in rows if row[1] is not None]

    def _conversations(self, user_id: str) -> list[ConversationSummary]:
        rows = self._db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM conversations WHERE user_id = ?"
            " ORDER BY created_at DESC, rowid DESC",
            (user_id,),
        ).fetchall()
        return [ConversationSummary(*row) for row in rows]

    def _delete_conversation(self, user_id: str, conversation_id: str) -> DeleteOutcome:
        with _transaction(self._db):
            if self._owner(conversation_id) != user_id:
                return DeleteOutcome.NOT_FOUND
            if self._unfinished_turns(user_id, conversation_id):
                return DeleteOutcome.BUSY

            self._db.execute(
                "DELETE FROM conversations WHERE conversation_id = ?",
                (conversation_id,),
            )
        return DeleteOutcome.DELETED

    def _interrupt_unfinished(self) -> int:
        now = now_ms()
        with _transaction(self._db):
            changed = self._db.execute(
                "UPDATE turns SET state = 'interrupted', error_type = 'turn_interrupted',"
                " error = 'the server stopped before this turn finished',"
                " finished_at = ? WHERE state IN ('queued', 'running')",
                (now,),
            ).rowcount
            self._db.execute(
                "UPDATE conversations SET state = 'error', updated_at = ?"
                " WHERE state = 'in_progress'",
                (now,),
            )
        return changed

    def _owner(self, conversation_id: str) -> str | None:
        row = self._db.execute(
            "SELECT user_id FROM conversations WHERE conversation_id = ?",
            (conversation_id,),
        ).fetchone()
        return None if row is None else str(row[0])

    def _require_owner(self, user_id: str, conversation_id: str) -> None:
        if self._owner(conversation_id) != user_id:
            raise ConversationNotFound(conversation_id)


_CALM_ENDINGS = frozenset({TurnState.COMPLETED, TurnState.CANCELLED})


def _finished_outcome(row: tuple[Any, ...] | None) -> TurnOutcome | None:
    if row is None or TurnState(row[0]) in UNFINISHED:
        return None
    state, answer, error_type, error = row
    return TurnOutcome(TurnState(state), answer, error_type, error)


def _turn(row: tuple[Any, ...]) -> TurnRecord:
    (
        turn_id,
        state,
        prompt,
        answer,
        error_type,
        bundle_id,
        kind,
        files,
        produced,
        created,
        done,
    ) = row
    return TurnRecord(
        turn_id=turn_id,
        state=TurnState(state),
        prompt=prompt,
        final_answer=answer,
        error_type=error_type,
        bundle_id=bundle_id,
        message_kind=kind,
        attachments=json.loads(files),
        artifacts=json.loads(produced),
        created_at=created,
        finished_at=done,
    )


def _with_artifact(
    listed: list[dict[str, Any]], name: str, record: dict[str, Any]
) -> list[dict[str, Any]]:
    """``listed`` with ``record`` in the place of its namesake, or at the end."""
    if all(entry.get("name") != name for entry in listed):
        return [*listed, record]
    return [record if entry.get("name") == name else entry for entry in listed]


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA busy_timeout = 5000")
    return connection


@asynccontextmanager
async def open_sqlite_store(path: Path) -> AsyncIterator[SqliteStore]:
    """Open (creating and migrating) the database at ``path``."""

    def open_and_migrate() -> sqlite3.Connection:
        connection = connect(path)
        migrate(connection)
        return connection

    connection = await anyio.to_thread.run_sync(open_and_migrate)
    store = SqliteStore(connection)
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()
