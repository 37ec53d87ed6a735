"""Checks an upload passes before it is kept: its type, its size, a virus scan."""

from kdcube.uploads.filetypes import (
    HEAD_BYTES,
    MAX_MESSAGE_BYTES,
    FileType,
    Rejected,
    classify,
)
from kdcube.uploads.scanner import (
    ClamdAddress,
    ClamdScanner,
    NoScanner,
    Scan,
    Scanner,
    ScannerConfigError,
    ScannerError,
    ScannerUnavailable,
    ScanPolicy,
    Verdict,
    parse_clamd_url,
    scan_bytes,
    scanner_from,
)

__all__ = [
    "HEAD_BYTES",
    "MAX_MESSAGE_BYTES",
    "ClamdAddress",
    "ClamdScanner",
    "FileType",
    "NoScanner",
    "Rejected",
    "Scan",
    "ScanPolicy",
    "Scanner",
    "ScannerConfigError",
    "ScannerError",
    "ScannerUnavailable",
    "Verdict",
    "classify",
    "parse_clamd_url",
    "scan_bytes",
    "scanner_from",
]
