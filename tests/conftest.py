"""Test-wide settings.

Rules for this suite: servers bind port 0 on 127.0.0.1; no sleep orders tasks
(tests wait for the event they expect); every test has a global timeout
(pytest-timeout, see pyproject.toml); warnings are errors.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Trio by default; a test that must also hold on asyncio parametrizes this."""
    return "trio"
