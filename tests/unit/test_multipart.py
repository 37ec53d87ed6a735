"""The multipart reader yields the same parts however the body is split."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcube.uploads.multipart import MalformedMultipart, PartHeaders, PartReader

pytestmark = pytest.mark.anyio

BODY = (
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="event_submission"\r\n\r\n'
    b'{"external_events": []}\r\n'
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="files"; filename="a b.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
    b"first\r\nfile\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="files"; filename="x.bin"\r\n\r\n'
    b"\x00\x01--XyZ-not-a-boundary\r\n"
    b"--XyZ--\r\n"
)
EXPECTED = [
    (PartHeaders("event_submission", None, None), b'{"external_events": []}'),
    (PartHeaders("files", "a b.txt", "text/plain"), b"first\r\nfile"),
    (PartHeaders("files", "x.bin", None), b"\x00\x01--XyZ-not-a-boundary"),
]


async def pieces(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    edges = [0, *sorted(set(cuts)), len(body)]
    for start, end in zip(edges, edges[1:], strict=False):
        yield body[start:end]


async def read_all(reader: PartReader) -> list[tuple[PartHeaders, bytes]]:
    parts = []
    while (headers := await reader.next_part()) is not None:
        parts.append((headers, b"".join([c async for c in reader.chunks()])))
    return parts


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(BODY) - 1), max_size=12))
def test_any_split_gives_the_same_parts(cuts: list[int]) -> None:
    import trio

    async def check() -> None:
        consumed: list[int] = []
        reader = PartReader(pieces(BODY, cuts), "XyZ", on_bytes=consumed.append)
        assert await read_all(reader) == EXPECTED
        # Through the closing boundary at least; the epilogue after it may be
        # left unread.
        closing = BODY.index(b"--XyZ--") + len(b"--XyZ--")
        assert closing <= sum(consumed) <= len(BODY)

    trio.run(check)


async def test_the_whole_body_in_one_chunk() -> None:
    reader = PartReader(pieces(BODY, []), "XyZ")

    assert await read_all(reader) == EXPECTED


async def test_skipping_a_part_moves_to_the_next() -> None:
    reader = PartReader(pieces(BODY, [30, 90]), "XyZ")

    first = await reader.next_part()
    second = await reader.next_part()

    assert first is not None and first.name == "event_submission"
    assert second is not None and second.filename == "a b.txt"


@pytest.mark.parametrize(
    ("body", "boundary"),
    [
        (BODY[:-10], "XyZ"),
        (b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--\r\n", "XyZ"),
        (BODY, ""),
        (b"garbage", "XyZ"),
    ],
    ids=["cut short", "no disposition", "no boundary", "not multipart"],
)
async def test_malformed_bodies_are_refused(body: bytes, boundary: str) -> None:
    with pytest.raises(MalformedMultipart):
        reader = PartReader(pieces(body, []), boundary)
        await read_all(reader)


async def test_utf8_file_names_survive() -> None:
    name = "文件 Ā 😀.txt"
    body = (
        b'--b\r\nContent-Disposition: form-data; name=files; filename="'
        + name.encode()
        + b'"\r\n\r\nhi\r\n--b--\r\n'
    )
    reader = PartReader(pieces(body, []), "b")

    [(headers, content)] = await read_all(reader)

    assert (headers.filename, content) == (name, b"hi")
