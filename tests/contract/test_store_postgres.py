"""What only the Postgres store can get wrong, beyond the Store contract.

SQLite runs each operation to its end in a worker thread, whoever cancels.
Postgres operations are cancelled for real, so a cancel must roll back what the
operation had already written, and leave its connection fit for reuse. Several
processes may also open the same schema at once, and the server may be away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import anyio
import anyio.to_thread
import asyncpg  # type: ignore[import-untyped]
import pytest

from kdcube.store.asyncio_bridge import open_asyncio_bridge
from kdcube.store.ports import (
    ConversationNotFound,
    NewTurn,
    StoreUnavailable,
    SubmitResult,
)
from kdcube.store.postgres import migrate, open_postgres_store

from .postgres_backend import PostgresSchema, fresh_schema, run_in_worker_loop

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Real clocks: trio-asyncio runs asyncpg's timers on Trio's clock."""
    if request.param == "trio":
        return "trio", {}
    return "asyncio", {"loop_factory": asyncio.SelectorEventLoop}


def turn(turn_id: str, conversation_id: str, *, new: bool) -> NewTurn:
    return NewTurn(
        user_id="alice",
        conversation_id=conversation_id,
        create_conversation=new,
        bundle_id="echo",
        turn_id=turn_id,
        request_id=f"r-{turn_id}",
        message_kind="chat",
        prompt=f"prompt of {turn_id}",
    )


async def test_a_cancelled_submit_rolls_back_what_it_wrote() -> None:
    with fresh_schema() as schema:
        async with schema.open() as store:
            await store.submit_turn(turn("t1", "c1", new=True))
            async with _uncommitted_turn(schema, "t2", "c1") as holder:
                # Creates c2, then waits for the holder to release turn id t2.
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(store.submit_turn, turn("t2", "c2", new=True))
                    await anyio.to_thread.run_sync(_wait_until_blocked, schema, holder)
                    tasks.cancel_scope.cancel()

                assert not await anyio.to_thread.run_sync(_blocked_by, schema, holder)
                with pytest.raises(ConversationNotFound):
                    await store.conversation("alice", "c2")

            result = await store.submit_turn(turn("t2", "c2", new=True))
            assert result == SubmitResult(conversation_created=True, busy=False)


async def test_a_connection_lost_mid_operation_is_unavailable() -> None:
    with fresh_schema() as schema:
        async with schema.open() as store:
            await store.submit_turn(turn("t1", "c1", new=True))

            async def submit() -> None:
                with pytest.raises(StoreUnavailable):
                    await store.submit_turn(turn("t2", "c2", new=True))

            async with _uncommitted_turn(schema, "t2", "c1") as holder:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(submit)
                    [victim] = await anyio.to_thread.run_sync(
                        _wait_until_blocked, schema, holder
                    )
                    sql = f"SELECT pg_terminate_backend({victim})"
                    await anyio.to_thread.run_sync(schema.query, sql)

            result = await store.submit_turn(turn("t2", "c2", new=True))
            assert result == SubmitResult(conversation_created=True, busy=False)


async def test_concurrent_migrations_apply_once() -> None:
    with fresh_schema() as schema:
        applied: list[list[int]] = []

        async def run() -> None:
            applied.append(await migrate(schema.dsn, schema.name))

        async with anyio.create_task_group() as tasks:
            for _ in range(4):
                tasks.start_soon(run)

        assert len([versions for versions in applied if versions]) == 1
        assert schema.applied_migrations() == max(applied)


async def test_migration_gives_earlier_turns_no_artifacts() -> None:
    with fresh_schema() as schema:
        await anyio.to_thread.run_sync(_schema_at_first_migration, schema)

        async with schema.open() as store:
            detail = await store.conversation("alice", "c1")

        assert detail.turns[0].artifacts == []
        assert schema.applied_migrations() == [1, 2]


async def test_an_unreachable_server_is_reported_as_unavailable() -> None:
    nobody_listens = "postgresql://postgres@127.0.0.1:1/test"

    with pytest.raises(StoreUnavailable, match="unreachable"):
        async with open_postgres_store(nobody_listens, schema="kdcube_test"):
            pass


async def test_an_error_in_the_block_comes_out_unwrapped() -> None:
    with fresh_schema() as schema, pytest.raises(LookupError, match="the block"):
        async with schema.open():
            raise LookupError("raised in the block")


async def test_ping_answers_while_the_server_is_up() -> None:
    with fresh_schema() as schema:
        async with schema.open() as store:
            await store.ping()


@asynccontextmanager
async def _uncommitted_turn(
    schema: PostgresSchema, turn_id: str, conversation_id: str
) -> AsyncIterator[int]:
    """Insert a turn and hold its transaction open; yields the server pid."""

    async def begin() -> Any:
        connection = await asyncpg.connect(
            schema.dsn, server_settings={"search_path": schema.name}
        )
        await connection.execute("BEGIN")
        await connection.execute(
            "INSERT INTO turns (turn_id, conversation_id, seq, bundle_id,"
            " request_id, message_kind, prompt, state, created_at)"
            " VALUES ($1, $2, 99, 'echo', 'r', 'chat', 'p', 'queued', 0)",
            turn_id,
            conversation_id,
        )
        return connection

    async with open_asyncio_bridge() as bridge:
        connection = await bridge.run(begin)
        try:
            yield await bridge.run(connection.fetchval, "SELECT pg_backend_pid()")
        finally:
            with anyio.CancelScope(shield=True):
                await bridge.run(connection.close)  # rolls the insert back


def _schema_at_first_migration(schema: PostgresSchema) -> None:
    """The schema as migration 1 left it, holding one finished turn."""
    first = resources.files("kdcube.store.migrations.postgres").joinpath(
        "0001_conversations.sql"
    )

    async def build() -> None:
        connection = await asyncpg.connect(schema.dsn)
        try:
            await connection.execute(
                f"""CREATE SCHEMA "{schema.name}";
                SET search_path TO "{schema.name}";
                {first.read_text()}
                CREATE TABLE schema_migrations
                    (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL);
                INSERT INTO schema_migrations VALUES (1, 0);
                INSERT INTO conversations (conversation_id, user_id, bundle_id,
                    title, state, created_at, updated_at)
                    VALUES ('c1', 'alice', 'echo', 't', 'idle', 0, 0);
                INSERT INTO turns (turn_id, conversation_id, seq, bundle_id,
                    request_id, message_kind, prompt, state, created_at)
                    VALUES ('t1', 'c1', 1, 'echo', 'r', 'chat', 'p', 'completed', 0);
                """
            )
        finally:
            await connection.close()

    run_in_worker_loop(build)


def _wait_until_blocked(schema: PostgresSchema, pid: int) -> list[int]:
    """Poll: the server announces no lock wait, so there is no event to await."""
    while not (blocked := _blocked_by(schema, pid)):
        time.sleep(0.01)
    return blocked


def _blocked_by(schema: PostgresSchema, pid: int) -> list[int]:
    """Server pids waiting for a lock that ``pid`` holds."""
    rows = schema.query(
        f"SELECT pid FROM pg_stat_activity WHERE {pid} = ANY(pg_blocking_pids(pid))"
    )
    return [row[0] for row in rows]
