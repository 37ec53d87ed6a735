"""Test and lint sessions. `nox` runs them all; `nox -s tests` only the tests."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite on the embedded backends and local storage.

    The Redis/Postgres backend and S3 storage join as a matrix of this session
    once their adapters exist; the contract and end-to-end tests are already
    parametrized so that those adapters plug in.
    """
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy --strict over src and tests."""
    session.install("-e", ".[test,lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
