"""Test bundle: everything the web UI shows, in one turn.

Two steps (one updated from running to completed), an answer in Markdown
streamed a few words at a time, and follow-up suggestions. ``config.delay_s``
(default 0.05) paces the deltas so the answer is seen arriving.
"""

from __future__ import annotations

import anyio

from kdcube.sdk import TurnContext

ANSWER = """### Here is what I found

You asked: **{prompt}**. A few things worth knowing:

- answers stream in *as they are written*;
- code stays code: `kdcube run` starts everything;
- links work for [http and https](https://example.org/docs) only.

```python
print("hello from a code block")
```

That is all for now."""


async def run(ctx: TurnContext) -> str:
    delay_s = float(ctx.config.get("delay_s", 0.05))
    await ctx.step("search", title="Looking through the notes")
    await anyio.sleep(delay_s)
    await ctx.step("search", status="completed")
    await ctx.step("draft", title="Writing the answer")
    answer = ANSWER.format(prompt=ctx.prompt)
    for piece in _pieces(answer, 24):
        await ctx.delta(piece)
        await anyio.sleep(delay_s)
    await ctx.step("draft", status="completed")
    await ctx.followups(["Tell me more", "Show another example"])
    return answer


def _pieces(text: str, parts: int) -> list[str]:
    size = -(-len(text) // parts)
    return [text[i : i + size] for i in range(0, len(text), size)]
