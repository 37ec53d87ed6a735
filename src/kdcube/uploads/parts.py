"""The parts of a multipart chat submission, in the order PROTOCOL.md gives.

Malformed bodies raise ``MalformedMultipart``, which the ingress answers with
400 ``invalid_request``. The ``event_submission`` part comes first, so that the turn's conversation is
known before any file arrives and files can be stored where they belong as
they stream; the ``files`` parts follow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Request

from kdcube.uploads.flow import gate_of
from kdcube.uploads.multipart import PartReader
from kdcube.wire.errors import ApiError, bad_request

SUBMISSION_PART = "event_submission"
FILES_PART = "files"

MULTIPART_OVERHEAD = 64 * 1024
"""Room for part headers and boundaries on top of the message's own bytes."""


class SubmissionParts:
    def __init__(self, reader: PartReader) -> None:
        self._reader = reader

    async def submission(self, limit: int) -> bytes:
        """The JSON of the ``event_submission`` part, at most ``limit`` bytes."""
        part = await self._reader.next_part()
        if part is None or part.name != SUBMISSION_PART:
            raise bad_request(
                "missing_external_events",
                "The first part of a multipart submission must be event_submission.",
            )
        raw = bytearray()
        async for chunk in self._reader.chunks():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(
                    413,
                    "request_entity_too_large",
                    f"event_submission is larger than {limit} bytes.",
                )
        return bytes(raw)

    async def files(self) -> AsyncIterator[tuple[str | None, AsyncIterator[bytes]]]:
        """Each ``files`` part as (client's file name, its chunks)."""
        while (part := await self._reader.next_part()) is not None:
            if part.name != FILES_PART:
                raise bad_request(
                    "invalid_request",
                    f"Unexpected part {part.name!r}: send files as 'files' parts"
                    " after event_submission.",
                )
            yield part.filename, self._reader.chunks()


def open_parts(request: Request, *, max_message_bytes: int) -> SubmissionParts:
    """Start reading ``request``'s multipart body, refusing it at once with 413
    when it declares more bytes than a message may have."""
    gate = gate_of(request.scope)
    declared = gate.declared_length if gate is not None else request.content_length
    if declared is not None and declared > max_message_bytes + MULTIPART_OVERHEAD:
        raise ApiError(
            413,
            "request_entity_too_large",
            f"The message is {declared} bytes; the limit is {max_message_bytes}.",
        )

    boundary = request.mimetype_params.get("boundary", "")
    on_bytes = gate.consumed if gate is not None else (lambda _size: None)
    reader = PartReader(aiter(request.body), boundary, on_bytes=on_bytes)
    return SubmissionParts(reader)
