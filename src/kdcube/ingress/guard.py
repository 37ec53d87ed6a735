"""The gateway's checks as the ingress applies them to each request.

Chat submissions pass the session's rate limit and then backpressure; reads
pass the rate limit only; opening a stream is capped per process. A refusal
is an ApiError (429 or 503, always with ``Retry-After``) and, for chat, also
a ``chat_service`` event on the caller's stream, so a client that only
watches its stream learns why nothing happens.

When the live config says ``enabled: false``, rate limits and backpressure
are skipped; the stream cap and the circuit breakers stay.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import structlog

from kdcube.bus import BusUnavailable, Relay, State
from kdcube.gateway import Backpressure, Breakers, CircuitOpen, GatewayBackends
from kdcube.identity import Identity
from kdcube.metrics.tallies import count_rejection
from kdcube.wire import events, sse
from kdcube.wire.errors import ApiError
from kdcube.wire.events import Route, TurnAddress
from kdcube.wire.ids import new_id

log = structlog.get_logger("kdcube.gateway")

_STREAM_CAP_RETRY_S = 5


class Guard:
    def __init__(
        self,
        backends: GatewayBackends,
        backpressure: Backpressure,
        breakers: Breakers,
        relay: Relay,
        state: State,
        *,
        tenant: str,
        project: str,
    ) -> None:
        self._backends = backends
        self._backpressure = backpressure
        self.breakers = breakers
        self._relay = relay
        self._state = state
        self._tenant = tenant
        self._project = project

    def redis(self) -> AbstractAsyncContextManager[None]:
        """Guard a request that needs the bus: refused at once while Redis
        is known to be down, counted as a failure when it turns out so."""
        return self.breakers["redis"].guard(failures=(BusUnavailable,))

    async def admit_read(self, identity: Identity, session_id: str) -> None:
        if not self._backends.board.current().enabled:
            return
        await self._rate_limit(identity, session_id, stream_id=None)

    async def admit_chat(
        self, identity: Identity, session_id: str, stream_id: str | None
    ) -> None:
        if not self._backends.board.current().enabled:
            return
        await self._rate_limit(identity, session_id, stream_id=stream_id)
        await self._backpressure_check(identity, session_id, stream_id)

    def stream_limit(self) -> int:
        return self._backends.board.current().limits.max_sse_connections_per_instance

    async def admit_stream(self, open_streams: int) -> None:
        limit = self.stream_limit()
        if open_streams >= limit:
            log.warning("gateway.stream_cap", open=open_streams, limit=limit)
            await count_rejection(self._state, "too_many_streams")
            raise ApiError(
                429,
                "too_many_streams",
                "This server holds as many streams as it may; retry shortly.",
                retry_after=_STREAM_CAP_RETRY_S,
            )

    async def _rate_limit(
        self, identity: Identity, session_id: str, *, stream_id: str | None
    ) -> None:
        limits = self._backends.board.current().rate_limits.for_user_type(
            identity.user_type.value
        )
        decision = await self._backends.rate_limiter.hit(session_id, limits)
        if decision.allowed:
            return

        reason = f"{decision.reason}_rate_limit"
        detail = (
            f"Too many requests ({decision.reason} limit of a"
            f" {identity.user_type.value} session); retry in"
            f" {decision.retry_after_s} s."
        )
        await self._refuse(
            identity, session_id, stream_id, "gateway.rate_limit", reason, detail
        )
        raise ApiError(429, "rate_limited", detail, retry_after=decision.retry_after_s)

    async def _backpressure_check(
        self, identity: Identity, session_id: str, stream_id: str | None
    ) -> None:
        admission = await self._backpressure.check(identity.user_type.value)
        if admission.admitted:
            return

        reason = admission.reason or "backpressure"
        detail = (
            f"The system is busy ({reason}: {admission.queued} turns for a capacity"
            f" of {admission.capacity}); retry in {admission.retry_after_s} s."
        )
        await self._refuse(
            identity, session_id, stream_id, "gateway.backpressure", reason, detail
        )
        raise ApiError(503, "system_busy", detail, retry_after=admission.retry_after_s)

    async def _refuse(
        self,
        identity: Identity,
        session_id: str,
        stream_id: str | None,
        kind: str,
        reason: str,
        detail: str,
    ) -> None:
        log.info(
            "gateway.refused",
            kind=kind,
            reason=reason,
            user_type=identity.user_type.value,
            session=session_id,
        )
        await count_rejection(self._state, reason)
        if stream_id is None:
            return
        address = TurnAddress(
            tenant=self._tenant,
            project=self._project,
            user_id=identity.user_id,
            user_type=identity.user_type.value,
            session_id=session_id,
            conversation_id="",
            turn_id="",
            request_id=new_id(),
        )
        notice = events.envelope(
            address, kind, data={"reason": reason, "detail": detail}
        )
        try:
            await self._relay.publish(
                session_id, Route.CHAT_SERVICE, sse.dumps(notice), stream_id=stream_id
            )
        except BusUnavailable:
            # The HTTP answer carries the refusal; the notice is a courtesy.
            log.warning("gateway.notice_lost", kind=kind, session=session_id)


def circuit_open_error(error: CircuitOpen) -> ApiError:
    return ApiError(
        503,
        "dependency_unavailable",
        f"{error.name} is failing; requests that need it are paused.",
        retry_after=error.retry_after_s,
    )
