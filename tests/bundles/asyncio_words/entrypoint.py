"""Test bundle written for asyncio: words pass through an asyncio.Queue.

A prompt containing the word ``wait`` then waits on asyncio until cancelled,
and writes ``config.marker`` when the cancellation reaches it, so a test can
tell that the turn's cancel arrived as asyncio's CancelledError.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from kdcube.sdk import TurnContext

EVENT_LOOP = "asyncio"


async def run(ctx: TurnContext) -> str:
    words: asyncio.Queue[str | None] = asyncio.Queue()
    producer = asyncio.create_task(_produce(ctx.prompt, words))
    said = []
    while (word := await words.get()) is not None:
        await ctx.delta(word + " ")
        said.append(word)
    await producer

    if "wait" in said:
        await _wait_for_cancel(Path(str(ctx.config["marker"])))
    sizes = [len(await ctx.read_attachment(a.name)) for a in ctx.attachments]
    return " ".join(said) + (f" {sizes}" if sizes else "")


async def _produce(prompt: str, words: asyncio.Queue[str | None]) -> None:
    for word in prompt.split():
        await asyncio.sleep(0)
        await words.put(word)
    await words.put(None)


async def _wait_for_cancel(marker: Path) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        _leave_mark(marker)
        raise


def _leave_mark(marker: Path) -> None:
    marker.write_text("cancelled")
