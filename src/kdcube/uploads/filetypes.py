"""Which uploads are accepted: the type comes from the content, the name only has
to agree with it.

``classify`` looks at the first bytes of a file (``HEAD_BYTES`` of them, or the
whole file when it is shorter) and returns its ``FileType`` or raises
``Rejected`` with a reason a person can act on. The allowlist and the per-type
caps follow upstream kdcube: images 5 MB, PDF and text 10 MB, Office documents
25 MB.

The signatures of the accepted types are our own table: puremagic cannot tell a
plain ZIP from a .docx, or a .docx from a .pptx, and guesses with confidence
scores where an allowlist needs a yes or a no. puremagic is used only to name
content we refuse, so that the reason says what the file really is.
"""

from __future__ import annotations

import codecs
import struct
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath

import puremagic

MB = 1024 * 1024
HEAD_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 25 * MB
_MAX_INFLATED = 4 * MB


class Rejected(Exception):
    """The upload is refused; ``reason`` is safe to show to the uploader."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FileType:
    kind: str
    mime: str
    max_bytes: int
    label: str
    extensions: tuple[str, ...]

    def check_size(self, size: int) -> None:
        """Raise Rejected when ``size`` bytes are over this type's cap."""
        if size > self.max_bytes:
            raise Rejected(
                f"{self.label} may be at most {self.max_bytes // MB} MB,"
                f" this one is {size / MB:.1f} MB"
            )


_OOXML = "application/vnd.openxmlformats-officedocument"
_TYPES = {
    kind.kind: kind
    for kind in (
        FileType("png", "image/png", 5 * MB, "a PNG image", (".png",)),
        FileType(
            "jpeg", "image/jpeg", 5 * MB, "a JPEG image", (".jpg", ".jpeg", ".jpe")
        ),
        FileType("gif", "image/gif", 5 * MB, "a GIF image", (".gif",)),
        FileType("webp", "image/webp", 5 * MB, "a WebP image", (".webp",)),
        FileType("pdf", "application/pdf", 10 * MB, "a PDF document", (".pdf",)),
        FileType(
            "docx",
            f"{_OOXML}.wordprocessingml.document",
            25 * MB,
            "a Word document",
            (".docx",),
        ),
        FileType(
            "xlsx",
            f"{_OOXML}.spreadsheetml.sheet",
            25 * MB,
            "an Excel workbook",
            (".xlsx",),
        ),
        FileType(
            "pptx",
            f"{_OOXML}.presentationml.presentation",
            25 * MB,
            "a PowerPoint presentation",
            (".pptx",),
        ),
        FileType("text", "text/plain", 10 * MB, "a text file", ()),
    )
}

# (offset, bytes that must be there) -> kind; first match wins.
_SIGNATURES: tuple[tuple[tuple[tuple[int, bytes], ...], str], ...] = (
    (((0, b"\x89PNG\r\n\x1a\n"),), "png"),
    (((0, b"\xff\xd8\xff"),), "jpeg"),
    (((0, b"GIF87a"),), "gif"),
    (((0, b"GIF89a"),), "gif"),
    (((0, b"RIFF"), (8, b"WEBP")), "webp"),
    (((0, b"%PDF-"),), "pdf"),
    (((0, b"PK\x03\x04"),), "zip"),
)

# The main part named in [Content_Types].xml tells the three Office formats
# apart; macro-enabled variants name other parts and so are not accepted.
_OFFICE_MAIN_PARTS = {
    f"{_OOXML}.wordprocessingml.document.main+xml": "docx",
    f"{_OOXML}.spreadsheetml.sheet.main+xml": "xlsx",
    f"{_OOXML}.presentationml.presentation.main+xml": "pptx",
}

# Text whose name says it is one of these gets a more precise media type.
_TEXT_MIMES = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
}

# Extensions of types we refuse, so that a name like "notes.exe" holding text
# is caught as a claim about the content, not taken as an unknown suffix.
_REFUSED_EXTENSIONS = {
    ".exe": "a Windows executable",
    ".dll": "a Windows library",
    ".msi": "a Windows installer",
    ".bat": "a batch script",
    ".cmd": "a batch script",
    ".ps1": "a PowerShell script",
    ".sh": "a shell script",
    ".js": "a JavaScript file",
    ".html": "an HTML document",
    ".htm": "an HTML document",
    ".xhtml": "an HTML document",
    ".svg": "an SVG image",
    ".zip": "a ZIP archive",
    ".docm": "a macro-enabled Word document",
    ".xlsm": "a macro-enabled Excel workbook",
    ".pptm": "a macro-enabled PowerPoint presentation",
}

# Markup that a browser would render if it ever sniffed the file as HTML.
_ACTIVE_MARKUP = (b"<!doctype html", b"<html", b"<script", b"<svg")


def classify(head: bytes, filename: str, *, complete: bool = False) -> FileType:
    """The type of an upload from its first bytes; raises Rejected.

    ``head`` is the first ``HEAD_BYTES`` (or more) of the file; ``complete``
    says it is the whole file, so text cut off inside a character is refused.
    """
    if not head:
        raise Rejected(f"{filename!r} is empty")

    kind = _sniff(head, complete)
    if kind not in _TYPES:
        raise Rejected(_refusal(filename, head, kind))

    found = _TYPES[kind]
    _check_name(filename, found)
    if kind == "text":
        return _text_type(filename)
    return found


def _sniff(head: bytes, complete: bool) -> str:
    kind = next(
        (
            kind
            for checks, kind in _SIGNATURES
            if all(head[at : at + len(magic)] == magic for at, magic in checks)
        ),
        None,
    )
    if kind == "zip":
        return _office_kind(head) or "zip"
    if kind is not None:
        return kind
    return _text_kind(head, complete)


def _text_kind(head: bytes, complete: bool) -> str:
    if b"\0" in head:
        return "binary"
    try:
        # A head that is not the whole file may end inside a character.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError:
        return "binary"

    start = head.removeprefix(codecs.BOM_UTF8).lstrip()[:32].lower()
    if start.startswith(_ACTIVE_MARKUP):
        return "markup"
    return "text"


def _office_kind(head: bytes) -> str | None:
    """docx, xlsx or pptx when [Content_Types].xml is among the first entries."""
    content_types = _zip_entry(head, "[Content_Types].xml")
    if content_types is None:
        return None
    text = content_types.decode("utf-8", "replace")
    return next(
        (kind for part, kind in _OFFICE_MAIN_PARTS.items() if part in text), None
    )


def _zip_entry(head: bytes, wanted: str) -> bytes | None:
    """The body of ``wanted`` if its local header and data lie inside ``head``.

    Microsoft Office writes [Content_Types].xml first; LibreOffice and some
    libraries write it last, which is found only when every part before it
    fits in ``head``. Larger files of that kind are refused as a plain ZIP:
    finding the entry anywhere would need the central directory at the end of
    the file, which the upload has not sent yet when its type is decided.
    """
    offset = 0
    while head[offset : offset + 4] == b"PK\x03\x04" and offset + 30 <= len(head):
        flags, method, size, name_length, extra_length = _local_header(head, offset)
        name_at = offset + 30
        data_at = name_at + name_length + extra_length
        name = head[name_at : name_at + name_length].decode("utf-8", "replace")
        if name == wanted:
            return _inflate(head[data_at:], method)

        sizes_follow_data = bool(flags & 0x08)
        if not sizes_follow_data:
            offset = data_at + size
            continue
        length = _deflated_length(head[data_at:]) if method == 8 else None
        if length is None:
            return None
        offset = _after_descriptor(head, data_at + length)
    return None


def _local_header(head: bytes, offset: int) -> tuple[int, int, int, int, int]:
    # Signature, version | flags, method | time, date, CRC | compressed size |
    # uncompressed size | name and extra-field lengths.
    fields = struct.unpack_from("<4x2xHH4x4xI4xHH", head, offset)
    flags, method, size, name_length, extra_length = fields
    return flags, method, size, name_length, extra_length


def _inflate(data: bytes, method: int) -> bytes | None:
    if method == 0:
        return data[:HEAD_BYTES]
    if method != 8:
        return None
    try:
        return zlib.decompressobj(-15).decompress(data, HEAD_BYTES)
    except zlib.error:
        return None


def _deflated_length(data: bytes) -> int | None:
    """Where a deflate stream ends, for entries whose sizes follow their data.

    Inflating is the only way to find the end; it stops after
    ``_MAX_INFLATED`` bytes of output so a small bomb in the head costs little.
    """
    inflater = zlib.decompressobj(-15)
    produced = 0
    pending = data
    try:
        while not inflater.eof and produced <= _MAX_INFLATED:
            produced += len(inflater.decompress(pending, HEAD_BYTES))
            pending = inflater.unconsumed_tail
            if not pending and not inflater.eof:
                return None
    except zlib.error:
        return None
    return len(data) - len(inflater.unused_data) if inflater.eof else None


def _after_descriptor(head: bytes, offset: int) -> int:
    # CRC and both sizes, after an optional signature (ZIP64 sizes not handled:
    # Office parts are far smaller than 4 GB).
    has_signature = head[offset : offset + 4] == b"PK\x07\x08"
    return offset + (16 if has_signature else 12)


def _check_name(filename: str, found: FileType) -> None:
    extension = PurePosixPath(filename).suffix.lower()
    if not extension or extension in found.extensions:
        return

    claimed = _claimed_by(extension)
    if claimed is not None:
        raise Rejected(
            f"{filename!r} is named as {claimed} but its content is {found.label}"
        )
    if found.kind != "text":
        raise Rejected(
            f"{filename!r} holds {found.label}; name it with"
            f" {' or '.join(found.extensions)}"
        )


def _claimed_by(extension: str) -> str | None:
    claimed = next(
        (kind.label for kind in _TYPES.values() if extension in kind.extensions),
        None,
    )
    return claimed or _REFUSED_EXTENSIONS.get(extension)


def _text_type(filename: str) -> FileType:
    text = _TYPES["text"]
    extension = PurePosixPath(filename).suffix.lower()
    mime = _TEXT_MIMES.get(extension, text.mime)
    return FileType("text", mime, text.max_bytes, text.label, text.extensions)


def _refusal(filename: str, head: bytes, kind: str) -> str:
    content = _describe(head, kind)
    extension = PurePosixPath(filename).suffix.lower()
    claimed = next(
        (kind.label for kind in _TYPES.values() if extension in kind.extensions),
        None,
    )
    if claimed is not None:
        return f"{filename!r} is named as {claimed} but its content is {content}"
    return f"{filename!r} is {content}, which is not accepted"


def _describe(head: bytes, kind: str) -> str:
    if kind == "zip":
        return "a ZIP archive"
    if kind == "markup":
        return "an HTML or SVG document"
    try:
        name = str(puremagic.magic_string(head)[0].name)
    except (puremagic.PureError, IndexError, ValueError):
        return "of an unknown binary type"
    return f"{name} data"
