"""Test and lint sessions. `nox` runs them all; `nox -s lint` only the checks.

The tests form a matrix over backends: ``embedded`` (in-memory bus, SQLite)
and ``redis-postgres`` (Redis and Postgres from ``KDCUBE_TEST_REDIS_URL`` and
``KDCUBE_TEST_POSTGRES_DSN``, by default the local servers on their standard
ports). The contract suites test every adapter in the embedded cell; the
backend picks what the end-to-end tests run on. S3 storage joins as a second
axis once its adapter exists.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
@nox.parametrize("backend", ["embedded", "redis-postgres"])
def tests(session: nox.Session, backend: str) -> None:
    session.install("-e", ".[test]")
    session.env["KDCUBE_TEST_BACKEND"] = backend
    if backend == "embedded":
        session.run("pytest", *session.posargs)
    else:
        session.run("pytest", "tests/e2e", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy --strict over src and tests."""
    session.install("-e", ".[test,lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
