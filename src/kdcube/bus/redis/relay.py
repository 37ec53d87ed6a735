"""Redis relay: one stream per session, bounded by count and idle time.

Publishing is one script call: XADD with ``MAXLEN ~`` (whole-node trimming,
cheap for large caps), an exact XTRIM once a stream exceeds its cap by a
tenth (node trimming does nothing while the cap is below a node's 100
entries), and PEXPIRE, so a session's stream lives ``retention_s`` after its
last event. The script also picks the event id itself from a per-deployment
"last id" key instead of letting XADD pick one per stream: ids then grow
across sessions too, like the in-memory relay's, and a cursor from
``position`` sorts before every later event of every session.

Gaps. Trimming removes the oldest entries, so once a stream has lost any
(XINFO: ``entries-added`` above ``length``), a cursor older than its first
kept entry is a gap. That is conservative: Redis 7.0 does not record the id
of the last entry a trim removed (``max-deleted-entry-id`` only follows
XDEL), so a cursor that sits exactly on it is reported as a gap too. A
stream that never lost an entry was created at its first entry, and any
earlier incarnation expired at least ``retention_s`` before that, so only a
cursor older than first entry minus retention is a gap. A stream that does
not exist lost everything published before ``now - retention_s``.

Known shortcomings: a read looks for a gap before it blocks, so entries
trimmed between that look and its XREAD go unreported, which takes more than
``max_events`` events published within that one round trip. Redis checks
blocking timeouts on its cron tick (``hz`` 10 by default), so a read that
times out may return up to about 100 ms late.

Each waiting read holds one connection of the waits pool while it blocks.
"""

from __future__ import annotations

from typing import Any

import anyio
from coredis import Redis
from coredis.response.types import StreamEntry

from kdcube.bus.ports import (
    BusError,
    RelayEvent,
    RelayRead,
    format_event_id,
    parse_event_id,
)
from kdcube.bus.redis.errors import maps_errors
from kdcube.bus.redis.keys import KeyLayout

EventKey = tuple[int, int]

_BATCH = 1_000
"""Most entries one read fetches; the cursor moves on past what it fetched."""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_PUBLISH = (
    _NOW
    + """
local stream, last_key, once_key = KEYS[1], KEYS[2], KEYS[3]
local max_events, retention_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[7] == '1' and not redis.call('SET', once_key, '1', 'NX', 'PX', retention_ms) then
  return false
end
local ms, seq = now, 0
local last = redis.call('GET', last_key)
if last then
  local dash = string.find(last, '-', 1, true)
  local last_ms = tonumber(string.sub(last, 1, dash - 1))
  if last_ms >= now then ms, seq = last_ms, tonumber(string.sub(last, dash + 1)) + 1 end
end
local id = string.format('%d-%d', ms, seq)
local fields = {'route', ARGV[3], 'data', ARGV[4]}
if ARGV[5] == '1' then fields[5], fields[6] = 'stream', ARGV[6] end
local added = redis.pcall('XADD', stream, 'MAXLEN', '~', max_events, id, unpack(fields))
if type(added) == 'table' and added.err then
  -- The stream is ahead of the last id (that key was lost): let Redis pick
  -- an id after the stream's own top.
  id = redis.call('XADD', stream, 'MAXLEN', '~', max_events, '*', unpack(fields))
end
if redis.call('XLEN', stream) > max_events + math.floor(max_events / 10) then
  redis.call('XTRIM', stream, 'MAXLEN', max_events)
end
redis.call('PEXPIRE', stream, retention_ms)
redis.call('SET', last_key, id)
return id
"""
)

# The last id handed out, or just before now when none is left: every later
# event sorts after either.
_POSITION = (
    _NOW
    + """
local last = redis.call('GET', KEYS[1])
if last and tonumber(string.sub(last, 1, string.find(last, '-', 1, true) - 1)) >= now - 1 then
  return last
end
return string.format('%d-0', now - 1)
"""
)

# Returns {gap floor, skip-to cursor or false, entries after ARGV[1]}.
_HEAD = (
    _NOW
    + """
local stream, last_key = KEYS[1], KEYS[2]
local after, retention_ms, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function ms_of(id) return tonumber(string.sub(id, 1, string.find(id, '-', 1, true) - 1)) end
if redis.call('EXISTS', stream) == 0 then
  local skip = string.format('%d-0', now - 1)
  local last = redis.call('GET', last_key)
  if last and ms_of(last) >= now - 1 then skip = last end
  return {string.format('%d-0', now - retention_ms), skip, {}}
end
local info = redis.call('XINFO', 'STREAM', stream)
local field = {}
for i = 1, #info, 2 do field[info[i]] = info[i + 1] end
local first = field['first-entry']
local floor, skip = string.format('%d-0', now - retention_ms), false
if field['entries-added'] > field['length'] then
  if first then floor = first[1] else
    floor = field['last-generated-id']
    skip = floor
  end
elseif first then
  floor = string.format('%d-0', ms_of(first[1]) - retention_ms)
end
return {floor, skip, redis.call('XRANGE', stream, '(' .. after, '+', 'COUNT', count)}
"""
)


def _redis_id(key: EventKey) -> str:
    return f"{key[0]}-{key[1]}"


def _event(identifier: str, fields: dict[str, str]) -> RelayEvent:
    key = parse_event_id(identifier)
    return RelayEvent(
        format_event_id(*key), fields["route"], fields["data"], fields.get("stream")
    )


def _fields(entry: StreamEntry) -> dict[str, str]:
    return {str(name): str(value) for name, value in entry.field_values.items()}


class _Collected:
    """What one batch of entries gave a read: visible events and the cursor."""

    def __init__(self, cursor: EventKey) -> None:
        self.cursor = cursor
        self.events: list[RelayEvent] = []

    def add(self, identifier: str, fields: dict[str, str], stream_id: str) -> None:
        self.cursor = parse_event_id(identifier)
        target = fields.get("stream")
        if target is None or target == stream_id:
            self.events.append(_event(identifier, fields))


class RedisRelay:
    def __init__(
        self,
        commands: Redis[str],
        waits: Redis[str],
        keys: KeyLayout,
        *,
        retention_s: float,
        max_events: int,
    ) -> None:
        self._redis = commands
        self._waits = waits
        self.keys = keys
        self._retention_ms = max(1, round(retention_s * 1000))
        self._max_events = max_events
        self._publish = commands.register_script(_PUBLISH)
        self._head = commands.register_script(_HEAD)
        self._position = commands.register_script(_POSITION)

    @maps_errors("publish an event")
    async def publish(
        self,
        session_id: str,
        route: str,
        data_json: str,
        *,
        stream_id: str | None,
        once: str | None = None,
    ) -> str | None:
        targeted = "0" if stream_id is None else "1"
        identifier: Any = await self._publish(
            keys=[
                self.keys.stream(session_id),
                self.keys.last_event(),
                self.keys.published_once(once or ""),
            ],
            args=[
                self._max_events,
                self._retention_ms,
                route,
                data_json,
                targeted,
                stream_id or "",
                "0" if once is None else "1",
            ],
        )
        if identifier is None:
            return None
        return format_event_id(*parse_event_id(str(identifier)))

    @maps_errors("find a session's position")
    async def position(self, session_id: str) -> str:
        # Every session shares the deployment's id sequence, so the last id
        # handed out anywhere is a position in every session.
        reply: Any = await self._position(keys=[self.keys.last_event()])
        return format_event_id(*parse_event_id(str(reply)))

    @maps_errors("read a session's events")
    async def read(
        self, session_id: str, after: str, *, stream_id: str, timeout_s: float
    ) -> RelayRead:
        after_key = parse_event_id(after)
        deadline = anyio.current_time() + timeout_s
        floor, skip, entries = await self._head_of(session_id, after_key)
        gap = after_key < floor
        collected = _Collected(after_key if skip is None else max(after_key, skip))
        for identifier, fields in entries:
            collected.add(identifier, fields, stream_id)

        while not collected.events:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                break
            batch = await self._wait_for_entries(
                session_id, collected.cursor, remaining
            )
            if batch is None:
                break
            for entry in batch:
                collected.add(str(entry.identifier), _fields(entry), stream_id)

        return RelayRead(collected.events, format_event_id(*collected.cursor), gap)

    async def _head_of(
        self, session_id: str, after: EventKey
    ) -> tuple[EventKey, EventKey | None, list[tuple[str, dict[str, str]]]]:
        reply: Any = await self._head(
            keys=[self.keys.stream(session_id), self.keys.last_event()],
            args=[_redis_id(after), self._retention_ms, _BATCH],
        )
        if not isinstance(reply, list) or len(reply) != 3:
            raise BusError(
                f"Redis answered {reply!r} to a relay read; expected 3 items"
            )
        floor, skip, raw_entries = reply
        entries = [
            (str(identifier), dict(zip(flat[::2], flat[1::2], strict=True)))
            for identifier, flat in raw_entries
        ]
        return parse_event_id(floor), parse_event_id(skip) if skip else None, entries

    async def _wait_for_entries(
        self, session_id: str, cursor: EventKey, timeout_s: float
    ) -> tuple[StreamEntry, ...] | None:
        # XREAD BLOCK is cancellable: coredis drops the blocked connection.
        stream = self.keys.stream(session_id)
        reply = await self._waits.xread(
            {stream: _redis_id(cursor)},
            count=_BATCH,
            block=max(1, round(timeout_s * 1000)),
        )
        if not reply:
            return None
        return next(iter(reply.values()))
