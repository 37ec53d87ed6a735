"""Driver errors mapped once, at the adapter boundary, into the bus's own tree.

Callers of the bus handle ``BusUnavailable`` (retry later) and ``BusError``;
they never see a coredis exception.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import anyio.lowlevel
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import RedisError

from kdcube.bus.ports import BusError, BusUnavailable

P = ParamSpec("P")
R = TypeVar("R")


@asynccontextmanager
async def translated(action: str) -> AsyncIterator[None]:
    """Re-raise coredis errors met while doing ``action`` as bus errors."""
    try:
        yield
    except (RedisConnectionError, TimeoutError, OSError) as exc:
        # coredis reports a connection attempt cut short by a cancel as a
        # failed connection; let the cancel through, as the caller expects.
        await anyio.lowlevel.checkpoint_if_cancelled()
        # TimeoutError here is coredis's request timeout: the adapter opens no
        # fail_after scope of its own, and a caller's scope raises outside.
        raise BusUnavailable(
            f"Redis did not answer while trying to {action} ({exc}); check that"
            " it runs and that the bus URL points at it"
        ) from exc
    except RedisError as exc:
        raise BusError(f"Redis refused to {action}: {exc}") from exc


def maps_errors(
    action: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate an adapter method so that its driver errors become bus errors."""

    def decorate(
        method: Callable[P, Awaitable[R]],
    ) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            async with translated(action):
                return await method(*args, **kwargs)

        return wrapper

    return decorate
