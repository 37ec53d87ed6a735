"""The web UI in a real Chromium: a person's view of a turn, end to end.

Each test starts ``kdcube run`` (see conftest.py), signs in through the page
and acts only through what a person sees: labels, buttons, text. Waits are on
what the page shows (Playwright's expect), never on sleeps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

if not os.environ.get("CI"):
    # Under CI a missing package must fail, as the browser fixture does.
    pytest.importorskip(
        "playwright",
        reason="the playwright package is missing: pip install -e '.[test]'",
    )

from playwright.sync_api import FilePayload, Page, expect

from tests.browser.conftest import PHONE, Kdcube, screenshot, sign_in
from tests.browser.cutter import cutter_for
from tests.clamd_server import EICAR, ClamdUrls

NewPage = Callable[..., Page]
Start = Callable[..., Kdcube]


def send(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send").click()


def last_answer(page: Page) -> str:
    return page.locator(".turn .answer").last.inner_text()


def test_a_prompt_streams_back_as_markdown_with_steps_and_followups(
    kdcube: Start, new_page: NewPage
) -> None:
    server = kdcube()
    page = new_page()
    sign_in(page, f"{server.url}/?bundle=showcase")
    expect(page.get_by_text("How can I help?")).to_be_visible()
    send(page, "where are the docs?")

    turn = page.locator(".turn").last
    expect(turn).to_have_attribute("data-state", "completed")
    answer = turn.locator(".answer")
    expect(answer.get_by_role("heading", name="Here is what I found")).to_be_visible()
    expect(answer.locator("strong")).to_have_text("where are the docs?")
    expect(answer.get_by_role("link", name="http and https")).to_have_attribute(
        "href", "https://example.org/docs"
    )
    expect(answer.locator("pre code")).to_contain_text('print("hello from a code')
    expect(answer.locator("li")).to_have_count(3)
    expect(turn.locator(".steps summary")).to_have_text("Steps (2)")
    expect(turn.locator(".step[data-status=completed]")).to_have_count(2)

    # The conversation is listed, and a suggestion is a new prompt.
    expect(page.locator(".conversation")).to_have_count(1)
    turn.get_by_role("button", name="Tell me more").click()
    second = page.locator(".turn").nth(1)
    expect(second.locator(".bubble")).to_have_text("Tell me more")
    expect(second).to_have_attribute("data-state", "completed")
    screenshot(page, "desktop-answer")

    # A reload shows the same conversation from the API.
    page.reload()
    expect(page.locator(".turn")).to_have_count(2)
    expect(page.locator(".turn .answer").first).to_contain_text("That is all for now.")


def test_the_echo_answer_arrives_and_conversations_open_and_delete(
    kdcube: Start, new_page: NewPage
) -> None:
    server = kdcube()
    page = new_page()
    sign_in(page, server.url)
    send(page, "hello <b>not bold</b> and *soft*")
    expect(page.locator(".turn").last).to_have_attribute("data-state", "completed")
    answer = page.locator(".turn .answer").last
    # HTML in a prompt is shown as text, never parsed.
    expect(answer).to_have_text("hello <b>not bold</b> and soft")
    expect(answer.locator("b")).to_have_count(0)
    expect(answer.locator("em")).to_have_text("soft")

    page.get_by_role("button", name="New conversation").click()
    expect(page.locator(".turn")).to_have_count(0)
    send(page, "second conversation")
    expect(page.locator(".turn").last).to_have_attribute("data-state", "completed")
    expect(page.locator(".conversation")).to_have_count(2)

    page.locator(".conversation", has_text="hello").click()
    expect(page.locator(".turn .bubble")).to_have_text(
        ["hello <b>not bold</b> and *soft*"]
    )
    delete = page.get_by_role("button", name="Delete")
    delete.click()
    page.get_by_role("button", name="Delete? Press again").click()
    expect(page.locator(".conversation")).to_have_count(1)
    expect(page.locator(".conversation")).to_contain_text("second conversation")
    expect(page.get_by_role("heading", name="New conversation")).to_be_visible()


def test_stop_cancels_a_running_turn(kdcube: Start, new_page: NewPage) -> None:
    server = kdcube()
    page = new_page()
    sign_in(page, f"{server.url}/?bundle=sleeper")
    send(page, "wait for me")
    turn = page.locator(".turn").last
    expect(turn.locator(".answer")).to_have_text("first")
    expect(turn.locator(".step-title")).to_have_text("Waiting to be cancelled")

    page.get_by_role("button", name="Stop").click()
    expect(turn.locator(".turn-status")).to_have_text("Stopped.")
    expect(turn).to_have_attribute("data-state", "cancelled")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    expect(turn.locator(".step")).to_have_attribute("data-status", "stopped")


def test_an_infected_file_is_refused_and_a_clean_one_is_scanned(
    kdcube: Start, new_page: NewPage, clamd: ClamdUrls
) -> None:
    server = kdcube(KDCUBE_CLAMD=clamd.get("tcp"))
    page = new_page()
    sign_in(page, server.url)
    files = page.locator("#file-input")
    chosen: list[FilePayload] = [
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"fine text\n"},
        {"name": "eicar.txt", "mimeType": "text/plain", "buffer": EICAR},
    ]
    files.set_input_files(chosen)
    send(page, "read these")
    notice = page.get_by_role("alert").filter(has_text="File rejected")
    expect(notice).to_contain_text("eicar.txt")
    expect(page.locator(".file-chip.rejected")).to_contain_text("eicar.txt")
    # Nothing was sent: the message is back in the box, no turn was kept.
    expect(page.get_by_label("Message", exact=True)).to_have_value("read these")
    expect(page.locator(".turn")).to_have_count(0)
    screenshot(page, "desktop-rejected-file")

    page.get_by_role("button", name="Remove eicar.txt").click()
    page.get_by_role("button", name="Send").click()
    turn = page.locator(".turn").last
    expect(turn).to_have_attribute("data-state", "completed")
    expect(turn.locator(".attachment")).to_contain_text("scanned, clean")
    expect(page.get_by_role("alert").filter(has_text="File rejected")).to_be_hidden()


def test_a_cut_connection_resumes_without_losing_or_repeating_text(
    kdcube: Start, new_page: NewPage
) -> None:
    server = kdcube()
    prompt = " ".join(f"word{n}" for n in range(1, 25))
    with cutter_for(server.url) as cutter:
        page = new_page()
        sign_in(page, f"{cutter.url}/?bundle=tortoise")
        send(page, prompt)
        turn = page.locator(".turn").last
        expect(turn.locator(".answer")).to_contain_text("word2 ")

        cutter.cut(refuse=True)
        expect(
            page.get_by_role("status").filter(has_text="Reconnecting")
        ).to_be_visible()
        expect(page.get_by_text("Connection lost")).to_be_visible()
        screenshot(page, "desktop-reconnecting")
        cutter.restore()

        expect(page.locator("#connection")).to_have_text("Connected")
        expect(turn).to_have_attribute("data-state", "completed", timeout=20_000)
        # Exactly the prompt: every piece once, none twice.
        assert last_answer(page) == prompt
        assert cutter.cuts == 1


def test_going_offline_mid_answer_resumes_with_the_full_text(
    kdcube: Start, new_page: NewPage
) -> None:
    server = kdcube()
    prompt = " ".join(f"piece{n}" for n in range(1, 25))
    page = new_page()
    sign_in(page, f"{server.url}/?bundle=tortoise")
    send(page, prompt)
    turn = page.locator(".turn").last
    expect(turn.locator(".answer")).to_contain_text("piece2 ")

    page.context.set_offline(True)
    expect(page.locator("#connection")).to_have_text(re.compile("reconnecting", re.I))
    page.context.set_offline(False)
    expect(turn).to_have_attribute("data-state", "completed", timeout=20_000)
    assert last_answer(page) == prompt


def test_the_page_fits_a_phone(kdcube: Start, new_page: NewPage) -> None:
    server = kdcube()
    page = new_page(viewport=PHONE, is_mobile=True, has_touch=True)
    page.goto(server.url)
    screenshot(page, "phone-sign-in")
    sign_in(page, f"{server.url}/?bundle=showcase")
    send(page, "a question from a phone")
    expect(page.locator(".turn").last).to_have_attribute("data-state", "completed")
    # Nothing is wider than the screen.
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"]
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    screenshot(page, "phone-answer")

    menu = page.get_by_role("button", name="Conversations")
    menu.click()
    expect(page.get_by_role("button", name="New conversation")).to_be_in_viewport()
    expect(page.locator("#sidebar")).to_have_css("transform", "none")
    screenshot(page, "phone-conversations")
    page.locator(".conversation").first.click()
    expect(page.get_by_role("button", name="New conversation")).not_to_be_in_viewport()


def test_rate_limited_prompts_say_how_long_to_wait(
    kdcube: Start, new_page: NewPage, tmp_path: Path
) -> None:
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(
        "rate_limits:\n  registered: {hourly: 100, burst: 3, burst_window: 60}\n"
    )
    server = kdcube(KDCUBE_GATEWAY_CONFIG=str(gateway))
    page = new_page()
    sign_in(page, server.url)
    notice = page.get_by_role("alert").filter(has_text="too quickly")
    # Reads (the conversation list) count too, so the second or third
    # message meets the limit.
    for n in range(4):
        send(page, f"message {n}")
        answered = page.locator(".turn[data-state=completed]", has_text=f"message {n}")
        expect(notice.or_(answered)).to_be_visible()
        if notice.is_visible():
            break
    expect(notice).to_contain_text(re.compile(r"Try again in \d+ seconds?"))
    expect(page.get_by_label("Message", exact=True)).to_have_value(
        re.compile(r"message \d")
    )
