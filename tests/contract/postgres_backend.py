"""A fresh Postgres schema per test, for the store contract.

The database is shared (``KDCUBE_TEST_POSTGRES_DSN``, by default the local
server), so every test gets a schema of its own and drops it afterwards.

Setting up, inspecting and dropping happen synchronously (fixtures and
``applied_migrations`` are sync), on a plain asyncio loop in a worker thread:
the test's own loop may be running in the main thread, and the worker loop
needs no bridge whichever backend the test runs on.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from kdcube.store.ports import Store
from kdcube.store.postgres import open_postgres_store

T = TypeVar("T")

DSN = os.environ.get(
    "KDCUBE_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class PostgresSchema:
    dsn: str
    name: str

    def open(self) -> AbstractAsyncContextManager[Store]:
        return open_postgres_store(self.dsn, schema=self.name)

    def applied_migrations(self) -> list[int]:
        rows = self.query(f'SELECT version FROM "{self.name}".schema_migrations')
        return sorted(row[0] for row in rows)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        async def fetch() -> list[tuple[Any, ...]]:
            connection = await asyncpg.connect(self.dsn)
            try:
                return [tuple(row) for row in await connection.fetch(sql)]
            finally:
                await connection.close()

        return run_in_worker_loop(fetch)


@contextmanager
def fresh_schema(dsn: str = DSN) -> Iterator[PostgresSchema]:
    """A schema name no one uses; whatever the test creates in it is dropped."""
    schema = PostgresSchema(dsn, f"kdcube_test_{uuid.uuid4().hex[:16]}")
    try:
        yield schema
    finally:
        schema.query(f'DROP SCHEMA IF EXISTS "{schema.name}" CASCADE')


def run_in_worker_loop(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion on a new plain asyncio loop in a thread.

    The loop factory is explicit: once trio-asyncio is imported, asyncio's
    default would be trio-asyncio's own loop.
    """

    async def main() -> T:
        return await fn()

    def run() -> T:
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            return runner.run(main())

    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(run).result()
