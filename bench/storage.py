"""Storage throughput and memory: the local and S3 adapters, in and out.

Puts and gets objects of 1 KB, 1 MB and 50 MB on a temp dir and on a moto
server it starts (the test suite's, signatures checked), then streams a
200 MB object through the S3 adapter and back while measuring the peak of
Python allocations (tracemalloc) and of the process's resident memory.

    .venv/bin/python bench/storage.py
    .venv/bin/python bench/storage.py --quick
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from botocore.credentials import Credentials

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.s3_server import S3Server, moto_server  # noqa: E402

from kdcube.storage.local import LocalStorage  # noqa: E402
from kdcube.storage.ports import Storage  # noqa: E402
from kdcube.storage.s3 import S3Storage  # noqa: E402

KB = 1000
MB = 1000 * 1000
MIB = 1024 * 1024
SIZES = [(1 * KB, 200), (1 * MB, 30), (50 * MB, 3)]
QUICK_SIZES = [(1 * KB, 50), (1 * MB, 10), (50 * MB, 1)]
STREAM_CHUNK = 64 * 1024


@dataclass
class Row:
    adapter: str
    size: int
    ops: int
    put_s: float
    get_s: float

    def cells(self) -> list[str]:
        total_mb = self.size * self.ops / MB
        return [
            self.adapter,
            _size_label(self.size),
            str(self.ops),
            f"{total_mb / self.put_s:.1f}",
            f"{self.ops / self.put_s:.0f}",
            f"{total_mb / self.get_s:.1f}",
            f"{self.ops / self.get_s:.0f}",
        ]


def _size_label(size: int) -> str:
    return f"{size // MB} MB" if size >= MB else f"{size // KB} KB"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * 4096


async def _timed(action: Callable[[], Awaitable[object]], times: int) -> float:
    started = time.perf_counter()
    for _ in range(times):
        await action()
    return time.perf_counter() - started


async def _drain(storage: Storage, key: str) -> int:
    size = 0
    async for chunk in storage.get(key):
        size += len(chunk)
    return size


async def throughput(adapter: str, storage: Storage, size: int, ops: int) -> Row:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    keys = iter(range(ops))
    put_s = await _timed(lambda: storage.put(f"bench/{size}/{next(keys)}", body), ops)
    keys = iter(range(ops))
    get_s = await _timed(lambda: _drain(storage, f"bench/{size}/{next(keys)}"), ops)
    await storage.delete_prefix(f"bench/{size}/")
    return Row(adapter, size, ops, put_s, get_s)


async def _generated(size: int) -> AsyncIterator[bytes]:
    chunk = bytes(range(256)) * (STREAM_CHUNK // 256)
    for start in range(0, size, STREAM_CHUNK):
        yield chunk[: size - start]


@dataclass
class Peak:
    traced: int = 0
    rss_before: int = 0
    rss_peak: int = 0


async def _measured(action: Callable[[], Awaitable[object]]) -> Peak:
    """Run ``action`` while sampling RSS every 10 ms and tracing allocations."""
    peak = Peak(rss_before=_rss_bytes())
    peak.rss_peak = peak.rss_before

    async def sample_rss() -> None:
        while True:
            peak.rss_peak = max(peak.rss_peak, _rss_bytes())
            await anyio.sleep(0.01)

    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        async with anyio.create_task_group() as group:
            group.start_soon(sample_rss)
            await action()
            group.cancel_scope.cancel()
        peak.traced = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    peak.rss_peak = max(peak.rss_peak, _rss_bytes())
    return peak


async def streaming_memory(storage: Storage, size: int) -> tuple[Peak, Peak]:
    put = await _measured(lambda: storage.put("bench/stream", _generated(size)))
    digest = hashlib.sha256()

    async def read() -> None:
        async for chunk in storage.get("bench/stream"):
            digest.update(chunk)

    get = await _measured(read)
    await storage.delete("bench/stream")
    return put, get


def _s3(client: httpx.AsyncClient, server: S3Server) -> S3Storage:
    return S3Storage(
        client,
        bucket=server.bucket,
        credentials=Credentials(server.access_key, server.secret_key),
        region=server.region,
        prefix="bench/",
        endpoint_url=server.endpoint,
    )


async def run(server: S3Server, sizes: list[tuple[int, int]], stream_size: int) -> None:
    async with httpx.AsyncClient() as client:
        s3 = _s3(client, server)
        put, get = await streaming_memory(s3, stream_size)

        rows = []
        with tempfile.TemporaryDirectory() as folder:
            local = LocalStorage(Path(folder) / "root")
            for size, ops in sizes:
                rows.append(await throughput("local", local, size, ops))
                rows.append(await throughput("s3 (moto)", s3, size, ops))

    _print_table(
        ["adapter", "size", "ops", "put MB/s", "put ops/s", "get MB/s", "get ops/s"],
        [row.cells() for row in rows],
    )
    print()
    print(f"Streaming {stream_size // MB} MB through the S3 adapter (8 MiB parts):")
    _print_table(
        ["direction", "tracemalloc peak MiB", "RSS before MiB", "RSS peak delta MiB"],
        [
            [
                name,
                f"{peak.traced / MIB:.1f}",
                f"{peak.rss_before / MIB:.0f}",
                f"{(peak.rss_peak - peak.rss_before) / MIB:.1f}",
            ]
            for name, peak in (("put", put), ("get", get))
        ],
    )


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * width for width in widths], *rows]:
        print(
            "  ".join(
                cell.rjust(width) for cell, width in zip(line, widths, strict=True)
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer operations")
    parser.add_argument("--stream-mb", type=int, default=200)
    args = parser.parse_args()

    sizes = QUICK_SIZES if args.quick else SIZES
    with moto_server() as server:
        anyio.run(run, server, sizes, args.stream_mb * MB, backend="trio")


if __name__ == "__main__":
    main()
