"""Coder: runs the prompt's Python snippet and streams what it prints.

The snippet is the prompt's first fenced ```python block; failing that, its
only fenced block when that block names no language; failing that, the whole
prompt. It runs on the deployment's executor (``ctx.exec``, chosen by
``KDCUBE_EXEC``), which under ``kdcube run`` is a plain subprocess and not a
sandbox; where running code is off, the turn says so and ends. What the
snippet prints streams as answer deltas while it runs; the deltas add up to
the final answer, which also carries the tail of the error output and the
exit code when the snippet fails, and lists the files it wrote into ``out/``,
which are kept as the turn's artifacts (downloadable by the user).
It needs no model, so it doubles as a demo.

Config: ``timeout_s`` (default 10), ``memory_mb`` (256) and
``max_output_bytes`` (65536, per stream).

Known shortcomings: the output is fenced with four backticks while it streams,
so a printed line that starts with four backticks ends the block early. Files
in nested folders of ``out/`` are kept under their base name.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from typing import Any

from kdcube.exec import ExecError, ExecRequest, ExecResult, StreamName
from kdcube.sdk import TurnContext

# Running the snippet again after a processor crash would repeat whatever it
# did (files written, requests sent), so a crash ends the turn instead.
RERUN_SAFE = False

BLOCK = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
PYTHON = {"python", "python3", "py"}
OUTPUT_FENCE = "````"
ERROR_TAIL_LINES = 20
ERROR_TAIL_CHARS = 4000


async def run(ctx: TurnContext) -> str:
    request = make_request(ctx.prompt, ctx.config, run_id=ctx.turn_id)
    answer = Answer(ctx)
    await ctx.step("exec", status="running", title="Running the snippet")

    try:
        if ctx.exec is None:
            raise ExecError("running code is off on this server (KDCUBE_EXEC=off)")
        result = await ctx.exec.run(request, on_output=answer.on_output)
    except ExecError as error:
        # The reason names the server's settings, not secrets; it tells the
        # user why, where the turn's error says only that it failed.
        await ctx.step(
            "exec",
            status="failed",
            title="Could not run the snippet",
            data={"reason": str(error)},
        )
        raise

    await ctx.step(
        "exec",
        status="completed" if result.ok else "failed",
        title="Ran the snippet" if result.ok else "The snippet failed",
        data=summary(result),
    )
    await answer.finish(result)
    return answer.text


def make_request(prompt: str, config: Mapping[str, Any], *, run_id: str) -> ExecRequest:
    return ExecRequest(
        snippet(prompt),
        timeout_s=float(config.get("timeout_s", 10)),
        memory_mb=int(config.get("memory_mb", 256)),
        max_output_bytes=int(config.get("max_output_bytes", 65536)),
        run_id=run_id,
    )


def snippet(prompt: str) -> str:
    """The code to run out of ``prompt`` (see the module docstring)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in BLOCK.finditer(prompt)]
    for language, code in blocks:
        if language in PYTHON:
            return code
    if len(blocks) == 1 and not blocks[0][0]:
        return blocks[0][1]
    return prompt


def summary(result: ExecResult) -> dict[str, Any]:
    return {
        "exit_code": result.exit_code,
        "duration_s": round(result.duration_s, 3),
        "timed_out": result.timed_out,
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "files": sorted(result.files),
    }


class Answer:
    """The answer in the making: every piece is streamed as a delta and kept,
    so the deltas add up to the final answer."""

    def __init__(self, ctx: TurnContext) -> None:
        self._ctx = ctx
        self._pieces: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._output_open = False
        self._output_ends_line = True

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    async def on_output(self, stream: StreamName, chunk: bytes) -> None:
        if stream == "stdout":
            await self._output(self._decoder.decode(chunk))

    async def finish(self, result: ExecResult) -> None:
        await self._output(self._decoder.decode(b"", final=True))
        if self._output_open:
            await self._emit(("" if self._output_ends_line else "\n") + OUTPUT_FENCE)
        elif result.ok:
            await self._paragraph("The snippet printed nothing.")
        if result.stdout_truncated:
            await self._paragraph(f"The output was cut at {len(result.stdout)} bytes.")
        if not result.ok:
            await self._paragraph(failure(result))
        if result.files:
            await self._paragraph(files_list(result.files))

    async def _output(self, text: str) -> None:
        if not text:
            return
        if not self._output_open:
            self._output_open = True
            await self._emit(f"Output:\n\n{OUTPUT_FENCE}text\n")
        self._output_ends_line = text.endswith("\n")
        await self._emit(text)

    async def _paragraph(self, text: str) -> None:
        await self._emit(f"\n\n{text}" if self._pieces else text)

    async def _emit(self, text: str) -> None:
        self._pieces.append(text)
        await self._ctx.delta(text)


def failure(result: ExecResult) -> str:
    """Why the snippet failed, with the tail of what it wrote to stderr."""
    if result.timed_out:
        reason = (
            f"The snippet was stopped at its time limit ({result.duration_s:.1f} s)."
        )
    elif result.exit_code is not None and result.exit_code < 0:
        reason = f"The snippet was killed by signal {-result.exit_code}."
    else:
        reason = f"The snippet exited with code {result.exit_code}."
    error = tail(result.stderr.decode("utf-8", errors="replace"))
    if not error:
        return reason

    fence = fence_for(error)
    return f"{reason}\n\nError output:\n\n{fence}text\n{error}\n{fence}"


def tail(text: str) -> str:
    lines = text.rstrip("\n").splitlines()[-ERROR_TAIL_LINES:]
    return "\n".join(lines)[-ERROR_TAIL_CHARS:]


def fence_for(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def files_list(files: Mapping[str, bytes]) -> str:
    lines = [f"- `{name}` ({len(content)} bytes)" for name, content in files.items()]
    return "Files written to `out/`:\n\n" + "\n".join(lines)
