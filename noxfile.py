"""Test and lint sessions. `nox` runs them all; `nox -s lint` only the checks.

The tests form a matrix: backend {embedded, redis-postgres} x storage
{local, s3}. ``embedded`` is the in-memory bus with SQLite; ``redis-postgres``
uses the Redis and Postgres named by ``KDCUBE_TEST_REDIS_URL`` and
``KDCUBE_TEST_POSTGRES_DSN`` (by default the local servers on their standard
ports). ``s3`` stores everything in an S3 server that validates signatures
(moto, started by the tests, unless ``KDCUBE_TEST_S3_ENDPOINT`` names one).

The first cell runs the whole suite, every adapter's contract tests included;
the other cells run the end-to-end tests, which are what the backend and the
storage change. Each session first makes sure clamd and nginx are installed
(``ops/clamd/clamd.sh install``, ``ops/edge/nginx.sh install``), since the
upload tests scan with a real clamd and the OpenResty config is tested live;
the first also installs bubblewrap, Docker and Chromium (``ops/exec/local.sh
install``, ``ops/exec/docker.sh install``, ``ops/ui/chromium.sh install``) for
the executors' and the web UI's tests, which start their
own dockerd and build the sandbox image (cached in ``~/.cache/kdcube``).
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
@nox.parametrize("storage", ["local", "s3"])
@nox.parametrize("backend", ["embedded", "redis-postgres"])
def tests(session: nox.Session, backend: str, storage: str) -> None:
    session.install("-e", ".[test]")
    session.run("bash", "ops/clamd/clamd.sh", "install", external=True)
    # The OpenResty config's end-to-end tests run in every cell.
    session.run("bash", "ops/edge/nginx.sh", "install", external=True)
    session.env["KDCUBE_TEST_BACKEND"] = backend
    session.env["KDCUBE_TEST_STORAGE"] = storage
    if (backend, storage) == ("embedded", "local"):
        # The executors' own tests run sandboxes and containers for real.
        session.run("bash", "ops/exec/local.sh", "install", external=True)
        session.run("bash", "ops/exec/docker.sh", "install", external=True)
        # The web UI's tests drive Debian's Chromium through Playwright.
        session.run("bash", "ops/ui/chromium.sh", "install", external=True)
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
    # Bundles are loaded from their folders, not imported as a package, so
    # each entry module is checked on its own.
    for entry in sorted(Path("bundles").glob("*/entrypoint.py")):
        session.run("mypy", "--strict", str(entry))
