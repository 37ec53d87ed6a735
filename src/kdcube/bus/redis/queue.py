"""Redis turn queue: a Lua-scripted lease queue with per-conversation order.

Why not Redis Streams consumer groups: a group hands the next entry to any
consumer, but a turn may only be handed out when no other turn of its
conversation is claimed, and conversations must take turns. That check and
the take have to be one atomic step over several structures, which a group
cannot express, so every step is a Lua script over lists, sorted sets and
hashes (see ``queue_scripts`` for the data layout). Expiry, fencing tokens
and redelivery follow the in-memory queue exactly, on the server's clock.

How a claim waits: in rounds of one pipeline each, the claim script and a
BLPOP on the claim's own wake list. The script either takes a turn and puts
it on that list, or registers the claim as a waiter for the BLPOP's timeout
(at most ``MAX_WAIT_S``, less when a lease ends sooner). Scripts that make a
turn claimable (enqueue, ack, expiry) claim it on the oldest waiter's behalf
and push it onto the waiter's list, which ends its BLPOP. So once a round
is sent, the reply that carries a turn leaves Redis as soon as the turn is
claimable, with no further round trip. A script that creates a lease ending
before some waiter would wake nudges that waiter, so expired turns are
redelivered when their lease ends, not a whole wait later. A cancelled or
failed claim runs a shielded withdraw script that unregisters it and gives
back a turn claimed for it that it never received, so a cancelled claim
takes nothing.

Known shortcoming: Redis cannot tell a waiter whose process died from a live
one until its registration runs out (``MAX_WAIT_S`` plus a second). A turn
handed to such a waiter meanwhile waits for its lease to end, then goes to
the next claim with one more delivery.

Each blocked claim holds one connection of the waits pool for up to
``MAX_WAIT_S``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from coredis import Redis
from coredis.commands.script import Script
from coredis.exceptions import NoScriptError, RedisError
from coredis.patterns.pubsub import PubSub

from kdcube.bus.ports import (
    BusError,
    CancelOutcome,
    CancelResult,
    Claim,
    LeaseLost,
    QueueStats,
    TurnJob,
)
from kdcube.bus.redis import queue_scripts as lua
from kdcube.bus.redis.errors import maps_errors, translated
from kdcube.bus.redis.keys import KeyLayout

log = structlog.get_logger("kdcube.bus")

MAX_WAIT_S = 2.0
"""Longest single BLPOP; a claim re-registers after it, so a waiter whose
process died is forgotten soon after."""
_GRACE_MS = 1_000
"""How long a registration outlives its BLPOP, for the round trip back."""
_WITHDRAW_TIMEOUT_S = 5.0
_NUDGE = "nudge"
"""Pushed to a waiter that must wait less: a lease now expires before it wakes."""
_GONE = "gone"
"""What the wake list of a withdrawn claim holds."""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _reply_list(reply: Any, action: str) -> list[Any]:
    if not isinstance(reply, list) or not reply:
        raise BusError(f"Redis answered {reply!r} to {action}; expected a list")
    return reply


def _claim_from(payload: str) -> Claim:
    turn_id, job_json, consumer, token, deliveries, started = json.loads(payload)
    job = TurnJob.from_dict(json.loads(job_json))
    if job.turn_id != turn_id:
        raise BusError(f"claim payload for {turn_id!r} holds job {job.turn_id!r}")
    return Claim(job, consumer, int(token), int(deliveries), bool(started))


class RedisQueue:
    def __init__(
        self, commands: Redis[str], waits: Redis[str], keys: KeyLayout
    ) -> None:
        self._redis = commands
        self._waits = waits
        self._keys = keys
        self._declared = keys.queue.all()

        def script(body: str) -> Script[str]:
            return commands.register_script(lua.PRELUDE + body)

        self._enqueue = script(lua.ENQUEUE)
        self._claim = script(lua.CLAIM)
        self._withdraw = script(lua.WITHDRAW)
        self._renew = script(lua.RENEW)
        self._mark_started = script(lua.MARK_STARTED)
        self._cancel_requested = script(lua.CANCEL_REQUESTED)
        self._ack = script(lua.ACK)
        self._cancel = script(lua.CANCEL)
        self._take_waiting = script(lua.TAKE_WAITING)
        self._stats = script(lua.STATS)

    @maps_errors("load the queue's scripts")
    async def prepare(self) -> None:
        """Load the claim script, which runs by its SHA inside a pipeline
        where coredis does not load it on demand."""
        await self._redis.script_load(self._claim.script)

    @maps_errors("enqueue a turn")
    async def enqueue(self, job: TurnJob, *, first: bool = False) -> None:
        if "\x01" in job.conversation_id:
            raise ValueError(
                f"conversation id must not contain \\x01, got {job.conversation_id!r}"
            )
        payload = json.dumps(job.to_dict())
        flag = "1" if first else "0"
        await self._run(self._enqueue, job.turn_id, job.conversation_id, payload, flag)

    @maps_errors("claim a turn")
    async def claim(self, consumer: str, *, lease_s: float) -> Claim:
        # Checkpoint before any command leaves: a claim cancelled before it
        # runs sends nothing and so takes nothing.
        await anyio.lowlevel.checkpoint()
        waiter = uuid.uuid4().hex
        try:
            return await self._claim_as(waiter, consumer, _ms(lease_s))
        except BaseException:
            await self._give_back(waiter)
            raise

    @maps_errors("renew a lease")
    async def renew(self, claim: Claim, *, lease_s: float) -> None:
        held = await self._run(
            self._renew, claim.job.turn_id, str(claim.token), _ms(lease_s)
        )
        _require(held, claim)

    @maps_errors("mark a turn started")
    async def mark_started(self, claim: Claim) -> None:
        held = await self._run(self._mark_started, claim.job.turn_id, str(claim.token))
        _require(held, claim)

    @maps_errors("ack a turn")
    async def ack(self, claim: Claim) -> None:
        held = await self._run(self._ack, claim.job.turn_id, str(claim.token))
        _require(held, claim)

    @maps_errors("cancel a turn")
    async def cancel(self, turn_id: str) -> CancelResult:
        channel = self._keys.cancel_channel()
        reply = _reply_list(await self._run(self._cancel, turn_id, channel), "cancel")
        outcome = CancelOutcome(reply[0])
        if outcome is CancelOutcome.DROPPED:
            return CancelResult(outcome, TurnJob.from_dict(json.loads(reply[1])))
        return CancelResult(outcome)

    @maps_errors("check for a cancel")
    async def cancel_requested(self, claim: Claim) -> bool:
        state = await self._run(
            self._cancel_requested, claim.job.turn_id, str(claim.token)
        )
        _require(state, claim)
        return bool(state == 2)

    @asynccontextmanager
    async def watch_cancels(self) -> AsyncIterator[AsyncIterator[str]]:
        # coredis resubscribes after a lost connection, backing off up to 16 s;
        # a cancel published meanwhile is missed, which is why a processor also
        # asks cancel_requested before it starts a turn.
        async with AsyncExitStack() as stack:
            async with translated("subscribe to cancels"):
                pubsub = await stack.enter_async_context(
                    self._waits.pubsub(
                        channels=[self._keys.cancel_channel()],
                        ignore_subscribe_messages=True,
                    )
                )
            yield _CancelFeed(pubsub)

    @maps_errors("take the waiting turns")
    async def take_waiting(self) -> list[TurnJob]:
        reply = await self._run(self._take_waiting)
        if not isinstance(reply, list):
            raise BusError(f"Redis answered {reply!r} to take_waiting; expected a list")
        return [TurnJob.from_dict(json.loads(job)) for job in reply]

    @maps_errors("count turns")
    async def stats(self) -> QueueStats:
        ready, inflight, age_ms = _reply_list(await self._run(self._stats), "stats")
        return QueueStats(
            ready=int(ready), inflight=int(inflight), oldest_wait_s=int(age_ms) / 1000
        )

    async def _claim_as(self, waiter: str, consumer: str, lease_ms: int) -> Claim:
        planned_ms = _ms(MAX_WAIT_S)
        while True:
            planned_ms, popped = await self._claim_round(
                waiter, consumer, lease_ms, planned_ms
            )
            if popped == _GONE:
                raise BusError(f"claim {waiter} was withdrawn while it still ran")
            if popped is not None and popped != _NUDGE:
                return _claim_from(popped)

    async def _claim_round(
        self, waiter: str, consumer: str, lease_ms: int, planned_ms: int
    ) -> tuple[int, str | None]:
        """The claim script and the BLPOP it prepares, sent together; returns
        the wait to plan next and what the BLPOP popped, if anything."""
        args: list[str | int] = [self._keys.wake_prefix(), waiter, consumer]
        args += [lease_ms, planned_ms, _ms(MAX_WAIT_S), _GRACE_MS]
        wake = self._keys.wake(waiter)
        pipe = self._waits.pipeline(transaction=False, raise_on_error=False)
        async with pipe:
            planned = pipe.evalsha(self._claim.sha, keys=self._declared, args=args)
            popped = pipe.blpop([wake], timeout=planned_ms / 1000)
        try:
            reply: Any = await planned
        except NoScriptError:
            # Redis lost its script cache (a restart or SCRIPT FLUSH): load the
            # script again. This round registered nothing, so its BLPOP only
            # timed out, which costs one planned wait once per claim.
            await self._redis.script_load(self._claim.script)
            return planned_ms, None
        woken: Any = await popped
        return int(reply) or planned_ms, None if woken is None else str(woken[1])

    async def _give_back(self, waiter: str) -> None:
        # Shielded: the claim was probably cancelled, and the server may hold a
        # registration or a turn claimed for it that nobody else would release
        # before its lease ran out.
        with anyio.move_on_after(_WITHDRAW_TIMEOUT_S, shield=True):
            try:
                await self._run(self._withdraw, waiter)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("queue.withdraw_failed", waiter=waiter, error=str(exc))

    async def _run(self, script: Script[str], *args: str | int) -> Any:
        return await script(keys=self._declared, args=[self._keys.wake_prefix(), *args])


def _require(state: Any, claim: Claim) -> None:
    if state == 0:
        raise LeaseLost(
            f"turn {claim.job.turn_id} is no longer held by token {claim.token}"
        )


class _CancelFeed:
    """Turn ids from the cancel channel, for as long as the subscription lasts."""

    def __init__(self, pubsub: PubSub[str]) -> None:
        self._pubsub = pubsub

    def __aiter__(self) -> _CancelFeed:
        return self

    async def __anext__(self) -> str:
        while True:
            async with translated("receive a cancel"):
                message = await self._pubsub.get_message()
            if message is not None and message["type"] == "message":
                return str(message["data"])
