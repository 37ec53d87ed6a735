"""The clamd client against a real clamd, and against listeners that misbehave.

A clamd with an EICAR-only database comes from tests/clamd_server.py. The
misbehaving listeners are real local sockets; their tests run on Trio's
autojump clock, so the 3 s scan timeout costs no real time.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest
import trio
from structlog.testing import capture_logs

from kdcube.uploads import (
    ClamdScanner,
    NoScanner,
    ScannerConfigError,
    ScannerUnavailable,
    parse_clamd_url,
    scan_bytes,
    scanner_from,
)
from tests.clamd_server import EICAR, ClamdUrls, PrivateClamd
from tests.loopback import tcp_peer

pytestmark = pytest.mark.anyio

TRANSPORTS = ["unix", "tcp"]


def on_autojump_clock() -> pytest.MarkDecorator:
    # The clock jumps only after 50 ms of real idleness, which loopback I/O
    # never comes near, so only the scanner's own timeouts are skipped over.
    clock = trio.testing.MockClock(autojump_threshold=0.05)
    return pytest.mark.parametrize(
        "anyio_backend", [("trio", {"clock": clock})], ids=["autojump"]
    )


def filler(size: int) -> bytes:
    return bytes(range(32, 127)) * (size // 95) + b"x" * (size % 95)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_eicar_is_found(clamd: ClamdUrls, transport: str) -> None:
    scanner = scanner_from(clamd.get(transport))

    verdict = await scan_bytes(scanner, "eicar.txt", EICAR)

    assert verdict.outcome == "infected"
    assert not verdict.passed
    assert "EICAR" in verdict.detail
    assert verdict.detail in verdict.reason


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_clean_file_passes(clamd: ClamdUrls, transport: str) -> None:
    scanner = scanner_from(clamd.get(transport))

    async with scanner.scan("notes.txt") as scan:
        await scan.feed(b"")
        await scan.feed(b"hello ")
        await scan.feed(b"")
        await scan.feed(b"world\n")
        verdict = await scan.verdict()

    assert (verdict.outcome, verdict.passed, verdict.label) == ("clean", True, "clean")


async def test_eicar_inside_a_larger_stream_fed_in_small_chunks(
    clamd: ClamdUrls,
) -> None:
    scanner = scanner_from(clamd.get("unix"))
    body = filler(300_000) + EICAR + filler(300_000)

    verdict = await scan_bytes(scanner, "big.txt", body, chunk_size=1000)

    assert verdict.outcome == "infected"
    assert "EICAR" in verdict.detail


async def test_verdict_is_asked_once_and_feed_after_it_is_refused(
    clamd: ClamdUrls,
) -> None:
    scanner = scanner_from(clamd.get("unix"))

    async with scanner.scan("a.txt") as scan:
        first = await scan.verdict()
        assert await scan.verdict() is first
        with pytest.raises(RuntimeError, match="after verdict"):
            await scan.feed(b"more")


async def test_ping_answers(clamd: ClamdUrls) -> None:
    await scanner_from(clamd.get("unix")).ping()


async def test_over_stream_max_length_is_refused_under_any_policy(
    private_clamd: PrivateClamd,
) -> None:
    body = filler(2 * 1024 * 1024)

    for transport in TRANSPORTS:
        url = private_clamd.urls.get(transport)
        for policy in ["required", "best_effort"]:
            scanner = scanner_from(url, policy=policy)

            verdict = await scan_bytes(scanner, "huge.bin", body)

            assert (verdict.outcome, verdict.passed) == ("failed", False)
            assert "StreamMaxLength" in verdict.reason


async def test_stopped_clamd_fails_a_required_scan(
    private_clamd: PrivateClamd,
) -> None:
    scanner = scanner_from(private_clamd.urls.get("tcp"))
    private_clamd.stop()

    with capture_logs() as logs:
        verdict = await scan_bytes(scanner, "a.txt", b"hello")

    assert (verdict.outcome, verdict.passed) == ("failed", False)
    assert "unreachable" in verdict.detail
    assert [entry["event"] for entry in logs] == ["scan.failed_closed"]
    with pytest.raises(ScannerUnavailable):
        await scanner.ping()


async def test_dead_socket_passes_a_best_effort_scan(tmp_path: Path) -> None:
    scanner = scanner_from(f"unix://{tmp_path}/gone.sock", policy="best_effort")

    with capture_logs() as logs:
        verdict = await scan_bytes(scanner, "a.txt", EICAR)

    assert (verdict.outcome, verdict.passed, verdict.label) == (
        "failed",
        True,
        "failed",
    )
    assert [entry["event"] for entry in logs] == ["scan.failed_open"]


async def read_forever(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            while True:
                await stream.receive()


async def never_read(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        await anyio.sleep_forever()


@on_autojump_clock()
async def test_clamd_that_never_answers_fails_after_the_timeout() -> None:
    async with tcp_peer(read_forever) as address:
        verdict = await scan_bytes(scanner_from(f"tcp://{address}"), "a.txt", b"hello")

    assert (verdict.outcome, verdict.passed) == ("failed", False)
    assert verdict.detail == "no answer from clamd within 3.0 s"


@on_autojump_clock()
async def test_clamd_that_stops_reading_fails_while_feeding() -> None:
    async with tcp_peer(never_read) as address:
        scanner = scanner_from(f"tcp://{address}", timeout_s=1.0)
        chunk = filler(1024 * 1024)
        async with scanner.scan("big.bin") as scan:
            # More than the kernel buffers of both ends can hold.
            for _ in range(64):
                await scan.feed(chunk)
            verdict = await scan.verdict()

    assert (verdict.outcome, verdict.passed) == ("failed", False)
    assert "stalled while sending data" in verdict.detail


@on_autojump_clock()
async def test_cancelling_a_scan_closes_the_connection() -> None:
    hung_up = anyio.Event()

    async def note_hang_up(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                hung_up.set()

    async with tcp_peer(note_hang_up) as address:
        with anyio.move_on_after(1.0) as waiting:
            await scan_bytes(scanner_from(f"tcp://{address}"), "a.txt", b"hello")
        with anyio.fail_after(0.5):
            await hung_up.wait()

    assert waiting.cancelled_caught


async def test_no_scanner_passes_everything_unscanned() -> None:
    scanner = scanner_from(None)

    verdict = await scan_bytes(scanner, "eicar.txt", EICAR)

    assert isinstance(scanner, NoScanner)
    assert (verdict.outcome, verdict.passed) == ("unscanned", True)
    await scanner.ping()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "clamd.sock",
        "/run/clamav/clamd.sock",
        "unix://run/clamd.sock",
        "unix:///",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:99999",
        "tcp://:3310",
        "tcp://127.0.0.1:3310/scan",
        "http://127.0.0.1:3310",
    ],
)
def test_bad_clamd_urls_are_refused(url: str) -> None:
    with pytest.raises(ScannerConfigError, match="clamd URL"):
        parse_clamd_url(url)


def test_good_clamd_urls_are_parsed() -> None:
    unix = parse_clamd_url("unix:///run/clamav/clamd.sock")
    tcp = parse_clamd_url("tcp://clamav:3310")

    assert unix.unix_path == "/run/clamav/clamd.sock"
    assert (tcp.host, tcp.port) == ("clamav", 3310)


@pytest.mark.parametrize(
    ("url", "policy", "message"),
    [
        ("tcp://127.0.0.1:3310", "off", "unset the clamd URL"),
        (None, "required", "needs a clamd URL"),
        (None, "best_effort", "needs a clamd URL"),
        ("tcp://127.0.0.1:3310", "strict", "not one of"),
    ],
)
def test_policy_must_fit_the_clamd_setting(
    url: str | None, policy: str, message: str
) -> None:
    with pytest.raises(ScannerConfigError, match=message):
        scanner_from(url, policy=policy)


def test_policy_defaults_to_required_with_a_clamd() -> None:
    scanner = scanner_from("tcp://127.0.0.1:3310")

    assert isinstance(scanner, ClamdScanner)
    assert scanner.policy == "required"
