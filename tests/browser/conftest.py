"""A real Chromium, driven by Playwright, against ``kdcube run`` in a child process.

The browser is Debian's chromium (``ops/ui/chromium.sh install``); Playwright
never downloads one of its own. ``kdcube run`` runs as a subprocess on port 0,
so these tests stay synchronous (Playwright's sync API) while the server keeps
its own event loop. Without chromium or the playwright package the tests are
skipped, except under CI (``CI`` set), where that is an error.

Screenshots go to ``tests/artifacts/browser/`` (not committed), to be looked at.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.helpers import REPO, write_bundles
from tests.needs import missing

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, ViewportSize

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts" / "browser"
KDCUBE = Path(sys.executable).with_name("kdcube")

# No GPU, no sandbox (tests run as root in containers), and nothing that
# reaches out to the network on its own: the machines have no internet.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}


# Package scope, not session: Playwright's sync API keeps an asyncio loop
# running in this thread while it is open, which breaks every later test that
# runs its own event loop; it must be closed when the browser tests end.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is missing: pip install -e '.[test]'")
    if not CHROMIUM.exists():
        missing(f"no {CHROMIUM}: run ops/ui/chromium.sh install")

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@dataclass
class Kdcube:
    """A ``kdcube run`` child process and the URL it serves."""

    process: subprocess.Popen[str]
    url: str
    log: list[str]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def browser_bundles(folder: Path) -> Path:
    """The test registry plus a slow echo (to cut a stream mid-answer) and
    the showcase bundle (steps, Markdown and follow-ups)."""
    path = write_bundles(folder)
    registry: dict[str, Any] = yaml.safe_load(path.read_text())
    registry["bundles"]["items"] += [
        {
            "id": "tortoise",
            "path": str(REPO / "bundles" / "echo"),
            "config": {"chunks": 12, "delay_s": 0.4},
        },
        {"id": "showcase", "path": str(REPO / "tests" / "bundles" / "showcase")},
    ]
    path.write_text(yaml.safe_dump(registry))
    return path


def start_kdcube(tmp_path: Path, env: dict[str, str] | None = None) -> Kdcube:
    bundles = browser_bundles(tmp_path)
    environment = {
        **os.environ,
        "KDCUBE_HOME": str(tmp_path / "home"),
        "KDCUBE_EXEC": "subprocess",
        "KDCUBE_DRAIN_TIMEOUT_S": "2",
        **(env or {}),
    }
    process = subprocess.Popen(
        [str(KDCUBE), "run", "--port", "0", "--bundles", str(bundles)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    log: list[str] = []
    url = None
    for line in process.stdout:
        log.append(line)
        if "ready at" in line:
            url = line.rsplit(" ", 1)[-1].strip()
            break
    if url is None:
        process.wait()
        raise AssertionError("kdcube run did not start:\n" + "".join(log))

    # Keep draining its output, so a chatty server never blocks on a full pipe.
    threading.Thread(
        target=lambda: log.extend(process.stdout or ()), daemon=True
    ).start()
    return Kdcube(process, url, log)


@pytest.fixture
def kdcube(tmp_path: Path) -> Iterator[Callable[..., Kdcube]]:
    """Starts ``kdcube run`` (with extra environment); stops it at teardown."""
    started: list[Kdcube] = []

    def start(**env: str) -> Kdcube:
        server = start_kdcube(tmp_path, env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _note_policy_violation(message: ConsoleMessage, errors: list[str]) -> None:
    # The edge serves the UI under a strict policy (its own files only, no
    # inline scripts or styles); the browser reports breaches on the console.
    if "Content Security Policy" in message.text:
        errors.append(message.text)


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Pages in fresh contexts (own storage), closed at teardown; page errors
    and content security policy violations fail the test."""
    contexts = []
    errors: list[str] = []

    def open_page(viewport: ViewportSize = DESKTOP, **options: Any) -> Page:
        context = browser.new_context(viewport=viewport, **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: _note_policy_violation(message, errors))
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"errors in the page: {errors}"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def sign_in(page: Page, url: str, name: str = "alice") -> None:
    page.goto(url)
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#connection[data-state=open]").wait_for()
