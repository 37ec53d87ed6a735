"""Running bundles written for asyncio, under Trio.

Most LLM SDKs only run on asyncio. A bundle that sets ``EVENT_LOOP =
"asyncio"`` runs as one asyncio task on a trio-asyncio loop that the
processor opens on first need and keeps until it stops. Everything the bundle
calls on its context crosses back to Trio, so the platform's side stays
native; cancelling the turn cancels the asyncio task, which unwinds as
asyncio code expects (``CancelledError`` at its current await).

On the asyncio backend there is nothing to bridge: the bundle runs directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskGroup, TaskStatus

from kdcube.sdk import BundleRun, Emitter, TurnContext
from kdcube.store.asyncio_bridge import AsyncioBridge, open_asyncio_bridge


class AsyncioBundles:
    """The asyncio loop of one processor, opened the first time a bundle needs it."""

    def __init__(self) -> None:
        self._bridge: AsyncioBridge | None = None
        self._opening = anyio.Lock()
        self._host: TaskGroup | None = None

    def host_in(self, tasks: TaskGroup) -> None:
        """Keep the loop, once opened, in ``tasks``, which outlives every turn."""
        self._host = tasks

    async def run(self, run: BundleRun, context: TurnContext) -> str | None:
        """``run(context)`` as an asyncio task."""
        if sniffio.current_async_library() != "trio":
            return await run(context)

        bridge = await self._open_bridge()
        return await bridge.run(run, _crossing_to_trio(context))

    async def _open_bridge(self) -> AsyncioBridge:
        async with self._opening:
            if self._bridge is None:
                if self._host is None:
                    raise RuntimeError("host_in() must be called before run()")
                self._bridge = await self._host.start(self._keep_loop)
        return self._bridge

    async def _keep_loop(
        self, *, task_status: TaskStatus[AsyncioBridge] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_asyncio_bridge() as bridge:
            task_status.started(bridge)
            await anyio.sleep_forever()


def _crossing_to_trio(context: TurnContext) -> TurnContext:
    return dataclasses.replace(
        context,
        emit=_TrioEmitter(context.emit),
        opener=lambda name: _trio_iterator(context.opener(name)),
        saver=lambda name, data, mime: _on_trio(context.saver, name, data, mime),
    )


def _trio_iterator(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    from trio_asyncio import trio_as_aio  # type: ignore[import-untyped]

    wrapped: AsyncIterator[bytes] = trio_as_aio(chunks, loop=asyncio.get_running_loop())
    return wrapped


class _TrioEmitter:
    """The turn's emitter as seen from asyncio: each call runs on Trio."""

    def __init__(self, emit: Emitter) -> None:
        self._emit = emit

    async def delta(self, text: str, *, marker: str = "answer") -> None:
        await _on_trio(self._emit.delta, text, marker=marker)

    async def step(
        self,
        step: str,
        *,
        status: str = "running",
        title: str | None = None,
        data: Mapping[str, Any] | None = None,
        agent: str | None = None,
    ) -> None:
        await _on_trio(
            self._emit.step, step, status=status, title=title, data=data, agent=agent
        )

    async def followups(self, suggestions: Sequence[str]) -> None:
        await _on_trio(self._emit.followups, suggestions)


async def _on_trio(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from trio_asyncio import trio_as_aio

    # The loop is named: trio-asyncio finds it by a context variable of the
    # Trio task that opened it, which the turn's task is not.
    return await trio_as_aio(fn, loop=asyncio.get_running_loop())(*args, **kwargs)
