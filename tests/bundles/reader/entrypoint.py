"""Reads every attachment of its turn and answers with each one's digest.

Lets the tests check that a bundle sees exactly the bytes the user sent.
"""

from __future__ import annotations

import hashlib

from kdcube.sdk import TurnContext


async def run(ctx: TurnContext) -> str:
    lines = []
    for attachment in ctx.attachments:
        digest = hashlib.sha256()
        size = 0
        async for chunk in ctx.open_attachment(attachment.name):
            digest.update(chunk)
            size += len(chunk)
        lines.append(f"{attachment.name} {attachment.mime} {size} {digest.hexdigest()}")
    return "\n".join(lines)
