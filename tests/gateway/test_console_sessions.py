"""The console's sign-in, in process (real SQLite store and Redis): a session cookie with the
right flags, CSRF on the sign-in form and on every state-changing API call made with the
cookie, the API's own rules for what the session's key may do, and a session that ends for good
at sign-out or when its key is revoked."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.console.app import CSP
from gateway.http.sessions import SESSION_COOKIE
from llmops.settings import Settings
from tests.databases import REDIS_URL, in_process_gateway

ADMIN = "sk-unit-console"
DEAD = "http://127.0.0.1:9"  # no engine is called
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in process, called with the admin key (to set tenants and keys up)."""
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_url=REDIS_URL, redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"}, key_cache_ttl_s=0,
                        models=[{"name": "chat", "kind": "chat",
                                 "pools": [{"device": "cpu", "urls": [DEAD]}]}])
    app = create_app(settings)
    async with in_process_gateway(settings, ADMIN, app) as client:
        yield client


def browser(admin: httpx.AsyncClient, scheme: str = "http") -> httpx.AsyncClient:
    """A cookie-keeping client on the same app, without the admin's key."""
    return httpx.AsyncClient(transport=admin._transport, base_url=f"{scheme}://gw")


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    form = await client.get("/console/login")
    [csrf] = CSRF_FIELD.findall(form.text)
    return await client.post("/console/login", data={"key": key, "csrf": csrf})


async def page_csrf(client: httpx.AsyncClient, page: str = "overview") -> str:
    resp = await client.get(f"/console/{page}")
    assert resp.status_code == 200, resp.text
    [token] = CSRF_META.findall(resp.text)
    return token


async def member_key(admin: httpx.AsyncClient) -> tuple[str, str]:
    tenant = (await admin.post("/admin/tenants", json={"name": "acme"})).json()
    key = (await admin.post("/admin/keys", json={"tenant_id": tenant["id"]})).json()
    return key["key"], key["id"]


async def test_signing_in_sets_a_hardened_session_cookie(admin: httpx.AsyncClient) -> None:
    async with browser(admin) as client:
        resp = await sign_in(client, ADMIN)
        assert resp.status_code == 303 and resp.headers["location"] == "/console/overview"
        cookie = next(c for c in resp.headers.get_list("set-cookie")
                      if c.startswith(f"{SESSION_COOKIE}="))
        flags = {f.strip().split("=")[0].lower() for f in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "path", "max-age"} <= flags
        assert "samesite=strict" in cookie.lower() and "path=/;" in cookie.lower() + ";"
        assert "secure" not in flags  # plain HTTP: a Secure cookie would never come back
        page = await client.get("/console/overview")
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
    async with browser(admin, "https") as client:
        resp = await sign_in(client, ADMIN)
        cookie = next(c for c in resp.headers.get_list("set-cookie")
                      if c.startswith(f"{SESSION_COOKIE}="))
        assert "secure" in cookie.lower().split("; ")


async def test_sign_in_refuses_a_wrong_key_and_a_form_without_its_token(
        admin: httpx.AsyncClient) -> None:
    async with browser(admin) as client:
        resp = await sign_in(client, ADMIN + "x")
        assert resp.status_code == 401 and "not valid" in resp.text
        assert SESSION_COOKIE not in resp.cookies
        await client.get("/console/login")
        forged = await client.post("/console/login", data={"key": ADMIN, "csrf": "guess"})
        assert forged.status_code == 403 and SESSION_COOKIE not in forged.cookies
    async with browser(admin) as client:  # a cross-site form has no login cookie at all
        forged = await client.post("/console/login", data={"key": ADMIN, "csrf": ""})
        assert forged.status_code == 403


async def test_pages_need_a_session_and_sign_in_returns_only_to_the_console(
        admin: httpx.AsyncClient) -> None:
    async with browser(admin) as client:
        resp = await client.get("/console/usage")
        assert resp.status_code == 303
        assert resp.headers["location"] == "/console/login?next=/console/usage"
        form = await client.get("/console/login", params={"next": "//evil.example/x"})
        [csrf] = CSRF_FIELD.findall(form.text)
        resp = await client.post("/console/login", data={
            "key": ADMIN, "csrf": csrf, "next": "https://evil.example/"})
        assert resp.headers["location"] == "/console/overview"


async def test_the_session_calls_the_api_and_changes_need_the_csrf_token(
        admin: httpx.AsyncClient) -> None:
    async with browser(admin) as client:
        await sign_in(client, ADMIN)
        assert (await client.get("/v1/models")).status_code == 200
        refused = await client.post("/admin/tenants", json={"name": "no-token"})
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "permission_denied" and "CSRF" in error["message"]
        token = await page_csrf(client)
        wrong = await client.post("/admin/tenants", json={"name": "bad"},
                                  headers={"x-csrf-token": token[:-1]})
        assert wrong.status_code == 403
        made = await client.post("/admin/tenants", json={"name": "with-token"},
                                 headers={"x-csrf-token": token})
        assert made.status_code == 201
    names = [t["name"] for t in (await admin.get("/admin/tenants")).json()["data"]]
    assert names.count("with-token") == 1 and "no-token" not in names and "bad" not in names


async def test_a_member_session_gets_the_api_rules_of_its_key(admin: httpx.AsyncClient) -> None:
    key, _ = await member_key(admin)
    async with browser(admin) as client:
        await sign_in(client, key)
        token = await page_csrf(client)
        assert (await client.get("/console/tenants")).status_code == 404  # like a missing page
        resp = await client.get("/admin/tenants")
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "permission_denied"
        resp = await client.post("/admin/tenants", json={"name": "x"},
                                 headers={"x-csrf-token": token})
        assert resp.status_code == 403


async def test_a_stolen_cookie_stops_working_after_sign_out(admin: httpx.AsyncClient) -> None:
    async with browser(admin) as client:
        await sign_in(client, ADMIN)
        stolen = client.cookies[SESSION_COOKIE]
        token = await page_csrf(client)
        out = await client.post("/console/logout", data={"csrf": token})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
    async with browser(admin) as thief:
        thief.cookies.set(SESSION_COOKIE, stolen)
        resp = await thief.get("/v1/models")
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert (await thief.get("/console/overview")).status_code == 303


async def test_sign_out_needs_the_page_token(admin: httpx.AsyncClient) -> None:
    async with browser(admin) as client:
        await sign_in(client, ADMIN)
        assert (await client.post("/console/logout", data={"csrf": "x"})).status_code == 403
        assert (await client.get("/v1/models")).status_code == 200


async def test_revoking_the_key_ends_its_sessions(admin: httpx.AsyncClient) -> None:
    key, key_id = await member_key(admin)
    async with browser(admin) as client:
        await sign_in(client, key)
        assert (await client.get("/v1/models")).status_code == 200
        await admin.post(f"/admin/keys/{key_id}/revoke")
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/console/overview")).status_code == 303

