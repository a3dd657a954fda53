"""The web console under `/console`: server-rendered pages whose scripts call the public API
with the signed-in session, so the console follows every rule the API does."""

from gateway.console.app import CONSOLE_PATH, PAGES, console_app

__all__ = ["CONSOLE_PATH", "PAGES", "console_app"]
