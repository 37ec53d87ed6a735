"""Turn events on their way to the relay, each wrapped in the envelope."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from kdcube.bus import BusUnavailable, Relay
from kdcube.sdk import Emitter
from kdcube.wire import events
from kdcube.wire.events import Route, TurnAddress
from kdcube.wire.sse import dumps

_PUBLISH_PATIENCE_S = 10.0
_FIRST_RETRY_S = 0.05
_MAX_RETRY_S = 1.0


class TurnEmitter:
    """Publishes one turn's events to its session, aimed at its stream.

    ``last_activity`` (the event loop's clock) feeds the idle watchdog.
    """

    def __init__(
        self, relay: Relay, address: TurnAddress, stream_id: str | None
    ) -> None:
        self._relay = relay
        self._address = address
        self._stream_id = stream_id
        self._delta_index: dict[str, int] = {}
        self.last_activity = anyio.current_time()

    async def publish(
        self, route: Route, body: dict[str, Any], *, once: str | None = None
    ) -> bool:
        """Publish, riding out a short relay outage (a Redis failover or
        restart) so that the turn's events are delayed rather than lost.

        False when ``once`` names an event that was published before.
        """
        self.last_activity = anyio.current_time()
        data = dumps(body)
        delay = _FIRST_RETRY_S
        with anyio.fail_after(_PUBLISH_PATIENCE_S):
            while True:
                try:
                    published = await self._relay.publish(
                        self._address.session_id,
                        route,
                        data,
                        stream_id=self._stream_id,
                        once=once,
                    )
                    return published is not None
                except BusUnavailable:
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _MAX_RETRY_S)

    async def status(
        self, state: str, *, completion: str | None = None, once: str | None = None
    ) -> None:
        body = events.conv_status(
            self._address,
            state,
            current_turn_id=self._address.turn_id,
            completion=completion,
        )
        await self.publish(Route.CONV_STATUS, body, once=once)

    async def start(self, bundle_id: str) -> None:
        body = events.envelope(
            self._address,
            "chat.start",
            data={"bundle_id": bundle_id},
            event={"status": "started"},
        )
        await self.publish(Route.CHAT_START, body)

    async def service(
        self, type_: str, detail: str, *, once: str | None = None
    ) -> bool:
        """A platform notice about this turn, on the ``chat_service`` route."""
        body = events.envelope(self._address, type_, data={"detail": detail})
        return await self.publish(Route.CHAT_SERVICE, body, once=once)

    async def complete(self, final_answer: str, *, once: str | None = None) -> None:
        body = events.envelope(
            self._address,
            "chat.complete",
            data={"final_answer": final_answer},
            event={"status": "completed"},
        )
        await self.publish(Route.CHAT_COMPLETE, body, once=once)

    async def error(
        self,
        error_type: str,
        message: str,
        reason: str | None,
        *,
        once: str | None = None,
    ) -> None:
        body = events.chat_error(self._address, error_type, message, reason=reason)
        await self.publish(Route.CHAT_ERROR, body, once=once)

    async def delta(self, text: str, *, marker: str = "answer") -> None:
        index = self._delta_index.get(marker, 0)
        self._delta_index[marker] = index + 1
        body = events.envelope(
            self._address,
            "chat.delta",
            delta={"text": text, "index": index, "marker": marker, "completed": False},
        )
        await self.publish(Route.CHAT_DELTA, body)

    async def step(
        self,
        step: str,
        *,
        status: str = "running",
        title: str | None = None,
        data: Mapping[str, Any] | None = None,
        agent: str | None = None,
    ) -> None:
        event: dict[str, Any] = {"step": step, "status": status}
        if title is not None:
            event["title"] = title
        if agent is not None:
            event["agent"] = agent
        body = events.envelope(
            self._address, "chat.step", data=dict(data or {}), event=event
        )
        await self.publish(Route.CHAT_STEP, body)

    async def followups(self, suggestions: Sequence[str]) -> None:
        body = events.envelope(
            self._address,
            "chat.followups",
            data={"followups": list(suggestions)},
            event={"step": "followups", "status": "completed"},
        )
        await self.publish(Route.CHAT_STEP, body)


class TurnEnded(RuntimeError):
    """The bundle emitted after its turn had ended (it ignored a cancel)."""


class SealedEmitter:
    """The emitter as a bundle sees it: closed for good once its turn ends.

    A bundle that ignored its cancellation and talks on after the turn's
    terminal event must not reach the stream; it gets TurnEnded instead, which
    also helps it stop.
    """

    def __init__(self, emitter: Emitter) -> None:
        self._emitter = emitter
        self._sealed = False

    def seal(self) -> None:
        self._sealed = True

    def _check(self) -> None:
        if self._sealed:
            raise TurnEnded("this turn has ended; nothing more reaches the user")

    async def delta(self, text: str, *, marker: str = "answer") -> None:
        self._check()
        await self._emitter.delta(text, marker=marker)

    async def step(
        self,
        step: str,
        *,
        status: str = "running",
        title: str | None = None,
        data: Mapping[str, Any] | None = None,
        agent: str | None = None,
    ) -> None:
        self._check()
        await self._emitter.step(
            step, status=status, title=title, data=data, agent=agent
        )

    async def followups(self, suggestions: Sequence[str]) -> None:
        self._check()
        await self._emitter.followups(suggestions)
