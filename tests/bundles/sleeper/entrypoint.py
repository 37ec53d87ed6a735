"""Test bundle: one delta, then waits until cancelled."""

from __future__ import annotations

import anyio

from kdcube.sdk import TurnContext


async def run(ctx: TurnContext) -> str:
    await ctx.step("thinking", title="Waiting to be cancelled")
    await ctx.delta("first")
    await anyio.sleep_forever()
    return "never"
