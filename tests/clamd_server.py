"""A real clamd for the tests, loaded with a database that detects only EICAR.

``KDCUBE_TEST_CLAMD`` names one (a ``unix:///path`` or ``tcp://host:port`` URL,
or both separated by a space). Unset, a throwaway clamd is started through
``ops/clamd/clamd.sh`` when the ``clamd`` binary is installed
(``ops/clamd/clamd.sh install``). When none can be had, the tests that need
one are skipped, except under CI (``CI`` set), where that is an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.needs import missing
from tests.servers import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "clamd" / "clamd.sh"

# Built from two halves so that no file here is itself the test signature.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}" + b"$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


@dataclass
class ClamdUrls:
    """Where a clamd answers; either may be missing for a server given by URL."""

    unix: str | None = None
    tcp: str | None = None

    def get(self, transport: str) -> str:
        url = self.unix if transport == "unix" else self.tcp
        if url is None:
            pytest.skip(f"KDCUBE_TEST_CLAMD names no {transport} clamd")
        return url


@dataclass
class PrivateClamd:
    """A clamd of the test's own, which the test may stop."""

    folder: Path
    port: int
    max_stream: str = "25M"
    urls: ClamdUrls = field(default_factory=ClamdUrls)

    def start(self) -> None:
        command = [str(SCRIPT), "start", str(self.folder), "--port", str(self.port)]
        command += ["--max-stream", self.max_stream]
        done = subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=60
        )
        self.urls = _urls_from(done.stdout.split())

    def stop(self) -> None:
        subprocess.run(
            [str(SCRIPT), "stop", str(self.folder)],
            check=True,
            capture_output=True,
            timeout=30,
        )


def _urls_from(words: list[str]) -> ClamdUrls:
    urls = ClamdUrls()
    for word in words:
        if word.startswith("unix://"):
            urls.unix = word
        elif word.startswith("tcp://"):
            urls.tcp = word
    return urls


def _require_binary() -> None:
    if shutil.which("clamd") or Path("/usr/sbin/clamd").exists():
        return
    missing("no clamd: set KDCUBE_TEST_CLAMD or run ops/clamd/clamd.sh install")


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdUrls]:
    """The clamd shared by the whole session."""
    given = os.environ.get("KDCUBE_TEST_CLAMD")
    if given:
        yield _urls_from(given.split())
        return

    with _started(max_stream="25M") as server:
        yield server.urls


@pytest.fixture
def private_clamd() -> Iterator[PrivateClamd]:
    """A running clamd with a 1 MB StreamMaxLength, stopped at teardown."""
    with _started(max_stream="1M") as server:
        yield server


@contextmanager
def _started(*, max_stream: str) -> Iterator[PrivateClamd]:
    """Start a throwaway clamd in a fresh folder; stop it and remove the folder."""
    _require_binary()
    server = PrivateClamd(
        Path(tempfile.mkdtemp(prefix="kdcube-clamd-")), free_port(), max_stream
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
