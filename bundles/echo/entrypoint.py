"""Echo: streams the prompt back in pieces, then answers with the whole prompt.

Config: ``chunks`` (how many deltas, default 4) and ``delay_s`` (pause before
each delta, default 0). Useful for trying the platform and for load tests.
"""

from __future__ import annotations

import anyio

from kdcube.sdk import TurnContext

# Echoing again after a processor crash repeats no side effect.
RERUN_SAFE = True


async def run(ctx: TurnContext) -> str:
    chunks = max(1, int(ctx.config.get("chunks", 4)))
    delay_s = max(0.0, float(ctx.config.get("delay_s", 0)))
    for piece in split(ctx.prompt, chunks):
        if delay_s:
            await anyio.sleep(delay_s)
        await ctx.delta(piece)
    return ctx.prompt


def split(text: str, parts: int) -> list[str]:
    """``parts`` pieces of nearly equal length that join back to ``text``."""
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces
