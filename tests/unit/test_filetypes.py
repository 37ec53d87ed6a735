"""Upload types decided from content, on small real samples built here."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Any

import pytest

from kdcube.uploads import MAX_MESSAGE_BYTES, Rejected, classify
from kdcube.uploads.filetypes import MB

OOXML = "application/vnd.openxmlformats-officedocument"
WORD_MAIN = f"{OOXML}.wordprocessingml.document.main+xml"


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0\0")
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def jpeg() -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + app0 + b"\xff\xd9"


def gif() -> bytes:
    screen = b"\x01\x00\x01\x00\x80\x00\x00" + b"\0\0\0\xff\xff\xff"
    image = b"\x2c\0\0\0\0\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b";"


def webp() -> bytes:
    body = b"WEBP" + b"VP8L" + struct.pack("<I", 5) + b"\x2f\0\0\0\0\0"
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pdf() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n"
        b"2 0 obj <</Type /Pages /Kids [] /Count 0>> endobj\n"
        b"trailer <</Root 1 0 R>>\n%%EOF\n"
    )


def office_types(main_part: str, part_type: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="xml" ContentType="application/xml"/>'
        f'<Override PartName="/{main_part}" ContentType="{part_type}"/>'
        "</Types>"
    )


class Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then puts sizes after each entry's data."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self.buffer.write(data)


def office(main_part: str, part_type: str, *, stored: bool = False) -> bytes:
    content_types = office_types(main_part, part_type)
    buffer = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buffer, "w", method) as archive:
        archive.writestr("[Content_Types].xml", content_types)
        archive.writestr(main_part, "<document/>")
    return buffer.getvalue()


def libreoffice_docx() -> bytes:
    """Parts first and [Content_Types].xml last, sizes after the data."""
    parts = [
        ("_rels/.rels", "<Relationships/>"),
        ("word/document.xml", "<document>" + "words " * 2000 + "</document>"),
        ("word/styles.xml", "<styles/>"),
        ("[Content_Types].xml", office_types("word/document.xml", WORD_MAIN)),
    ]
    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in parts:
            archive.writestr(name, text)
    return sink.buffer.getvalue()


def docx(*, stored: bool = False) -> bytes:
    return office("word/document.xml", WORD_MAIN, stored=stored)


def plain_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("notes.txt", "hello")
    return buffer.getvalue()


def exe() -> bytes:
    dos_header = b"MZ" + b"\x90\x00" * 29 + struct.pack("<I", 64)
    return dos_header + b"PE\0\0" + b"\x4c\x01" + b"\0" * 200


@pytest.mark.parametrize(
    ("name", "content", "mime", "cap"),
    [
        ("cat.png", png(), "image/png", 5 * MB),
        ("photo.JPG", jpeg(), "image/jpeg", 5 * MB),
        ("anim.gif", gif(), "image/gif", 5 * MB),
        ("pic.webp", webp(), "image/webp", 5 * MB),
        ("paper.pdf", pdf(), "application/pdf", 10 * MB),
        ("letter.docx", docx(), f"{OOXML}.wordprocessingml.document", 25 * MB),
        (
            "stored.docx",
            docx(stored=True),
            f"{OOXML}.wordprocessingml.document",
            25 * MB,
        ),
        (
            "libre.docx",
            libreoffice_docx(),
            f"{OOXML}.wordprocessingml.document",
            25 * MB,
        ),
        (
            "sheet.xlsx",
            office("xl/workbook.xml", f"{OOXML}.spreadsheetml.sheet.main+xml"),
            f"{OOXML}.spreadsheetml.sheet",
            25 * MB,
        ),
        (
            "deck.pptx",
            office(
                "ppt/presentation.xml", f"{OOXML}.presentationml.presentation.main+xml"
            ),
            f"{OOXML}.presentationml.presentation",
            25 * MB,
        ),
        ("notes.txt", "héllo wörld\n".encode(), "text/plain", 10 * MB),
        ("README.md", b"# Title\n\n<p align=center>hi</p>\n", "text/markdown", 10 * MB),
        ("data.csv", b"a,b\n1,2\n", "text/csv", 10 * MB),
        ("data.json", b'{"a": 1}', "application/json", 10 * MB),
        ("script.py", b"print('hi')\n", "text/plain", 10 * MB),
        ("no-extension", png(), "image/png", 5 * MB),
    ],
)
def test_allowed_types_are_recognised(
    name: str, content: bytes, mime: str, cap: int
) -> None:
    found = classify(content, name)

    assert (found.mime, found.max_bytes) == (mime, cap)


def test_a_head_cut_inside_a_character_is_text_unless_it_is_the_whole_file() -> None:
    head = "naïve ".encode() * 10 + "é".encode()[:1]

    assert classify(head, "notes.txt").kind == "text"
    with pytest.raises(Rejected, match="not accepted"):
        classify(head, "notes.txt", complete=True)


def test_deflate_bomb_in_the_head_is_cut_short() -> None:
    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", bytes(64 * MB))
        archive.writestr(
            "[Content_Types].xml", office_types("word/document.xml", WORD_MAIN)
        )

    with pytest.raises(Rejected, match="ZIP archive"):
        classify(sink.buffer.getvalue(), "bomb.docx")


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("tool.exe", exe(), "not accepted"),
        ("archive.zip", plain_zip(), "a ZIP archive, which is not accepted"),
        ("blob", bytes(range(256)), "not accepted"),
        ("latin1.txt", "café crème".encode("latin-1"), "not accepted"),
        ("page.html", b"<!DOCTYPE html><html><body>x</body></html>", "HTML"),
        (
            "macro.docm",
            office(
                "word/document.xml",
                "application/vnd.ms-word.document.macroEnabled.main+xml",
            ),
            "ZIP archive",
        ),
    ],
)
def test_disallowed_content_is_rejected(name: str, content: bytes, says: str) -> None:
    with pytest.raises(Rejected, match=says):
        classify(content, name)


@pytest.mark.parametrize(
    ("name", "content", "claimed", "actual"),
    [
        ("report.pdf", exe(), "a PDF document", "Windows Executable"),
        ("cat.png", b"<html><script>alert(1)</script></html>", "a PNG image", "HTML"),
        ("cat.png", b"just words", "a PNG image", "a text file"),
        ("letter.docx", plain_zip(), "a Word document", "a ZIP archive"),
        ("photo.jpg", png(), "a JPEG image", "a PNG image"),
        ("paper.pdf", docx(), "a PDF document", "a Word document"),
        ("notes.exe", b"hello", "a Windows executable", "a text file"),
    ],
)
def test_spoofed_names_are_rejected_naming_both_types(
    name: str, content: bytes, claimed: str, actual: str
) -> None:
    with pytest.raises(Rejected) as caught:
        classify(content, name)

    assert claimed in caught.value.reason
    assert actual in caught.value.reason


def test_binary_type_under_an_unknown_extension_is_rejected() -> None:
    with pytest.raises(Rejected, match="name it with .png"):
        classify(png(), "cat.bin")


def test_empty_file_is_rejected() -> None:
    with pytest.raises(Rejected, match="empty"):
        classify(b"", "empty.txt")


def test_size_cap_is_checked_per_type() -> None:
    image = classify(png(), "cat.png")

    image.check_size(5 * MB)
    with pytest.raises(Rejected, match="at most 5 MB"):
        image.check_size(5 * MB + 1)
    assert MAX_MESSAGE_BYTES == 25 * MB
