"""The web console in a real headless Chromium against a real gateway (real engines, SQLite
store, Redis): sign-in and sign-out with the session's cookie flags, and each page working
without a script error at desktop and phone widths. Screenshots of every page are kept as test
artifacts."""

from __future__ import annotations

from collections.abc import Callable

from gateway.console import PAGES
from gateway.http.sessions import SESSION_COOKIE
from tests.browser import PHONE, Console
from tests.e2e.conftest import API_KEY, Gateway


def test_sign_in_and_out_with_a_hardened_cookie(gateway: Gateway,
                                                console: Callable[..., Console]) -> None:
    tab = console(gateway.url)
    tab.open("usage")
    assert tab.page.url.endswith("/console/login?next=/console/usage")
    tab.page.fill("#key", API_KEY + "-wrong")
    tab.page.click("button[type=submit]")
    assert "not valid" in tab.page.inner_text("p.error")
    tab.sign_in(API_KEY)
    [cookie] = [c for c in tab.page.context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert tab.page.evaluate("document.cookie") == ""  # out of scripts' reach
    tab.sign_out()
    tab.open("overview")
    assert "/console/login" in tab.page.url


def test_every_page_opens_without_errors_on_a_desktop_and_a_phone(
        gateway: Gateway, console: Callable[..., Console]) -> None:
    for name, viewport in (("desktop", None), ("phone", PHONE)):
        tab = console(gateway.url, viewport)
        tab.sign_in(API_KEY)
        for slug, page in PAGES.items():
            tab.open(slug)
            assert tab.page.title().startswith(page.title)
            tab.page.wait_for_load_state("networkidle")
            # Every page's content fits the width: nothing but tables scrolls sideways.
            assert tab.page.evaluate(
                "document.documentElement.scrollWidth <= window.innerWidth + 1"), slug
            tab.screenshot(f"{slug}-{name}")
