"""The Storage contract: whole objects by safe keys, streamed in and out."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anyio
import httpx
import pytest

from kdcube.storage.keys import InvalidKey
from kdcube.storage.ports import ObjectInfo, ObjectNotFound, Storage, StorageError

from .conftest import StorageBackend

pytestmark = pytest.mark.anyio

BIG = bytes(range(256)) * 1200
"""Larger than one read chunk of the local adapter, so reads span chunks."""

INVALID_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "a/../../outside",
    "a/..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\outside",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    "x" * 1025,
]
INVALID_PREFIXES = ["/", "../", "a/../", "a//", "a/..", "\x00", "a\\"]


async def read_all(
    storage: Storage, key: str, *, start: int = 0, end: int | None = None
) -> bytes:
    return b"".join([chunk async for chunk in storage.get(key, start=start, end=end)])


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await anyio.lowlevel.checkpoint()
        yield part


async def failing_after(*parts: bytes) -> AsyncIterator[bytes]:
    async for part in chunks(*parts):
        yield part
    raise OSError("the upload broke off")


async def test_put_and_get_bytes(storage: Storage) -> None:
    info = await storage.put("conv/c1/a.txt", b"hello")

    assert info == ObjectInfo("conv/c1/a.txt", 5)
    assert await read_all(storage, "conv/c1/a.txt") == b"hello"
    assert await storage.head("conv/c1/a.txt") == ObjectInfo("conv/c1/a.txt", 5)


async def test_put_streams_an_async_iterable(storage: Storage) -> None:
    parts = [BIG[:1000], b"", BIG[1000:]]

    info = await storage.put("big.bin", chunks(*parts))

    assert info == ObjectInfo("big.bin", len(BIG))
    assert await read_all(storage, "big.bin") == BIG


async def test_empty_object(storage: Storage) -> None:
    assert await storage.put("empty", b"") == ObjectInfo("empty", 0)

    assert await read_all(storage, "empty") == b""
    assert await storage.head("empty") == ObjectInfo("empty", 0)


async def test_put_replaces_the_whole_object(storage: Storage) -> None:
    await storage.put("k", BIG)
    await storage.put("k", b"short")

    assert await read_all(storage, "k") == b"short"
    assert await storage.head("k") == ObjectInfo("k", 5)


async def test_unicode_keys(storage: Storage) -> None:
    key = "users/ünïcødé/файл 名前 (1).txt"

    await storage.put(key, "данные".encode())

    assert await read_all(storage, key) == "данные".encode()
    assert await storage.list("users/") == [ObjectInfo(key, len("данные".encode()))]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),
        (10, 20),
        (0, 1),
        (len(BIG) - 5, None),
        (262_000, 263_000),
        (100, len(BIG) + 100),
        (len(BIG), None),
        (len(BIG) + 10, None),
        (20, 20),
    ],
)
async def test_ranged_get(storage: Storage, start: int, end: int | None) -> None:
    await storage.put("big.bin", BIG)

    assert await read_all(storage, "big.bin", start=start, end=end) == BIG[start:end]


async def test_missing_objects(storage: Storage) -> None:
    await storage.put("a/b", b"x")

    for key in ("missing", "a", "a/b/c"):
        with pytest.raises(ObjectNotFound):
            await storage.head(key)
        with pytest.raises(ObjectNotFound):
            await read_all(storage, key)
        assert await storage.delete(key) is False


async def test_list_by_prefix_sorted_by_key(storage: Storage) -> None:
    for key in ["b/2", "a/sub/x", "a/2", "ab", "a/10", "a/1"]:
        await storage.put(key, key.encode())

    assert [info.key for info in await storage.list("a/")] == [
        "a/1",
        "a/10",
        "a/2",
        "a/sub/x",
    ]
    assert [info.key for info in await storage.list("a")] == [
        "a/1",
        "a/10",
        "a/2",
        "a/sub/x",
        "ab",
    ]
    assert [info.key for info in await storage.list("a/1")] == ["a/1", "a/10"]
    everything = await storage.list("")
    assert [info.key for info in everything] == sorted(
        ["b/2", "a/sub/x", "a/2", "ab", "a/10", "a/1"]
    )
    assert all(info.size == len(info.key) for info in everything)
    assert await storage.list("zzz/") == []
    assert await storage.list("a/1/") == []


async def test_delete(storage: Storage) -> None:
    await storage.put("a/1", b"1")
    await storage.put("a/2", b"2")

    assert await storage.delete("a/1") is True
    assert await storage.delete("a/1") is False

    assert [info.key for info in await storage.list("")] == ["a/2"]
    with pytest.raises(ObjectNotFound):
        await storage.head("a/1")


async def test_delete_prefix(storage: Storage) -> None:
    for key in ["conv/c1/a", "conv/c1/sub/b", "conv/c10/a", "conv/c2/a"]:
        await storage.put(key, b"x")

    assert await storage.delete_prefix("conv/c1/") == 2
    assert await storage.delete_prefix("conv/c1/") == 0
    assert await storage.delete_prefix("nothing/") == 0

    remaining = [info.key for info in await storage.list("")]
    assert remaining == ["conv/c10/a", "conv/c2/a"]


@pytest.mark.parametrize("key", INVALID_KEYS)
async def test_invalid_keys_are_refused_without_touching_anything(
    storage_backend: StorageBackend, key: str
) -> None:
    storage = storage_backend.storage
    await storage.put("a/b", b"keep")
    before = storage_backend.raw_files()

    with pytest.raises(InvalidKey):
        await storage.put(key, b"x")
    with pytest.raises(InvalidKey):
        await storage.put(key, chunks(b"x"))
    with pytest.raises(InvalidKey):
        await read_all(storage, key)
    with pytest.raises(InvalidKey):
        await storage.head(key)
    with pytest.raises(InvalidKey):
        await storage.delete(key)

    assert storage_backend.raw_files() == before
    assert await read_all(storage, "a/b") == b"keep"


@pytest.mark.parametrize("prefix", INVALID_PREFIXES)
async def test_invalid_prefixes_are_refused(
    storage_backend: StorageBackend, prefix: str
) -> None:
    storage = storage_backend.storage
    await storage.put("a/b", b"keep")
    before = storage_backend.raw_files()

    with pytest.raises(InvalidKey):
        await storage.list(prefix)
    with pytest.raises(InvalidKey):
        await storage.delete_prefix(prefix)

    assert storage_backend.raw_files() == before


async def test_a_put_that_fails_midway_leaves_nothing(
    storage_backend: StorageBackend,
) -> None:
    storage = storage_backend.storage

    with pytest.raises(OSError, match="broke off"):
        await storage.put("a/new", failing_after(BIG, BIG))

    assert storage_backend.raw_files() == []
    assert await storage.list("") == []
    with pytest.raises(ObjectNotFound):
        await storage.head("a/new")


async def test_a_put_that_fails_midway_keeps_the_old_object(
    storage_backend: StorageBackend,
) -> None:
    storage = storage_backend.storage
    await storage.put("a/old", b"old")
    before = storage_backend.raw_files()

    with pytest.raises(OSError, match="broke off"):
        await storage.put("a/old", failing_after(BIG))

    assert storage_backend.raw_files() == before
    assert await read_all(storage, "a/old") == b"old"


async def test_a_cancelled_put_leaves_nothing(storage_backend: StorageBackend) -> None:
    storage = storage_backend.storage

    async def stalls() -> AsyncIterator[bytes]:
        yield BIG
        await anyio.sleep_forever()
        yield b"never"

    with anyio.move_on_after(0.05) as scope:
        await storage.put("a/new", stalls())

    assert scope.cancelled_caught
    assert storage_backend.raw_files() == []
    assert await storage.list("") == []


async def test_a_key_below_an_existing_object_is_a_storage_error(
    storage_backend: StorageBackend,
) -> None:
    storage = storage_backend.storage
    await storage.put("a", b"file")

    # Local folders cannot also be files; S3 allows both, so either outcome
    # is fine as long as the old object survives and the error is ours.
    try:
        await storage.put("a/b", b"below")
    except StorageError:
        pass

    assert await read_all(storage, "a") == b"file"
    assert [info.key for info in await storage.list("a")][0] == "a"


LARGE = 16 * 1024 * 1024 + 123
"""Several multipart parts for adapters that upload in parts of a few MiB."""

LARGE_CHUNK = 64 * 1024


def large_chunk(index: int) -> bytes:
    return index.to_bytes(4, "big") * (LARGE_CHUNK // 4)


async def large_body() -> AsyncIterator[bytes]:
    sent = 0
    for index in range(LARGE // LARGE_CHUNK + 1):
        chunk = large_chunk(index)[: LARGE - sent]
        sent += len(chunk)
        yield chunk


def large_slice(start: int, end: int) -> bytes:
    first, last = start // LARGE_CHUNK, (end - 1) // LARGE_CHUNK
    joined = b"".join(large_chunk(index) for index in range(first, last + 1))
    offset = first * LARGE_CHUNK
    return joined[start - offset : end - offset]


@contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """Yields a list that holds, on exit, the peak bytes allocated inside."""
    result: list[int] = []
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        yield result
        _, peak = tracemalloc.get_traced_memory()
        result.append(peak - baseline)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "key",
    [
        "with space/a b.txt",
        "umlaut/grün.txt",
        "plus/a+b+c",
        "emoji/🙂🚀.bin",
        "percent/100% sure %20 %2F.txt",
        "mixed/ü + 🙂 % ~ (1)!*'.txt",
    ],
)
async def test_keys_with_characters_that_need_encoding(
    storage: Storage, key: str
) -> None:
    await storage.put(key, key.encode())

    assert await read_all(storage, key) == key.encode()
    assert await read_all(storage, key, start=1, end=4) == key.encode()[1:4]
    assert await storage.head(key) == ObjectInfo(key, len(key.encode()))
    assert await storage.list(key.split("/")[0] + "/") == [
        ObjectInfo(key, len(key.encode()))
    ]
    assert await storage.delete(key) is True
    assert await storage.list("") == []


async def test_a_large_streamed_object_never_sits_whole_in_memory(
    storage: Storage,
) -> None:
    with peak_allocation() as put_peak:
        info = await storage.put("large.bin", large_body())

    assert info == ObjectInfo("large.bin", LARGE)
    assert await storage.head("large.bin") == info

    digest = hashlib.sha256()
    with peak_allocation() as get_peak:
        async for chunk in storage.get("large.bin"):
            digest.update(chunk)

    expected = hashlib.sha256()
    async for chunk in large_body():
        expected.update(chunk)
    assert digest.hexdigest() == expected.hexdigest()
    assert put_peak[0] < LARGE // 2, f"put held {put_peak[0]} bytes at once"
    assert get_peak[0] < LARGE // 8, f"get held {get_peak[0]} bytes at once"


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (5 * 1024 * 1024 - 10, 5 * 1024 * 1024 + 10),
        (8 * 1024 * 1024 - 1, 8 * 1024 * 1024 + 1),
        (LARGE - 200, LARGE),
        (3, 2 * 1024 * 1024),
    ],
)
async def test_ranged_reads_across_part_boundaries(
    storage: Storage, start: int, end: int
) -> None:
    await storage.put("large.bin", large_body())

    assert await read_all(storage, "large.bin", start=start, end=end) == large_slice(
        start, end
    )


async def test_a_large_bytes_body_round_trips(storage: Storage) -> None:
    body = large_slice(0, LARGE)

    assert await storage.put("large.bin", body) == ObjectInfo("large.bin", LARGE)

    assert await read_all(storage, "large.bin") == body


async def test_listing_returns_every_object_past_one_page(storage: Storage) -> None:
    keys = [f"many/{index:03}" for index in range(25)] + ["other/x"]
    for key in keys:
        await storage.put(key, key.encode())

    assert [info.key for info in await storage.list("many/")] == keys[:-1]
    assert [info.key for info in await storage.list("")] == keys
    assert [info.key for info in await storage.list("many/01")] == [
        f"many/{index:03}" for index in range(10, 20)
    ]
    assert await storage.delete_prefix("many/") == 25
    assert [info.key for info in await storage.list("")] == ["other/x"]


async def test_a_download_url_serves_exactly_the_bytes(
    storage_backend: StorageBackend,
) -> None:
    storage = storage_backend.storage
    key = "files/report ü+🙂.bin"
    await storage.put(key, BIG)

    url = await storage.download_url(key, expires_s=60)

    if url is None:
        # No URL: the caller serves the bytes, which must then be all there.
        assert await read_all(storage, key) == BIG
        return
    with storage_backend.anonymous_reads():
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
    assert response.status_code == 200
    assert response.content == BIG


async def test_a_download_url_needs_a_valid_key(storage: Storage) -> None:
    with pytest.raises(InvalidKey):
        await storage.download_url("../outside", expires_s=60)


async def test_a_streamed_put_failing_after_several_parts_leaves_nothing(
    storage_backend: StorageBackend,
) -> None:
    storage = storage_backend.storage

    async def breaks_off() -> AsyncIterator[bytes]:
        async for chunk in large_body():
            yield chunk
        raise OSError("the upload broke off")

    with pytest.raises(OSError, match="broke off"):
        await storage.put("a/new", breaks_off())

    assert storage_backend.raw_files() == []
    with pytest.raises(ObjectNotFound):
        await storage.head("a/new")


async def test_a_streamed_put_cancelled_after_several_parts_leaves_nothing(
    storage_backend: StorageBackend,
) -> None:
    storage = storage_backend.storage
    await storage.put("a/old", b"old")
    before = storage_backend.raw_files()

    with anyio.CancelScope() as scope:

        async def cancelled_midway() -> AsyncIterator[bytes]:
            # Pulling past 12 MiB means the adapter has taken at least two
            # parts' worth; cancel then, as a client that went away would.
            async for chunk in large_body():
                yield chunk
            scope.cancel()
            await anyio.sleep_forever()
            yield b"never"

        await storage.put("a/old", cancelled_midway())

    assert scope.cancelled_caught
    assert storage_backend.raw_files() == before
    assert await read_all(storage, "a/old") == b"old"
