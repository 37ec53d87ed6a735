"""Postgres store for the service mode: several processes, one database.

It behaves exactly like the SQLite store (``kdcube.store.sqlite``). What
differs is how it is reached and how it stays correct with several writers:

- asyncpg speaks asyncio only, so each operation crosses the asyncio bridge
  once, as one coroutine that runs one whole transaction. Cancelling the caller
  cancels that coroutine and asyncpg rolls the transaction back, so an
  operation lands whole or not at all. A cancel that arrives while COMMIT is
  in flight may still commit; the caller cannot tell which.
- SQLite has a single writer (BEGIN IMMEDIATE). Here, submits to the same
  conversation queue up on its row lock, and each conversation state change is
  one UPDATE, whose condition Postgres re-checks against the newest version of
  the row, so concurrent processors lose no update.
- Each project's tables live in a schema of their own. Every pooled connection
  has that schema as its only search_path, so no SQL here names it.

Unlike SQLite, Postgres text cannot hold the NUL character: a prompt or answer
containing one fails with StoreError instead of being stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar, TypeVarTuple

import anyio
import asyncpg  # type: ignore[import-untyped]

from kdcube.store.asyncio_bridge import AsyncioBridge, open_asyncio_bridge
from kdcube.store.ports import (
    UNFINISHED,
    ConversationDetail,
    ConversationNotFound,
    ConversationSummary,
    DeleteOutcome,
    NewTurn,
    StoreError,
    StoreUnavailable,
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
Ts = TypeVarTuple("Ts")

_TITLE_CHARS = 80
_MAX_IDENTIFIER_BYTES = 63
_POOL_CLOSE_TIMEOUT_S = 10.0
_SUMMARY_COLUMNS = (
    "conversation_id, title, bundle_id, state, current_turn_id, created_at, updated_at"
)
_TURN_COLUMNS = (
    "turn_id, state, prompt, final_answer, error_type, bundle_id, message_kind,"
    " attachments, artifacts, created_at, finished_at"
)
# One UPDATE, so concurrent adds need no lock of ours: the second waits for the
# first's row lock, then Postgres recomputes the new list from the row the first
# wrote. A namesake ($3) is replaced where it stands, in order; else append.
_ADD_ARTIFACT = """
UPDATE turns SET artifacts = CASE
    WHEN artifacts @> jsonb_build_array(jsonb_build_object('name', $3::text)) THEN (
        SELECT jsonb_agg(
            CASE WHEN entry->>'name' = $3 THEN $2::jsonb ELSE entry END
            ORDER BY position
        )
        FROM jsonb_array_elements(artifacts) WITH ORDINALITY AS listed(entry, position)
    )
    ELSE artifacts || jsonb_build_array($2::jsonb)
END
WHERE turn_id = $1
RETURNING true
"""
# A turn's history in one statement. ``anchor`` has one row when the user owns
# the conversation, whose seq is NULL when the turn is not in it; the LEFT JOIN
# keeps that row when nothing came before, so an empty history, a missing turn
# and a missing conversation each read differently.
_HISTORY = f"""
WITH anchor AS (
    SELECT t.seq FROM conversations c
    LEFT JOIN turns t ON t.conversation_id = c.conversation_id AND t.turn_id = $3
    WHERE c.conversation_id = $2 AND c.user_id = $1
),
recent AS (
    SELECT seq, {_TURN_COLUMNS} FROM turns
    WHERE conversation_id = $2 AND seq < (SELECT seq FROM anchor)
    ORDER BY seq DESC LIMIT $4
)
SELECT anchor.seq AS before_seq, recent.*
FROM anchor LEFT JOIN recent ON true ORDER BY recent.seq
"""
_UNAVAILABLE = (
    OSError,  # refused, unreachable, DNS, timeouts (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08: the connection broke
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)


@asynccontextmanager
async def open_postgres_store(
    dsn: str, *, schema: str, max_connections: int = 10
) -> AsyncIterator[PostgresStore]:
    """Open a pool on ``schema``, creating and migrating the schema first.

    Under Trio this also runs the asyncio loop that asyncpg needs, for as long
    as the store is open.
    """
    quoted = _quote_schema(schema)
    async with open_asyncio_bridge() as bridge:
        pool = await _call(bridge, _open_pool, dsn, quoted, max_connections)
        store = PostgresStore(pool, bridge)
        try:
            yield store
        finally:
            with anyio.CancelScope(shield=True):
                await store.aclose()


async def migrate(dsn: str, schema: str) -> list[int]:
    """Apply the migrations ``schema`` lacks; returns their versions.

    Opening a store migrates as well; this lets an operator (``kdcube
    migrate``) do it ahead of a rollout.
    """
    quoted = _quote_schema(schema)
    async with open_asyncio_bridge() as bridge:
        return await _call(bridge, _migrate_database, dsn, quoted)


class PostgresStore:
    """The Store port on one schema; open it with ``open_postgres_store``.

    The public methods run on the caller's loop and each cross the bridge once;
    the private ones run on the asyncio side, one transaction each.
    """

    def __init__(self, pool: Any, bridge: AsyncioBridge) -> None:
        self._pool = pool
        self._bridge = bridge

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
        name = artifact_name(record)
        await self._run(self._add_artifact, turn_id, name, json.dumps(record))

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
        """Interrupts the turns of every process on this schema, not only ours:
        with several processes, call it only when none of them runs turns."""
        return await self._run(self._interrupt_unfinished)

    async def ping(self) -> None:
        await self._run(self._ping)

    async def aclose(self) -> None:
        await self._run(_close_pool, self._pool)

    async def _run(self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        return await _call(self._bridge, fn, *args)

    async def _submit_turn(self, new: NewTurn) -> SubmitResult:
        now = now_ms()
        async with _connection(self._pool) as db, db.transaction():
            created = new.create_conversation and await _create(db, new, now)
            owner = await _owner(db, new.conversation_id, lock="FOR NO KEY UPDATE")
            if owner != new.user_id:
                raise ConversationNotFound(new.conversation_id)

            busy, seq = await db.fetchrow(
                "SELECT count(*) FILTER (WHERE state IN ('queued', 'running')),"
                " COALESCE(max(seq), 0) + 1 FROM turns WHERE conversation_id = $1",
                new.conversation_id,
            )
            await db.execute(
                "INSERT INTO turns (turn_id, conversation_id, seq, bundle_id,"
                " request_id, message_kind, prompt, attachments, state, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, 'queued', $9)",
                new.turn_id,
                new.conversation_id,
                seq,
                new.bundle_id,
                new.request_id,
                new.message_kind,
                new.prompt,
                json.dumps(list(new.attachments)),
                now,
            )
            await db.execute(
                "UPDATE conversations SET updated_at = $1 WHERE conversation_id = $2",
                now,
                new.conversation_id,
            )
        return SubmitResult(conversation_created=created, busy=busy > 0)

    async def _start_turn(self, turn_id: str) -> bool:
        now = now_ms()
        async with _connection(self._pool) as db, db.transaction():
            conversation_id = await db.fetchval(
                "UPDATE turns SET state = 'running', started_at = $1"
                " WHERE turn_id = $2 AND state = 'queued' RETURNING conversation_id",
                now,
                turn_id,
            )
            if conversation_id is None:
                return False

            await db.execute(
                "UPDATE conversations SET state = 'in_progress', current_turn_id = $1,"
                " updated_at = $2 WHERE conversation_id = $3",
                turn_id,
                now,
                conversation_id,
            )
        return True

    async def _turn_outcome(self, turn_id: str) -> TurnOutcome | None:
        async with _connection(self._pool) as db:
            row = await db.fetchrow(
                "SELECT state, final_answer, error_type, error FROM turns"
                " WHERE turn_id = $1",
                turn_id,
            )
        if row is None or TurnState(row["state"]) in UNFINISHED:
            return None
        return TurnOutcome(
            TurnState(row["state"]),
            row["final_answer"],
            row["error_type"],
            row["error"],
        )

    async def _finish_turn(self, turn_id: str, outcome: TurnOutcome) -> bool:
        now = now_ms()
        async with _connection(self._pool) as db, db.transaction():
            conversation_id = await db.fetchval(
                "UPDATE turns SET state = $1, final_answer = $2, error_type = $3,"
                " error = $4, finished_at = $5"
                " WHERE turn_id = $6 AND state IN ('queued', 'running')"
                " RETURNING conversation_id",
                outcome.state.value,
                outcome.final_answer,
                outcome.error_type,
                outcome.error,
                now,
                turn_id,
            )
            if conversation_id is None:
                return False

            # Compare-and-set in one statement: if another turn started
            # meanwhile, the CASE sees its current_turn_id and keeps the state.
            settled = "idle" if outcome.state in _CALM_ENDINGS else "error"
            await db.execute(
                "UPDATE conversations SET updated_at = $1,"
                " state = CASE WHEN current_turn_id = $2 THEN $3 ELSE state END"
                " WHERE conversation_id = $4",
                now,
                turn_id,
                settled,
                conversation_id,
            )
        return True

    async def _unfinished_turns(self, user_id: str, conversation_id: str) -> list[str]:
        # No snapshot needed: a conversation never changes owner, and once it is
        # deleted its list is empty either way.
        async with _connection(self._pool) as db:
            return await _unfinished(db, user_id, conversation_id)

    async def _conversation(
        self, user_id: str, conversation_id: str
    ) -> ConversationDetail:
        async with _connection(self._pool) as db, _snapshot(db):
            summary = await db.fetchrow(
                f"SELECT {_SUMMARY_COLUMNS} FROM conversations"
                " WHERE conversation_id = $1 AND user_id = $2",
                conversation_id,
                user_id,
            )
            if summary is None:
                raise ConversationNotFound(conversation_id)

            turns = await db.fetch(
                f"SELECT {_TURN_COLUMNS} FROM turns"
                " WHERE conversation_id = $1 ORDER BY seq",
                conversation_id,
            )
        return ConversationDetail(_summary(summary), [_turn(row) for row in turns])

    async def _add_artifact(self, turn_id: str, name: str, record: str) -> None:
        async with _connection(self._pool) as db:
            if await db.fetchval(_ADD_ARTIFACT, turn_id, record, name) is None:
                raise TurnNotFound(turn_id)

    async def _history(
        self, user_id: str, conversation_id: str, before_turn_id: str, limit: int
    ) -> list[TurnRecord]:
        async with _connection(self._pool) as db:
            rows = await db.fetch(
                _HISTORY, user_id, conversation_id, before_turn_id, limit
            )
        if not rows:
            raise ConversationNotFound(conversation_id)
        if rows[0]["before_seq"] is None:
            raise TurnNotFound(before_turn_id)
        return [_turn(row) for row in rows if row["seq"] is not None]

    async def _conversations(self, user_id: str) -> list[ConversationSummary]:
        async with _connection(self._pool) as db:
            rows = await db.fetch(
                f"SELECT {_SUMMARY_COLUMNS} FROM conversations WHERE user_id = $1"
                " ORDER BY created_at DESC, created_order DESC",
                user_id,
            )
        return [_summary(row) for row in rows]

    async def _delete_conversation(
        self, user_id: str, conversation_id: str
    ) -> DeleteOutcome:
        async with _connection(self._pool) as db, db.transaction():
            if await _owner(db, conversation_id, lock="FOR UPDATE") != user_id:
                return DeleteOutcome.NOT_FOUND
            if await _unfinished(db, user_id, conversation_id):
                return DeleteOutcome.BUSY

            await db.execute(
                "DELETE FROM conversations WHERE conversation_id = $1",
                conversation_id,
            )
        return DeleteOutcome.DELETED

    async def _interrupt_unfinished(self) -> int:
        now = now_ms()
        async with _connection(self._pool) as db, db.transaction():
            changed: int = await db.fetchval(
                "WITH changed AS (UPDATE turns SET state = 'interrupted',"
                " error_type = 'turn_interrupted',"
                " error = 'the server stopped before this turn finished',"
                " finished_at = $1 WHERE state IN ('queued', 'running') RETURNING 1)"
                " SELECT count(*) FROM changed",
                now,
            )
            await db.execute(
                "UPDATE conversations SET state = 'error', updated_at = $1"
                " WHERE state = 'in_progress'",
                now,
            )
        return changed

    async def _ping(self) -> None:
        async with _connection(self._pool) as db:
            await db.fetchval("SELECT 1")


_CALM_ENDINGS = frozenset({TurnState.COMPLETED, TurnState.CANCELLED})


async def _call(
    bridge: AsyncioBridge, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts
) -> T:
    """Run ``fn`` across the bridge; the one place driver errors are mapped."""
    try:
        return await bridge.run(fn, *args)
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(
            f"postgres unreachable ({str(exc) or type(exc).__name__}):"
            " check the DSN and that the server is up"
        ) from exc
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    ) as exc:
        raise StoreError(f"postgres: {exc}") from exc


@asynccontextmanager
async def _connection(pool: Any) -> AsyncIterator[Any]:
    """A pooled connection, whose loss is always reported the same way.

    When the server goes away mid-operation, asyncpg raises whatever the
    operation tripped over: InterfaceError from a rollback on the dead
    connection, or an InternalClientError from its protocol state. The
    reliable sign is that the connection is closed now; this turns all of it
    into asyncpg's own ConnectionDoesNotExistError, which ``_call`` maps to
    StoreUnavailable like every other loss.
    """
    async with pool.acquire() as db:
        try:
            yield db
        except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            if not _lost(db):
                raise
            raise asyncpg.ConnectionDoesNotExistError(
                f"connection lost mid-operation: {exc}"
            ) from exc


def _lost(db: Any) -> bool:
    try:
        return bool(db.is_closed())
    except asyncpg.InterfaceError:
        # Detached from its connection: the pool took it back because it closed.
        return True


async def _create(db: Any, new: NewTurn, now: int) -> bool:
    """Insert the conversation unless it exists; whether this call created it.

    ON CONFLICT waits for a concurrent insert of the same id to commit and then
    does nothing, so of two racing creators one creates the conversation and
    the other appends to it, as with SQLite's single writer.
    """
    inserted = await db.fetchval(
        "INSERT INTO conversations (conversation_id, user_id, bundle_id, title,"
        " state, created_at, updated_at) VALUES ($1, $2, $3, $4, 'idle', $5, $5)"
        " ON CONFLICT (conversation_id) DO NOTHING RETURNING true",
        new.conversation_id,
        new.user_id,
        new.bundle_id,
        new.prompt[:_TITLE_CHARS],
        now,
    )
    return inserted is not None


async def _owner(db: Any, conversation_id: str, *, lock: str = "") -> str | None:
    """The conversation's user; ``lock`` holds the row until the transaction ends.

    Submits lock it so that only one of several concurrent submits finds the
    conversation idle.
    """
    owner: str | None = await db.fetchval(
        f"SELECT user_id FROM conversations WHERE conversation_id = $1 {lock}",
        conversation_id,
    )
    return owner


async def _unfinished(db: Any, user_id: str, conversation_id: str) -> list[str]:
    if await _owner(db, conversation_id) != user_id:
        raise ConversationNotFound(conversation_id)

    rows = await db.fetch(
        "SELECT turn_id FROM turns WHERE conversation_id = $1"
        " AND state IN ('queued', 'running') ORDER BY seq",
        conversation_id,
    )
    return [str(row["turn_id"]) for row in rows]


def _snapshot(db: Any) -> Any:
    """A read-only transaction whose reads all see the same moment."""
    return db.transaction(isolation="repeatable_read", readonly=True)


def _summary(row: Any) -> ConversationSummary:
    return ConversationSummary(**dict(row.items()))


def _turn(row: Any) -> TurnRecord:
    return TurnRecord(
        turn_id=row["turn_id"],
        state=TurnState(row["state"]),
        prompt=row["prompt"],
        final_answer=row["final_answer"],
        error_type=row["error_type"],
        bundle_id=row["bundle_id"],
        message_kind=row["message_kind"],
        attachments=json.loads(row["attachments"]),
        artifacts=json.loads(row["artifacts"]),
        created_at=row["created_at"],
        finished_at=row["finished_at"],
    )


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    def get_reset_query(self) -> str:
        """Nothing to reset when a connection goes back to the pool.

        asyncpg's default (unlock advisory locks, CLOSE ALL, UNLISTEN *, RESET
        ALL) costs a round trip per operation, about 0.2 ms here, to undo
        session state that this module never creates: it takes advisory locks
        per transaction, sets settings with SET LOCAL, and neither listens nor
        keeps cursors. asyncpg still rolls back a transaction left open.
        """
        return ""


async def _open_pool(dsn: str, schema: str, max_connections: int) -> Any:
    """Create the pool, then migrate through it; a failed migration closes it."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_connections,
        connection_class=_Connection,
        server_settings={"search_path": schema},
    )
    try:
        async with pool.acquire() as connection:
            await _migrate(connection, schema)
    except BaseException:
        pool.terminate()
        raise
    return pool


async def _close_pool(pool: Any) -> None:
    """Close gracefully; drop the connections if that takes too long."""
    try:
        await asyncio.wait_for(pool.close(), _POOL_CLOSE_TIMEOUT_S)
    except TimeoutError:
        pool.terminate()


async def _migrate_database(dsn: str, schema: str) -> list[int]:
    connection = await asyncpg.connect(dsn)
    try:
        return await _migrate(connection, schema)
    finally:
        await connection.close()


async def _migrate(connection: Any, schema: str) -> list[int]:
    """Apply the packaged migrations the schema lacks; returns their versions.

    All of them in one transaction, under an advisory lock on the schema's
    name, taken before CREATE SCHEMA (which races too): when two processes
    start at once, the second waits and then finds nothing left to do.
    """
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await connection.execute(f"SET LOCAL search_path TO {schema}")
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )
        rows = await connection.fetch("SELECT version FROM schema_migrations")
        applied = {row["version"] for row in rows}
        done = []
        for version, script in _scripts():
            if version in applied:
                continue

            await connection.execute(script)
            await connection.execute(
                "INSERT INTO schema_migrations VALUES ($1, $2)", version, now_ms()
            )
            done.append(version)
    return done


def _scripts() -> list[tuple[int, str]]:
    """The packaged migrations as (version, SQL), oldest first."""
    folder = resources.files("kdcube.store.migrations.postgres")
    return sorted(
        (int(path.name.split("_", 1)[0]), path.read_text())
        for path in folder.iterdir()
        if path.name.endswith(".sql")
    )


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"kdcube.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _quote_schema(schema: str) -> str:
    """``schema`` as a quoted SQL identifier.

    Postgres silently truncates names past 63 bytes, which could make two long
    project names share a schema; such names are refused instead.
    """
    size = len(schema.encode())
    if not 0 < size <= _MAX_IDENTIFIER_BYTES or "\x00" in schema:
        raise StoreError(
            f"invalid schema name {schema!r}: use 1 to {_MAX_IDENTIFIER_BYTES}"
            " bytes without NUL, e.g. kdcube_<tenant>_<project>"
        )
    return '"' + schema.replace('"', '""') + '"'
