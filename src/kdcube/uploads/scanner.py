"""Virus scanning of uploads by clamd, streamed over its INSTREAM command.

The client is native on anyio sockets because the PyPI ``clamd`` package is
synchronous, and a call parked in a worker thread can be neither cancelled nor
bounded in time from Trio.

A scan is opened before the first byte arrives and fed chunk by chunk, so the
ingress can tee one upload to storage and to clamd without holding the file::

    async with scanner.scan("report.pdf") as scan:
        async for chunk in upload:
            await scan.feed(chunk)
            ...  # the same chunk goes to storage
        verdict = await scan.verdict()
    if not verdict.passed:
        reject(verdict.reason)

``feed`` and ``verdict`` never raise for clamd's sake: an unreachable, slow or
broken clamd becomes a ``failed`` verdict, and the policy decides whether that
passes. Leaving the ``async with`` (normally, by error or by cancellation)
closes the connection at once.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

log = structlog.get_logger("kdcube.uploads")

ScanPolicy = Literal["required", "best_effort", "off"]
Outcome = Literal["clean", "infected", "failed", "unscanned"]

DEFAULT_TIMEOUT_S = 3.0
_POLICIES: tuple[ScanPolicy, ...] = ("required", "best_effort", "off")
_TERMINATOR = struct.pack("!L", 0)
_MAX_REPLY_BYTES = 4096
_SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"
# What a dead or misbehaving clamd raises at us; anything else is our bug.
_CONNECTION_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


class ScannerError(Exception):
    """Base of every error the scanner raises (scans themselves never raise)."""


class ScannerConfigError(ScannerError, ValueError):
    """The clamd URL or the policy cannot be used; the message says what to set."""


class ScannerUnavailable(ScannerError):
    """clamd did not answer PING."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one scan concluded, and whether the upload may go on under the policy.

    ``detail`` is the signature when infected and the cause when failed.
    """

    outcome: Outcome
    passed: bool
    detail: str = ""
    scanner_fault: bool = False
    """Whether clamd itself failed (down, slow, confused), not the file."""

    @property
    def label(self) -> str:
        """One word for the file's record: clean, infected, failed or unscanned."""
        return self.outcome

    @property
    def reason(self) -> str:
        """One line for the person whose upload was refused (or for the log)."""
        if self.outcome == "infected":
            return f"malware found: {self.detail}"
        if self.outcome == "failed":
            return f"virus scan failed: {self.detail}"
        return self.outcome


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """Where clamd listens: a unix socket path, or a TCP host and port."""

    url: str
    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    async def connect(self) -> anyio.abc.ByteStream:
        if self.unix_path is not None:
            return await anyio.connect_unix(self.unix_path)
        assert self.host is not None and self.port is not None
        return await anyio.connect_tcp(self.host, self.port)


class Scan(Protocol):
    """One upload on its way through the scanner."""

    async def feed(self, chunk: bytes) -> None:
        """Pass the next bytes of the upload on; an empty chunk is ignored."""

    async def verdict(self) -> Verdict:
        """End the stream and wait (bounded) for clamd's answer; idempotent."""


class Scanner(Protocol):
    policy: ScanPolicy

    def scan(self, name: str) -> AbstractAsyncContextManager[Scan]:
        """Open a scan; ``name`` is for the logs only (clamd never sees it)."""

    async def ping(self) -> None:
        """Raise ScannerUnavailable unless the scanner answers."""


def parse_clamd_url(url: str) -> ClamdAddress:
    """``unix:///abs/path/clamd.sock`` or ``tcp://host:port``."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return _unix_address(url, parts.netloc, parts.path)
    if parts.scheme == "tcp":
        return _tcp_address(url)
    raise ScannerConfigError(
        f"clamd URL {url!r} must look like unix:///run/clamav/clamd.sock"
        " or tcp://127.0.0.1:3310"
    )


def _unix_address(url: str, netloc: str, path: str) -> ClamdAddress:
    if netloc or not path.startswith("/") or path == "/":
        raise ScannerConfigError(
            f"clamd URL {url!r} needs an absolute socket path after unix:// ,"
            " as in unix:///run/clamav/clamd.sock (three slashes)"
        )
    return ClamdAddress(url, unix_path=path)


def _tcp_address(url: str) -> ClamdAddress:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or port == 0:
        raise ScannerConfigError(
            f"clamd URL {url!r} needs a host and a port from 1 to 65535,"
            " as in tcp://127.0.0.1:3310"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ScannerConfigError(
            f"clamd URL {url!r} must be only tcp://host:port (no path, query or user)"
        )
    return ClamdAddress(url, host=parts.hostname, port=port)


def scanner_from(
    clamd: str | None,
    *,
    policy: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Scanner:
    """Build the scanner the settings ask for.

    ``policy`` defaults to ``required`` when clamd is configured and ``off``
    when it is not; every other combination of the two is refused here, at
    start-up, rather than discovered on the first upload.
    """
    chosen = _check_policy(policy, clamd)
    if chosen == "off":
        return NoScanner()

    assert clamd is not None
    if timeout_s <= 0:
        raise ScannerConfigError(f"clamd timeout must be positive, got {timeout_s!r}")
    return ClamdScanner(parse_clamd_url(clamd), policy=chosen, timeout_s=timeout_s)


def _check_policy(policy: str | None, clamd: str | None) -> ScanPolicy:
    if policy is None:
        return "required" if clamd else "off"
    if policy not in _POLICIES:
        raise ScannerConfigError(
            f"scan policy {policy!r} is not one of {', '.join(_POLICIES)}"
        )
    if policy == "off" and clamd:
        raise ScannerConfigError(
            "scan policy 'off' while a clamd is configured: unset the clamd URL,"
            " or choose 'required' or 'best_effort'"
        )
    if policy != "off" and not clamd:
        raise ScannerConfigError(
            f"scan policy {policy!r} needs a clamd URL (unix:///path or"
            " tcp://host:port), or choose 'off'"
        )
    return "required" if policy == "required" else "best_effort"


class ClamdScanner:
    """Scans with clamd; ``timeout_s`` bounds connecting, each chunk, and the
    wait for the answer after the last byte.

    There is no cap on concurrent scans here: clamd's MaxThreads and MaxQueue
    are the only limit, and scans beyond them wait inside clamd until they
    time out. A failure is reported only by ``verdict()``, so an upload is
    still read to its end when clamd is already known to be down. A pause
    between two chunks longer than clamd's ReadTimeout (120 s by default)
    makes clamd drop the stream, which ends as a failed scan.
    """

    def __init__(
        self,
        address: ClamdAddress,
        *,
        policy: Literal["required", "best_effort"] = "required",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.policy: ScanPolicy = policy
        self.timeout_s = timeout_s

    @asynccontextmanager
    async def scan(self, name: str) -> AsyncIterator[Scan]:
        scan = _ClamdScan(self, name)
        try:
            await scan.open()
            yield scan
        finally:
            await scan.close()

    async def ping(self) -> None:
        reply = ""
        with anyio.move_on_after(self.timeout_s) as scope:
            try:
                reply = await self._ask(b"zPING\0")
            except _CONNECTION_ERRORS as exc:
                raise ScannerUnavailable(
                    f"clamd at {self.address.url} is unreachable: {exc}"
                ) from exc

        if scope.cancelled_caught:
            raise ScannerUnavailable(
                f"clamd at {self.address.url} did not answer PING within"
                f" {self.timeout_s} s"
            )
        if reply != "PONG":
            raise ScannerUnavailable(
                f"clamd at {self.address.url} answered PING with {reply!r}"
            )

    async def _ask(self, command: bytes) -> str:
        async with await self.address.connect() as stream:
            await stream.send(command)
            return await _read_reply(stream)


class _ClamdScan:
    """The client side of one INSTREAM exchange.

    The first failure is kept and ends the exchange; later feeds only count
    bytes, so the caller's tee loop needs no branch for a broken scanner.
    """

    def __init__(self, scanner: ClamdScanner, name: str) -> None:
        self._scanner = scanner
        self._name = name
        self._stream: anyio.abc.ByteStream | None = None
        self._failure: str | None = None
        self._hung_up = False
        self._verdict: Verdict | None = None
        self._started = anyio.current_time()
        self.bytes_fed = 0

    async def open(self) -> None:
        timeout_s = self._scanner.timeout_s
        with anyio.move_on_after(timeout_s) as scope:
            try:
                self._stream = await self._scanner.address.connect()
            except _CONNECTION_ERRORS as exc:
                self._failure = (
                    f"clamd at {self._scanner.address.url} unreachable: {exc}"
                )
                return

        if scope.cancelled_caught:
            self._failure = f"connecting to clamd took longer than {timeout_s} s"
            return
        await self._send(b"zINSTREAM\0", "starting the scan")

    async def feed(self, chunk: bytes) -> None:
        if self._verdict is not None:
            raise RuntimeError("feed() after verdict(): the scan is over")
        self.bytes_fed += len(chunk)
        # An empty frame is INSTREAM's end marker, so it must never be sent here.
        if chunk and self._can_send():
            await self._send(struct.pack("!L", len(chunk)) + chunk, "sending data")

    async def verdict(self) -> Verdict:
        if self._verdict is None:
            self._verdict = await self._conclude()
            self._log(self._verdict)
        return self._verdict

    async def close(self) -> None:
        if self._stream is not None:
            await anyio.aclose_forcefully(self._stream)

    def _can_send(self) -> bool:
        return self._stream is not None and self._failure is None and not self._hung_up

    async def _send(self, data: bytes, stage: str) -> None:
        assert self._stream is not None
        timeout_s = self._scanner.timeout_s
        with anyio.move_on_after(timeout_s) as scope:
            try:
                await self._stream.send(data)
            except _CONNECTION_ERRORS:
                # clamd hangs up mid-stream when the upload passes its
                # StreamMaxLength; its reason is already in our receive buffer.
                self._hung_up = True

        if scope.cancelled_caught:
            self._failure = f"clamd stalled while {stage} (over {timeout_s} s)"

    async def _conclude(self) -> Verdict:
        if self._stream is None or self._failure is not None:
            return self._failed(self._failure or "no connection to clamd")

        timeout_s = self._scanner.timeout_s
        reply = ""
        with anyio.move_on_after(timeout_s) as scope:
            if not self._hung_up:
                await self._end_stream(self._stream)
            reply = await _read_reply(self._stream)

        if scope.cancelled_caught:
            return self._failed(f"no answer from clamd within {timeout_s} s")
        return self._judge(reply)

    @staticmethod
    async def _end_stream(stream: anyio.abc.ByteStream) -> None:
        try:
            await stream.send(_TERMINATOR)
        except _CONNECTION_ERRORS:
            pass  # clamd hung up just now; whatever it said is still readable

    def _judge(self, reply: str) -> Verdict:
        if reply == "stream: OK":
            return Verdict("clean", passed=True)
        if reply.startswith("stream: ") and reply.endswith(" FOUND"):
            signature = reply.removeprefix("stream: ").removesuffix(" FOUND")
            return Verdict("infected", passed=False, detail=signature)
        if reply.startswith(_SIZE_LIMIT_REPLY):
            # The file itself is the cause: passing it under best_effort would
            # let anyone skip the scan by padding an upload.
            return Verdict(
                "failed",
                passed=False,
                detail="the file is larger than clamd's StreamMaxLength",
            )
        if not reply:
            return self._failed("clamd closed the connection without an answer")
        return self._failed(f"clamd answered {reply!r}")

    def _failed(self, cause: str) -> Verdict:
        return Verdict(
            "failed",
            passed=self._scanner.policy == "best_effort",
            detail=cause,
            scanner_fault=True,
        )

    def _log(self, verdict: Verdict) -> None:
        context = {
            "upload": self._name,
            "bytes": self.bytes_fed,
            "ms": round((anyio.current_time() - self._started) * 1000),
        }
        if verdict.outcome == "clean":
            log.debug("scan.clean", **context)
        elif verdict.outcome == "infected":
            log.warning("scan.infected", signature=verdict.detail, **context)
        elif verdict.passed:
            log.warning("scan.failed_open", cause=verdict.detail, **context)
        else:
            log.warning("scan.failed_closed", cause=verdict.detail, **context)


async def _read_reply(stream: anyio.abc.ByteStream) -> str:
    """Read one NUL-terminated answer; a hang-up ends it early, never raises."""
    reply = b""
    while not reply.endswith(b"\0") and len(reply) < _MAX_REPLY_BYTES:
        try:
            reply += await stream.receive(_MAX_REPLY_BYTES)
        except _CONNECTION_ERRORS:
            break
    return reply.rstrip(b"\0").decode("utf-8", "replace").strip()


class NoScanner:
    """No clamd configured (policy ``off``): every upload passes unscanned."""

    policy: ScanPolicy = "off"

    @asynccontextmanager
    async def scan(self, name: str) -> AsyncIterator[Scan]:
        yield _UnscannedScan()

    async def ping(self) -> None:
        return None


class _UnscannedScan:
    async def feed(self, chunk: bytes) -> None:
        await anyio.lowlevel.checkpoint()

    async def verdict(self) -> Verdict:
        await anyio.lowlevel.checkpoint()
        return Verdict("unscanned", passed=True)


async def scan_bytes(
    scanner: Scanner, name: str, data: bytes, *, chunk_size: int = 64 * 1024
) -> Verdict:
    """Scan a whole buffer; for small payloads and tests."""
    async with scanner.scan(name) as scan:
        for start in range(0, len(data), chunk_size):
            await scan.feed(data[start : start + chunk_size])
        return await scan.verdict()
