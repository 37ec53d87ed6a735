"""Test bundle: never emits, so only the idle watchdog can end it."""

from __future__ import annotations

import anyio

from kdcube.sdk import TurnContext


async def run(ctx: TurnContext) -> str:
    await anyio.sleep_forever()
    return "never"
