"""Redis shared state: sessions, windowed counters, heartbeats and locks.

Sessions, counters and tallies are pipelines of plain commands, one round
trip each.
Heartbeats and locks are scripts, because each reads and then writes: a beat
prunes expired instances by the server's clock, a lock draws its fencing
token only when it is free, and unlock deletes only the holder's lock.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from coredis import PureToken, Redis

from kdcube.bus.ports import BusError
from kdcube.bus.redis.errors import maps_errors
from kdcube.bus.redis.keys import KeyLayout

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_BEAT = (
    _NOW
    + """
local beats, expiry = KEYS[1], KEYS[2]
redis.call('HSET', beats, ARGV[1], ARGV[2])
redis.call('ZADD', expiry, now + tonumber(ARGV[3]), ARGV[1])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do
  redis.call('HDEL', beats, gone)
end
redis.call('ZREMRANGEBYSCORE', expiry, '-inf', now)
-- The role's keys live as long as its longest-lived beat.
local last = redis.call('ZRANGE', expiry, -1, -1, 'WITHSCORES')[2]
redis.call('PEXPIREAT', beats, last)
redis.call('PEXPIREAT', expiry, last)
return 1
"""
)

_ALIVE = (
    _NOW
    + """
local instances = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
if #instances == 0 then return {} end
local infos = redis.call('HMGET', KEYS[1], unpack(instances))
local result = {}
for i, instance in ipairs(instances) do
  if infos[i] then
    result[#result + 1] = instance
    result[#result + 1] = infos[i]
  end
end
return result
"""
)

_LOCK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[1])
return token
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisState:
    def __init__(self, commands: Redis[str], keys: KeyLayout) -> None:
        self._redis = commands
        self._keys = keys
        self._beat = commands.register_script(_BEAT)
        self._alive = commands.register_script(_ALIVE)
        self._lock = commands.register_script(_LOCK)
        self._unlock = commands.register_script(_UNLOCK)

    @maps_errors("find a user's session")
    async def session_for(self, user_key: str, *, ttl_s: float) -> str:
        key, ttl_ms, fresh = self._keys.session(user_key), _ms(ttl_s), uuid.uuid4().hex
        # One transaction: keep the stored id if there is one, else store ours,
        # and renew the time to live either way.
        async with self._redis.pipeline(transaction=True) as pipe:
            previous = pipe.set(key, fresh, condition=PureToken.NX, get=True, px=ttl_ms)
            pipe.pexpire(key, ttl_ms)
        stored = await previous
        return fresh if stored is None else str(stored)

    @maps_errors("count an occurrence")
    async def incr(self, key: str, *, window_s: float) -> int:
        # The window number comes from this machine's clock, which spares a
        # script; instances whose clocks differ by a few ms (NTP) only shift
        # the window edges by that much.
        window_ms = _ms(window_s)
        window = math.floor(time.time() * 1000 / window_ms)
        counter = self._keys.counter(key, window_ms, window)
        async with self._redis.pipeline(transaction=True) as pipe:
            count = pipe.incr(counter)
            pipe.pexpire(counter, 2 * window_ms)
        return await count

    @maps_errors("record a heartbeat")
    async def beat(
        self, role: str, instance: str, info: dict[str, Any], *, ttl_s: float
    ) -> None:
        await self._beat(
            keys=[self._keys.beats(role), self._keys.beat_expiry(role)],
            args=[instance, json.dumps(info), _ms(ttl_s)],
        )

    @maps_errors("list live instances")
    async def alive(self, role: str) -> dict[str, dict[str, Any]]:
        reply: Any = await self._alive(
            keys=[self._keys.beats(role), self._keys.beat_expiry(role)]
        )
        if not isinstance(reply, list):
            raise BusError(f"Redis answered {reply!r} to alive; expected a list")
        return {
            str(instance): json.loads(info)
            for instance, info in zip(reply[::2], reply[1::2], strict=True)
        }

    @maps_errors("add to a tally")
    async def add(self, tally: str, amounts: Mapping[str, float]) -> None:
        if not amounts:
            return
        key = self._keys.tally(tally)
        async with self._redis.pipeline(transaction=True) as pipe:
            for field, amount in amounts.items():
                pipe.hincrbyfloat(key, field, float(amount))

    @maps_errors("read a tally")
    async def totals(self, tally: str) -> dict[str, float]:
        stored = await self._redis.hgetall(self._keys.tally(tally))
        return {str(field): float(value) for field, value in stored.items()}

    @maps_errors("take a lock")
    async def lock(self, name: str, *, ttl_s: float) -> int | None:
        token: Any = await self._lock(
            keys=[self._keys.lock(name), self._keys.lock_tokens()], args=[_ms(ttl_s)]
        )
        return None if token is None else int(str(token))

    @maps_errors("release a lock")
    async def unlock(self, name: str, token: int) -> bool:
        released: Any = await self._unlock(
            keys=[self._keys.lock(name)], args=[str(token)]
        )
        return bool(released == 1)
