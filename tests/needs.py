"""What a test does when an outside tool it needs is not on this machine."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason``. Under CI (``CI`` set) fail instead: the
    project's own install steps must have provided the tool there."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it", pytrace=False)
    pytest.skip(reason)
