"""The queue's Lua scripts: every step that reads and then writes runs as one.

Each script is the shared prelude plus a body. All of them declare the same
twelve keys (``QueueKeys.all()``, same order) and take the wake-list prefix as
ARGV[1]. The per-waiter wake lists are the only keys built inside a script;
they carry the deployment's hash tag, so they hash to the declared keys' slot
and Redis Cluster runs the scripts (it refuses only cross-slot access).

Times come from the server's TIME, so leases do not depend on the clocks of
the machines that claim, and TIME before writes is legal because Redis 7
replicates scripts by their effects.

Turn records (``meta``) are small cjson objects: ``c`` conversation, ``d``
deliveries, ``s`` started, ``m`` the turn's member in ``waiting`` while it
waits, and while it is claimed ``t`` fencing token (a string, so cjson's 14
significant digits never round it), ``k`` consumer, ``w`` waiter and ``x``
cancel requested. The job itself stays an opaque JSON string that Lua never
decodes.

A waiter's wake list holds what a blocked claim must hear: a claim made on
its behalf (a JSON array), ``nudge`` (a lease now ends before the waiter would
wake, so wait again for less) or ``gone`` (the claim withdrew; a claim script
of it still in flight must take nothing).
"""

from __future__ import annotations

PRELUDE = """
local JOBS, META, WAITING, READY, CLAIMED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local EXPIRY, HANDED, WAITERS, WAITER, WAKEUPS = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local COUNTERS, SINCE = KEYS[11], KEYS[12]
local WAKE = ARGV[1]
-- A wake list outlives a waiter that died or withdrew by at most this long.
local BOX_MS = 60000
local SEP = '\\1'
-- Ranks count down from here for turns put first and up for the others, so
-- one lexicographic order holds both; 16 digits keep members fixed-width.
local MIDDLE = 1000000000000000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load(turn)
  local raw = redis.call('HGET', META, turn)
  if raw then return cjson.decode(raw) end
  return nil
end

local function save(turn, meta)
  redis.call('HSET', META, turn, cjson.encode(meta))
end

-- Members of one conversation sort together: SEP sorts below every character
-- a conversation id may hold, and '\\2' bounds the range from above.
local function first_waiting(conv)
  return redis.call('ZRANGEBYLEX', WAITING, '[' .. conv .. SEP, '(' .. conv .. '\\2',
    'LIMIT', 0, 1)[1]
end

local function waiting_count(conv)
  return redis.call('ZLEXCOUNT', WAITING, '[' .. conv .. SEP, '(' .. conv .. '\\2')
end

local function turn_of(member)
  local first = string.find(member, SEP, 1, true)
  local second = string.find(member, SEP, first + 1, true)
  return string.sub(member, second + 1)
end

local function put_waiting(turn, meta, front)
  local n = redis.call('HINCRBY', COUNTERS, 'rank', 1)
  local rank = MIDDLE + n
  if front then rank = MIDDLE - n end
  meta.m = meta.c .. SEP .. string.format('%016d', rank) .. SEP .. turn
  meta.t, meta.k, meta.w, meta.x = nil, nil, nil, nil
  save(turn, meta)
  redis.call('ZADD', WAITING, 0, meta.m)
  redis.call('ZADD', SINCE, now_ms(), turn)
end

local function end_lease(turn, meta)
  redis.call('ZREM', EXPIRY, turn)
  redis.call('HDEL', CLAIMED, meta.c)
  if meta.w and redis.call('HGET', HANDED, meta.w) == turn then
    redis.call('HDEL', HANDED, meta.w)
  end
end

-- A lapsed turn goes back to the head of its conversation, and the
-- conversation to the head of the line, keeping deliveries and started.
local function requeue_front(turn, meta)
  end_lease(turn, meta)
  put_waiting(turn, meta, true)
  redis.call('LPUSH', READY, meta.c)
end

local function expire_leases(now)
  for _, turn in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now)) do
    requeue_front(turn, load(turn))
  end
end

-- Wake every waiter that would sleep past ``at``, so that one is up to
-- redeliver the turn if this lease runs out. Rare in a steady flow: a new
-- lease of the usual length expires after the ones already there.
local function watch_expiry(at, now)
  for _, waiter in ipairs(redis.call('ZRANGEBYSCORE', WAKEUPS, string.format('(%d', at), '+inf')) do
    local box = WAKE .. waiter
    redis.call('RPUSH', box, 'nudge')
    redis.call('PEXPIRE', box, BOX_MS)
    redis.call('ZADD', WAKEUPS, now, waiter)
  end
end

local function take(consumer, lease_ms, now, waiter)
  while true do
    local conv = redis.call('LPOP', READY)
    if not conv then return nil end
    local member = first_waiting(conv)
    if member and redis.call('HEXISTS', CLAIMED, conv) == 0 then
      local turn = turn_of(member)
      local meta = load(turn)
      redis.call('ZREM', WAITING, member)
      redis.call('ZREM', SINCE, turn)
      meta.m = nil
      meta.d = meta.d + 1
      meta.t = string.format('%d', redis.call('HINCRBY', COUNTERS, 'token', 1))
      meta.k, meta.w, meta.x = consumer, waiter, false
      save(turn, meta)
      redis.call('HSET', CLAIMED, conv, turn)
      redis.call('ZADD', EXPIRY, now + lease_ms, turn)
      watch_expiry(now + lease_ms, now)
      redis.call('HSET', HANDED, waiter, turn)
      local started = 0
      if meta.s then started = 1 end
      return cjson.encode({turn, redis.call('HGET', JOBS, turn), consumer, meta.t,
        meta.d, started})
    end
  end
end

local function unregister(waiter)
  redis.call('ZREM', WAKEUPS, waiter)
  if redis.call('HDEL', WAITER, waiter) == 1 then
    redis.call('LREM', WAITERS, 1, waiter)
  end
end

local function register(waiter, consumer, lease_ms, wake_at, deadline)
  local info = cjson.encode({k = consumer, l = lease_ms, e = deadline})
  redis.call('ZADD', WAKEUPS, wake_at, waiter)
  if redis.call('HSET', WAITER, waiter, info) == 1 then
    redis.call('RPUSH', WAITERS, waiter)
  end
end

-- The next claim handed to the waiter, past nudges; 'gone' once withdrawn.
local function next_handed(box)
  local handed = redis.call('LPOP', box)
  while handed == 'nudge' do handed = redis.call('LPOP', box) end
  return handed
end

-- Hand ready turns to blocked claims, oldest waiter first, through each
-- waiter's wake list. A waiter whose registration ran out is dropped: its
-- claim stopped waiting or its process died.
local function dispatch(now)
  while redis.call('LLEN', READY) > 0 do
    local waiter = redis.call('LPOP', WAITERS)
    if not waiter then return end
    local raw = redis.call('HGET', WAITER, waiter)
    local wake_at = redis.call('ZSCORE', WAKEUPS, waiter)
    redis.call('HDEL', WAITER, waiter)
    redis.call('ZREM', WAKEUPS, waiter)
    local info = raw and cjson.decode(raw)
    if info and info.e > now then
      local claim = take(info.k, info.l, now, waiter)
      if not claim then
        redis.call('LPUSH', WAITERS, waiter)
        redis.call('HSET', WAITER, waiter, raw)
        redis.call('ZADD', WAKEUPS, wake_at, waiter)
        return
      end
      local box = WAKE .. waiter
      redis.call('RPUSH', box, claim)
      redis.call('PEXPIRE', box, info.l)
    end
  end
end

local function settle(now)
  expire_leases(now)
  dispatch(now)
end

-- The turn's record if ``token`` still holds its lease, else nil.
local function held(turn, token)
  local meta = load(turn)
  if meta and meta.t == token then return meta end
  return nil
end
"""

ENQUEUE = """
local turn, conv, job, first = ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local now = now_ms()
-- Enqueue is idempotent per turn id, so a producer may retry after a timeout.
if redis.call('HEXISTS', META, turn) == 0 then
  redis.call('HSET', JOBS, turn, job)
  put_waiting(turn, {c = conv, d = 0, s = false}, first)
  if redis.call('HEXISTS', CLAIMED, conv) == 0 and waiting_count(conv) == 1 then
    redis.call('RPUSH', READY, conv)
  end
end
settle(now)
return 1
"""

# Sent in one pipeline with ``BLPOP <wake list> <planned wait>``: whatever this
# script leaves in the wake list, that BLPOP returns. Returns the wait the
# next round should plan, or 0 when the wake list already holds the answer.
CLAIM = """
local waiter, consumer, lease_ms = ARGV[2], ARGV[3], tonumber(ARGV[4])
local planned_ms, max_wait_ms, grace_ms = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
settle(now)
local box = WAKE .. waiter
local handed = next_handed(box)
if handed == 'gone' then
  -- Withdrawn while this round was in flight: take nothing, end the BLPOP.
  redis.call('RPUSH', box, 'gone')
  return 0
end
-- A handoff that arrived between two rounds counts while its lease lasts.
if handed and redis.call('HEXISTS', HANDED, waiter) == 1 then
  redis.call('LPUSH', box, handed)
  return 0
end
unregister(waiter)
local claim = take(consumer, lease_ms, now, waiter)
if claim then
  redis.call('RPUSH', box, claim)
  redis.call('PEXPIRE', box, lease_ms)
  return 0
end
-- Wake up no later than the next lease expiry, to redeliver its turn.
local wait = max_wait_ms
local next = redis.call('ZRANGE', EXPIRY, 0, 0, 'WITHSCORES')[2]
if next then wait = math.min(wait, tonumber(next) - now) end
wait = math.max(wait, 1)
if wait < planned_ms then
  -- The planned BLPOP would sleep past that expiry: end it at once and let
  -- the next round plan the shorter wait.
  redis.call('RPUSH', box, 'nudge')
  redis.call('PEXPIRE', box, BOX_MS)
  return wait
end
register(waiter, consumer, lease_ms, now + planned_ms, now + planned_ms + grace_ms)
return wait
"""

WITHDRAW = """
local waiter = ARGV[2]
local now = now_ms()
unregister(waiter)
local box = WAKE .. waiter
redis.call('DEL', box)
redis.call('RPUSH', box, 'gone')
redis.call('PEXPIRE', box, BOX_MS)
-- Undo a claim made for this waiter that its caller never received.
local turn = redis.call('HGET', HANDED, waiter)
if turn then
  local meta = load(turn)
  meta.d = meta.d - 1
  requeue_front(turn, meta)
end
settle(now)
if turn then return 1 end
return 0
"""

RENEW = """
local turn, token, lease_ms = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
settle(now)
if not held(turn, token) then return 0 end
redis.call('ZADD', EXPIRY, now + lease_ms, turn)
watch_expiry(now + lease_ms, now)
return 1
"""

MARK_STARTED = """
local turn, token = ARGV[2], ARGV[3]
settle(now_ms())
local meta = held(turn, token)
if not meta then return 0 end
meta.s = true
save(turn, meta)
return 1
"""

CANCEL_REQUESTED = """
local turn, token = ARGV[2], ARGV[3]
settle(now_ms())
local meta = held(turn, token)
if not meta then return 0 end
if meta.x then return 2 end
return 1
"""

ACK = """
local turn, token = ARGV[2], ARGV[3]
local now = now_ms()
settle(now)
local meta = held(turn, token)
if not meta then return 0 end
end_lease(turn, meta)
redis.call('HDEL', META, turn)
redis.call('HDEL', JOBS, turn)
-- Behind every conversation already waiting: fairness between users.
if first_waiting(meta.c) then redis.call('RPUSH', READY, meta.c) end
dispatch(now)
return 1
"""

CANCEL = """
local turn, channel = ARGV[2], ARGV[3]
settle(now_ms())
local meta = load(turn)
if not meta then return {'not_found'} end
if meta.t then
  meta.x = true
  save(turn, meta)
  redis.call('PUBLISH', channel, turn)
  return {'signalled'}
end
local job = redis.call('HGET', JOBS, turn)
redis.call('ZREM', WAITING, meta.m)
redis.call('ZREM', SINCE, turn)
redis.call('HDEL', META, turn)
redis.call('HDEL', JOBS, turn)
-- An emptied conversation leaves the line, or a later turn would inherit its place.
if redis.call('HEXISTS', CLAIMED, meta.c) == 0 and not first_waiting(meta.c) then
  redis.call('LREM', READY, 0, meta.c)
end
return {'dropped', job}
"""

TAKE_WAITING = """
local jobs = {}
for _, member in ipairs(redis.call('ZRANGE', WAITING, 0, -1)) do
  local turn = turn_of(member)
  jobs[#jobs + 1] = redis.call('HGET', JOBS, turn)
  redis.call('HDEL', META, turn)
  redis.call('HDEL', JOBS, turn)
end
redis.call('DEL', WAITING, READY, SINCE)
return jobs
"""

STATS = """
local oldest = redis.call('ZRANGE', SINCE, 0, 0, 'WITHSCORES')[2]
local age_ms = 0
if oldest then age_ms = math.max(0, now_ms() - tonumber(oldest)) end
return {redis.call('ZCARD', WAITING), redis.call('ZCARD', EXPIRY), age_ms}
"""
