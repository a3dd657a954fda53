"""The console's own routes: sign-in and sign-out, the pages' HTML and their static assets.

Everything a page shows or changes goes through the API (`/v1`, `/admin`) from the page's
script, authenticated by the session cookie (`gateway.http.auth`). This app only decides who may
see which page, and sends the headers that keep the pages safe: a strict Content-Security-Policy
(no inline script or style, nothing from another origin), no framing, no caching of pages."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http.sessions import SESSION_COOKIE, Session, Sessions
from llmops.errors import APIError
from llmops.settings import ConsoleConfig
from tenancy import Principal
from tenancy.auth import Authenticator
from tenancy.tenants import hash_key

__all__ = ["CONSOLE_PATH", "PAGES", "Page", "console_app"]

CONSOLE_PATH = "/console"
LOGIN_COOKIE = "llmops_login"  # the sign-in form's CSRF token (double submit: no session yet)
_KEY_MAX = 512  # a longer "key" is not one of ours


@dataclass(frozen=True)
class Page:
    slug: str
    title: str
    admin_only: bool = False


PAGES = {p.slug: p for p in (
    Page("overview", "Overview"),
    Page("tenants", "Tenants and keys", admin_only=True),
    Page("usage", "Usage"),
    Page("fine-tuning", "Fine-tuning"),
    Page("vector-stores", "Vector stores"),
    Page("evals", "Evals"),
    Page("playground", "Playground"),
)}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
_SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}


class _SecurityHeaders:
    """Every console response gets the security headers; pages (not assets) are never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(f"{CONSOLE_PATH}/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS.items():
                    headers[name] = value
                headers["cache-control"] = ("public, max-age=86400, immutable" if static
                                            else "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _asset_version(root: Path) -> str:
    """A digest of the shipped assets: their URLs change whenever they do (safe to cache)."""
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def console_app(auth: Authenticator, sessions: Sessions, config: ConsoleConfig) -> ASGIApp:
    root = Path(str(files("gateway.console")))
    static = root / "static"
    version = _asset_version(static)
    templates = Environment(loader=FileSystemLoader(root / "templates"),
                            autoescape=select_autoescape(default=True, default_for_string=True))

    def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(
            base=CONSOLE_PATH, version=version, pages=PAGES.values(), **context)
        return HTMLResponse(html, status_code=status)

    def secure(request: Request) -> bool:
        return config.secure_cookie if config.secure_cookie is not None \
            else request.url.scheme == "https"

    def login_form(request: Request, error: str | None = None, status: int = 200
                   ) -> Response:
        token = secrets.token_urlsafe(32)
        response = render("login.html", status, csrf=token, error=error,
                          next=_safe_next(request.query_params.get("next")))
        response.set_cookie(LOGIN_COOKIE, token, max_age=600, path=f"{CONSOLE_PATH}/login",
                            httponly=True, samesite="strict", secure=secure(request))
        return response

    async def login_page(request: Request) -> Response:
        if await _signed_in(request) is not None:
            return RedirectResponse(f"{CONSOLE_PATH}/overview", status_code=303)
        return login_form(request)

    async def login(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=8)
        sent, expected = str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            return login_form(request, "The sign-in form expired; please try again.", 403)
        key = str(form.get("key", "")).strip()
        try:
            principal = await auth.resolve(key) if 0 < len(key) <= _KEY_MAX else None
        except APIError as exc:  # the key store is down
            return login_form(request, exc.message, exc.status)
        if principal is None:
            return login_form(request, "That API key is not valid (unknown, revoked or "
                                       "expired).", 401)
        token, _ = await sessions.start(hash_key(key))
        target = _safe_next(str(form.get("next", ""))) or f"{CONSOLE_PATH}/overview"
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(LOGIN_COOKIE, path=f"{CONSOLE_PATH}/login")
        response.set_cookie(SESSION_COOKIE, token, max_age=int(sessions.ttl_s), path="/",
                            httponly=True, samesite="strict", secure=secure(request))
        return response

    async def logout(request: Request) -> Response:
        session = await sessions.of(request)
        form = await request.form(max_files=0, max_fields=4)
        if session is not None and not session.csrf_matches(str(form.get("csrf", ""))):
            return HTMLResponse("Sign-out needs the page's CSRF token.", status_code=403)
        await sessions.end(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse(f"{CONSOLE_PATH}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=secure(request))
        return response

    async def _signed_in(request: Request) -> tuple[Session, Principal] | None:
        session = await sessions.of(request)
        if session is None:
            return None
        principal = await auth.by_digest(session.key_digest)
        return None if principal is None else (session, principal)

    async def page(request: Request) -> Response:
        slug = request.path_params["page"]
        found = await _signed_in(request)
        if found is None:
            return RedirectResponse(
                f"{CONSOLE_PATH}/login?next={quote(f'{CONSOLE_PATH}/{slug}')}", status_code=303)
        session, principal = found
        entry = PAGES.get(slug)
        if entry is None or (entry.admin_only and not principal.is_admin):
            return render("missing.html", 404, page=None, principal=principal,
                          csrf=session.csrf)  # an admin page looks missing to a member
        return render(f"{slug}.html", page=entry, principal=principal, csrf=session.csrf)

    async def home(_: Request) -> Response:
        return RedirectResponse(f"{CONSOLE_PATH}/overview", status_code=303)

    app = Starlette(routes=[
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=static), name="static"),
        Route("/{page:str}", page, methods=["GET"]),
    ])
    return _SecurityHeaders(app)


def _safe_next(target: str | None) -> str | None:
    """Only a console page may be the place sign-in returns to (no open redirect)."""
    if not target or not target.startswith(f"{CONSOLE_PATH}/") or "//" in target \
            or "\\" in target or any(c < " " for c in target):
        return None
    return target
