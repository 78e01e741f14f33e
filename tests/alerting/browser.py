"""Driving the console in Debian's chromium with Playwright, for the console's tests: the
browser settings, a tab that fails the test on any script error, and small waits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.alerting.harness import PASSWORD, Hotline
from tests.alerting.helpers import query

CHROMIUM = Path("/usr/bin/chromium")
# the marks of a browser test module
BROWSER_TEST = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"Debian's chromium is not installed at {CHROMIUM} (scripts/services installs it)",
    ),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
LIVE = 10_000  # ms to wait for something that comes through the outbox and the live feed
T = TypeVar("T")


def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a thread of its own: while the browser is open, Playwright's sync API keeps
    an event loop running in this thread, where asyncio.run refuses to start."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def eventually(check: Callable[[], T], timeout: float = 10.0) -> T:
    """``check()`` once it is truthy, or its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def ticket_of(database: str, household: str) -> int:
    found = eventually(
        lambda: query(database, "SELECT id FROM tickets WHERE household_id = %s", (household,))
    )
    assert found, f"no ticket for {household}: the outbox was not taken"
    return int(found[0][0])


class Console:
    """One browser tab on the hotline, failing the test on any uncaught script error."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def fill_login(self, username: str) -> None:
        self.page.get_by_test_id("login-username").fill(username)
        self.page.get_by_test_id("login-password").fill(PASSWORD)
        self.page.get_by_test_id("login-submit").click()

    def sign_in(self, username: str) -> Page:
        """Open the console, sign in, and wait until the live feed is connected."""
        self.page.goto(self.url)
        expect(self.page.get_by_test_id("queue")).to_be_hidden()  # nothing shown before signing in
        self.fill_login(username)
        expect(self.page.get_by_test_id("live-status")).to_have_text("live", timeout=LIVE)
        return self.page


@pytest.fixture
def console(hotline: Hotline) -> Iterator[Console]:
    """A browser per test, started once the database is set up: the setup helpers call
    asyncio.run, which cannot run beside Playwright's loop (so no module-wide browser)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.set_default_timeout(5_000)
            tab = Console(context.new_page(), hotline.url)
            yield tab
        finally:
            browser.close()
    assert not tab.errors, f"the page threw: {tab.errors}"
