"""The Redis bus: queue, relay and state of one deployment on one Redis.

Two coredis clients share the server. ``commands`` serves every short
command; coredis multiplexes them over a few connections. ``waits`` serves
what blocks (BLPOP of waiting claims, XREAD BLOCK of tailing reads, the
cancel subscription), each holding a connection while it waits, so a crowd
of waiters can never starve publishing or acking of connections.

Neither client retries on its own: a script that ran but whose reply was lost
must not run twice (a claim would take a second turn). Errors reach callers
as ``BusUnavailable``, and the callers decide when to try again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from coredis import Redis
from coredis.retry import NoRetryPolicy

from kdcube.bus.redis.errors import translated
from kdcube.bus.redis.keys import KeyLayout
from kdcube.bus.redis.queue import RedisQueue
from kdcube.bus.redis.relay import RedisRelay
from kdcube.bus.redis.state import RedisState
from kdcube.groups import sole_exception

_WARM_CONNECTIONS = 4
"""Connections the waits pool opens up front."""


class RedisBus:
    durable = True

    def __init__(
        self,
        commands: Redis[str],
        waits: Redis[str],
        keys: KeyLayout,
        *,
        retention_s: float,
        max_events: int,
    ) -> None:
        self.keys = keys
        self.commands = commands
        """The short-command client, for other live records of the deployment."""
        self.queue = RedisQueue(commands, waits, keys)
        self.relay = RedisRelay(
            commands, waits, keys, retention_s=retention_s, max_events=max_events
        )
        self.state = RedisState(commands, keys)


async def _warm_up(client: Redis[str], count: int) -> None:
    # Connections opened now spare the first claims and reads a handshake
    # before they can start to wait.
    pool = client.connection_pool
    opened = []
    try:
        for _ in range(count):
            opened.append(await pool.get_connection())
    finally:
        for connection in opened:
            pool.release(connection)


def _redacted(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _client(url: str, max_connections: int) -> Redis[str]:
    return Redis.from_url(
        url,
        decode_responses=True,
        retry_policy=NoRetryPolicy(),
        max_connections=max_connections,
    )


@asynccontextmanager
async def open_redis_bus(
    url: str,
    *,
    tenant: str,
    project: str,
    prefix: str = "kdcube",
    retention_s: float = 600,
    max_events: int = 10_000,
    max_waiting: int = 1_000,
) -> AsyncIterator[RedisBus]:
    """Connect to the Redis at ``url`` and check that it answers.

    ``max_waiting`` bounds the connections held by blocked claims, tailing
    reads and cancel subscriptions together; one more waiter waits for a
    connection to come free.
    """
    keys = KeyLayout(prefix, tenant, project)
    try:
        async with _client(url, 64) as commands, _client(url, max_waiting) as waits:
            async with translated(f"connect to {_redacted(url)}"):
                await commands.ping()
                await _warm_up(waits, _WARM_CONNECTIONS)
            bus = RedisBus(
                commands, waits, keys, retention_s=retention_s, max_events=max_events
            )
            await bus.queue.prepare()
            yield bus
    except BaseExceptionGroup as group:
        # coredis's connection pools run task groups, which wrap whatever
        # crosses them, the block's own errors included; unwrap, so that
        # callers see BusUnavailable rather than a group around it.
        sole = sole_exception(group)
        if sole is None:
            raise
        raise sole from sole.__cause__
