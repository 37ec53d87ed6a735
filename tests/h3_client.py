"""A small HTTP/3 client for the tests, on aioquic's asyncio API.

aioquic's client runs on asyncio only, so each request runs its own asyncio
loop in a worker thread (``h3_request``), whatever loop the test runs on.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

_TIMEOUT_S = 10.0


@dataclass
class H3Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class _Exchange:
    done: asyncio.Event = field(default_factory=asyncio.Event)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    stop_after: int | None = None


class _H3Client(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._http = H3Connection(self._quic)
        self._exchanges: dict[int, _Exchange] = {}

    async def request(
        self,
        authority: str,
        path: str,
        headers: dict[str, str],
        stop_after: int | None,
        timeout_s: float,
    ) -> _Exchange:
        stream_id = self._quic.get_next_available_stream_id()
        exchange = _Exchange(stop_after=stop_after)
        self._exchanges[stream_id] = exchange
        request_headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ]
        self._http.send_headers(stream_id, request_headers, end_stream=True)
        self.transmit()
        await asyncio.wait_for(exchange.done.wait(), timeout_s)
        return exchange

    def quic_event_received(self, event: QuicEvent) -> None:
        for http_event in self._http.handle_event(event):
            self._on_http(http_event)

    def _on_http(self, event: H3Event) -> None:
        exchange = self._exchanges.get(getattr(event, "stream_id", -1))
        if exchange is None:
            return
        if isinstance(event, HeadersReceived):
            exchange.headers.update((k.decode(), v.decode()) for k, v in event.headers)
        elif isinstance(event, DataReceived):
            exchange.body += event.data
        finished = getattr(event, "stream_ended", False)
        enough = (
            exchange.stop_after is not None
            and len(exchange.body) >= exchange.stop_after
        )
        if finished or enough:
            exchange.done.set()


async def _request(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    cafile: Path,
    stop_after: int | None,
    fail_midway: bool,
    timeout_s: float,
) -> H3Response:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    configuration.load_verify_locations(str(cafile))
    configuration.verify_mode = ssl.CERT_REQUIRED
    async with connect(
        host, port, configuration=configuration, create_protocol=_H3Client
    ) as client:
        assert isinstance(client, _H3Client)
        exchange = await client.request(
            f"{host}:{port}", path, headers, stop_after, timeout_s
        )
        if fail_midway:
            # A client that fails inside its connection, mid-stream, as one
            # that crashes would: the case that broke Hypercorn's QUIC worker.
            raise _ClientFailed
    status = int(exchange.headers.get(":status", "0"))
    return H3Response(status, exchange.headers, bytes(exchange.body))


class _ClientFailed(Exception):
    pass


async def h3_request(
    host: str,
    port: int,
    path: str,
    *,
    cafile: Path,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
    fail_midway: bool = False,
    timeout_s: float = _TIMEOUT_S,
) -> H3Response | None:
    """GET ``path`` over HTTP/3; with ``stop_after``, only until that many body
    bytes came. ``fail_midway`` leaves by an exception once they came (None).
    No answer within ``timeout_s`` raises TimeoutError."""

    def run() -> H3Response | None:
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            try:
                return runner.run(
                    _request(
                        host,
                        port,
                        path,
                        headers or {},
                        cafile,
                        stop_after,
                        fail_midway,
                        timeout_s,
                    )
                )
            except _ClientFailed:
                return None

    return await anyio.to_thread.run_sync(run)
