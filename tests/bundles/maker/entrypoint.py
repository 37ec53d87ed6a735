"""Test bundle: stores its prompt as a Markdown artifact and answers with
what it knows of the conversation so far."""

from __future__ import annotations

from kdcube.sdk import TurnContext


async def run(ctx: TurnContext) -> str:
    stored = await ctx.artifact(
        "notes/../report.md", f"# {ctx.prompt}\n", mime="text/markdown"
    )
    earlier = [turn.answer for turn in ctx.history]
    return f"{stored.name} {stored.size} after {earlier}"
