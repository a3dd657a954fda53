"""A real headless Chromium (Debian's, installed by `make browser`) driven by Playwright, for the
console's tests: a fresh browser context per test, a page that fails its test on any JavaScript
error or CSP violation, sign-in with an API key, and screenshots kept as test artifacts (under
`$LLMOPS_ARTIFACTS`, default `artifacts/`)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Page, sync_playwright

CHROMIUM = os.environ.get("LLMOPS_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LLMOPS_ARTIFACTS", "artifacts")) / "console"
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# offline machine refuses; as root it needs --no-sandbox.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


class Console:
    """One browser tab on a gateway's console, collecting what went wrong in it."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url.rstrip("/")
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)
        page.set_default_timeout(15_000)

    def _console(self, message: ConsoleMessage) -> None:
        # 4xx answers the page expected (and showed) are not script errors.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    def open(self, path: str) -> Page:
        self.page.goto(f"{self.base_url}/console/{path.lstrip('/')}")
        return self.page

    def sign_in(self, key: str) -> Page:
        self.open("login")
        self.page.fill("#key", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r"/console/overview$"))
        return self.page

    def sign_out(self) -> None:
        self.page.click("header form.who button[type=submit]")
        self.page.wait_for_url(re.compile(r"/console/login$"))

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@pytest.fixture
def console() -> Iterator[Callable[..., Console]]:
    """Opens console tabs (`console(base_url, viewport=...)`), each in a new cookie-less
    context; the test fails if any of them saw a JavaScript error.

    Playwright's sync API runs an event loop in this thread while it is open, so it lives only
    as long as one test: left open, it would break every asyncio test after it."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `make browser`"
    opened: list[Console] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)

        def open_tab(base_url: str, viewport: dict[str, int] | None = None) -> Console:
            context = browser.new_context(viewport=viewport or DESKTOP)  # type: ignore[arg-type]
            opened.append(Console(context.new_page(), base_url))
            return opened[-1]

        try:
            yield open_tab
        finally:
            browser.close()
    errors = [e for tab in opened for e in tab.errors]
    assert not errors, f"JavaScript errors in the console: {errors}"
