"""Run asyncio coroutines from whichever event loop the caller is on.

asyncio-only drivers (asyncpg) need an asyncio loop. Under asyncio that is the
running loop; under Trio, trio-asyncio runs one on top of Trio. The bridge
hides which, so the adapter that uses it never asks.

Each ``run`` is one crossing, which costs about 0.6 ms under Trio: callers pass
a whole unit of work (a transaction), never a single query.

trio-asyncio is imported only when a bridge opens under Trio, because importing
it patches asyncio for the whole process: from then on ``asyncio.run`` builds
trio-asyncio's own loop instead of a plain one. The usual advice is to import
it before any asyncio library; asyncpg 0.32 looks its loop up on every call
(``asyncio.get_running_loop()``), so importing it after asyncpg is safe. A
driver that binds the loop functions at import time (psycopg 3) is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, TypeVarTuple

import anyio
import sniffio

from kdcube.groups import sole_exception

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class AsyncioBridge:
    def __init__(self, loop: Any | None) -> None:
        """``loop``: the trio-asyncio loop, or None when already on asyncio."""
        self._loop = loop

    async def run(self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        """Run ``fn(*args)`` to completion as one asyncio task.

        When the caller is cancelled, the task gets one cancel and the caller
        waits until it has unwound, on either backend: a transaction the task
        had open is rolled back before the caller moves on.
        """
        if self._loop is None:
            return await _run_as_task(fn, *args)

        async def call() -> T:
            # Calls fn inside the asyncio task, not here on the Trio side.
            return await fn(*args)

        result: T = await self._loop.run_aio_coroutine(call())
        return result


async def _run_as_task(fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
    """Run ``fn(*args)`` in a task of its own, cancelled the way asyncio expects.

    anyio cancels level-triggered: awaited directly, every await in the
    operation's cleanup (asyncpg's ROLLBACK) would be cancelled again, and
    asyncpg would drop the connection while the server still runs the
    statement, holding its locks. So, as trio-asyncio does, the task gets one
    cancel and the caller waits, shielded, until it has unwound.
    """

    task = asyncio.ensure_future(fn(*args))
    try:
        return await asyncio.shield(task)
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def open_asyncio_bridge() -> AsyncIterator[AsyncioBridge]:
    """A bridge for the current backend; under Trio it owns an asyncio loop.

    Everything run through the bridge (connection pools included) must be
    closed before the block ends: the loop cancels what is left when it closes.
    """
    if sniffio.current_async_library() != "trio":
        yield AsyncioBridge(None)
        return

    import trio_asyncio  # type: ignore[import-untyped]

    try:
        async with trio_asyncio.open_loop() as loop:
            yield AsyncioBridge(loop)
    except BaseExceptionGroup as group:
        # The loop's nurseries wrap whatever crosses them, the block's own
        # errors included; unwrap, so that callers see the same errors as on
        # asyncio.
        sole = sole_exception(group)
        if sole is None:
            raise
        raise sole from sole.__cause__
