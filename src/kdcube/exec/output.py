"""What is kept of a program's output: up to a cap, streamed as it comes."""

from __future__ import annotations

from dataclasses import dataclass, field

from anyio.abc import ByteReceiveStream

from kdcube.exec.ports import OutputSink, StreamName

__all__ = ["Capture", "pump"]


@dataclass
class Capture:
    """One output stream, kept up to ``cap`` bytes; the rest is dropped and
    ``truncated`` says so."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def keep(self, chunk: bytes) -> bytes:
        """Keep what fits of ``chunk`` and return it."""
        kept = chunk[: max(self.cap - len(self.data), 0)]
        if len(kept) < len(chunk):
            self.truncated = True
        self.data += kept
        return kept

    async def feed(
        self, chunk: bytes, name: StreamName, on_output: OutputSink | None
    ) -> None:
        """Keep what fits of ``chunk`` and pass that much on to ``on_output``."""
        kept = self.keep(chunk)
        if kept and on_output is not None:
            await on_output(name, kept)


async def pump(
    stream: ByteReceiveStream | None,
    capture: Capture,
    name: StreamName,
    on_output: OutputSink | None,
) -> None:
    """Read ``stream`` to its end into ``capture``. Everything is read, kept
    or not, so the writer never stalls on a full pipe."""
    assert stream is not None, "the process was started with a pipe"
    async for chunk in stream:
        await capture.feed(chunk, name, on_output)
