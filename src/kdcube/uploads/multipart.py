"""Reading a multipart/form-data body one part at a time, as it arrives.

python-multipart does the parsing; this module turns its callbacks into a
pull interface: ``next_part`` announces a part by its headers, and ``chunks``
streams that part's bytes. Nothing is kept beyond the chunk in hand.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

_MAX_HEADER_BYTES = 8 * 1024

# The parser logs each flaw of a client's body as a warning, unstructured, on
# stderr; the ingress already answers those bodies with a 400.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


class MalformedMultipart(ValueError):
    """The body is not a well-formed multipart/form-data document."""


@dataclass(frozen=True, slots=True)
class PartHeaders:
    name: str
    filename: str | None
    content_type: str | None


@dataclass(frozen=True, slots=True)
class _Start:
    headers: PartHeaders


class _End:
    pass


_Event = _Start | _End | bytes


class PartReader:
    """Parts of one multipart body, pulled from an async iterator of chunks.

    ``on_bytes`` is told how many raw body bytes were consumed, so that the
    flow control upstream can let more in.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        boundary: str,
        *,
        on_bytes: Callable[[int], None] = lambda _size: None,
    ) -> None:
        self._body = body
        self._on_bytes = on_bytes
        self._events: deque[_Event] = deque()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._finished = False
        self._in_part = False
        self._parser = self._new_parser(boundary)

    def _new_parser(self, boundary: str) -> MultipartParser:
        if not boundary or len(boundary) > 70:
            raise MalformedMultipart("the multipart boundary is missing or too long")
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_part,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        return MultipartParser(
            boundary,
            callbacks,  # type: ignore[arg-type]
            max_header_size=_MAX_HEADER_BYTES,
        )

    async def next_part(self) -> PartHeaders | None:
        """The next part's headers, skipping what is left of the current one;
        None after the last part."""
        while self._in_part:
            await self._skip_rest_of_part()
        while True:
            event = await self._next_event()
            if event is None:
                return None
            if isinstance(event, _Start):
                self._in_part = True
                return event.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The current part's bytes, until its end."""
        while self._in_part:
            event = await self._next_event()
            if isinstance(event, bytes):
                yield event
            elif isinstance(event, _End) or event is None:
                self._in_part = False

    async def _skip_rest_of_part(self) -> None:
        async for _ in self.chunks():
            pass

    async def _next_event(self) -> _Event | None:
        while not self._events:
            if self._finished:
                return None
            await self._feed()
        return self._events.popleft()

    async def _feed(self) -> None:
        try:
            chunk = await anext(self._body)
        except StopAsyncIteration:
            self._finish()
            return

        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise MalformedMultipart(
                f"the multipart body is malformed: {exc}"
            ) from None
        self._on_bytes(len(chunk))

    def _finish(self) -> None:
        if not self._finished:
            raise MalformedMultipart("the multipart body ended before its last part")

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        name = self._header_name.decode("latin-1").strip().lower()
        self._headers[name] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        self._events.append(_Start(_part_headers(self._headers)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(bytes(data[start:end]))

    def _part_end(self) -> None:
        self._events.append(_End())

    def _end(self) -> None:
        self._finished = True


def _part_headers(headers: dict[str, bytes]) -> PartHeaders:
    # Kept as bytes: browsers send UTF-8 file names raw in the header, which
    # only decode correctly after the parameters are split.
    disposition, params = parse_options_header(headers.get("content-disposition", b""))
    if disposition != b"form-data" or b"name" not in params:
        raise MalformedMultipart(
            "every part needs a Content-Disposition: form-data header with a name"
        )
    filename = params.get(b"filename")
    content_type = headers.get("content-type")
    return PartHeaders(
        name=_text(params[b"name"]),
        filename=_text(filename) if filename is not None else None,
        content_type=_text(content_type) if content_type is not None else None,
    )


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")
