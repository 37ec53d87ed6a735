"""Test bundle: fails after one delta, with a message that must not leak."""

from __future__ import annotations

from kdcube.sdk import TurnContext


async def run(ctx: TurnContext) -> str:
    await ctx.delta("partial")
    raise RuntimeError("secret internal detail")
