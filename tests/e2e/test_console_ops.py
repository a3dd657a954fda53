"""The console's operations pages in a real headless Chromium against the session gateway (real
vLLM CPU engines, SQLite, Redis): an admin creates, edits and disables tenants and creates and
revokes keys; the usage page shows what the ledger holds; the overview shows the engines; a
member sees only its own tenant; names are shown as text, never run."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Dialog, expect

from llmops.cli.stack import CHAT_MODEL
from tests.browser import Console
from tests.e2e.conftest import API_KEY, Gateway, wait_until

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4}


@pytest.fixture
def admin(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as client:
        yield client


def _docs_copy(tab: Console, slug: str) -> None:
    """The screenshot the docs site shows: the first screen only, kept small."""
    path = tab.screenshot(f"{slug}-docs", full_page=False)
    shutil.copyfile(path, f"docs/console/{slug}.png")


def _cells(tab: Console, container: str) -> list[dict[str, str]]:
    """The rows of the table in `container`, as {column header: cell text}."""
    rows: list[dict[str, str]] = tab.page.evaluate("""(sel) => {
        const t = document.querySelector(`${sel} table`);
        const heads = [...t.querySelectorAll("thead th")].map((th) => th.textContent);
        return [...t.querySelectorAll("tbody tr")].map((tr) => Object.fromEntries(
            [...tr.children].map((td, i) => [heads[i], td.textContent])));
    }""", container)
    return rows


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("$", ""))


def test_an_admin_manages_tenants_and_keys_and_a_revoked_key_stops_working(
        gateway: Gateway, console: Callable[..., Console]) -> None:
    tab = console(gateway.url)
    tab.sign_in(API_KEY)
    tab.open("tenants")
    page = tab.page
    name = f"team-{uuid.uuid4().hex[:6]}"
    page.fill("#nt-name", name)
    page.fill("#nt-rpm", "600")
    page.click("#new-tenant button[type=submit]")
    expect(page.locator("#tenant-h")).to_have_text(f"Tenant {name}")
    expect(page.locator("#et-rpm")).to_have_value("600")

    # The API validates the guardrail policy; its error names the field.
    page.fill("#et-guardrails", '{"max_messages": -1}')
    page.click("#edit-tenant button[type=submit]")
    expect(page.locator("#alerts .alert.error")).to_contain_text("max_messages")
    page.fill("#et-guardrails", '{"max_messages": 20}')
    page.fill("#et-tpm", "50000")
    page.click("#edit-tenant button[type=submit]")
    expect(page.locator("#alerts .alert.ok").last).to_contain_text("saved")
    tenant_id = page.locator("#tenants tr", has_text=name).locator("code").inner_text()
    stored = httpx.get(f"{gateway.url}/admin/tenants/{tenant_id}", headers=gateway.headers
                       ).json()
    assert (stored["rpm_limit"], stored["tpm_limit"], stored["guardrails"]) == (
        600, 50000, {"max_messages": 20})

    page.fill("#nk-name", "deploy-bot")
    page.click("#new-key button[type=submit]")
    plain = page.locator("#new-key-value").inner_text()  # shown once
    assert plain.startswith("sk-")
    models = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {plain}"})
    assert models.status_code == 200
    page.click(".keybox button:has-text('Dismiss')")
    expect(page.locator("#new-key-value")).to_have_count(0)
    row = page.locator("#keys tr", has_text="deploy-bot")
    expect(row).to_contain_text("active")
    revoke = row.locator("button.danger")
    revoke.click()
    expect(revoke).to_have_text("Confirm revoke")  # asks once more, without a dialog
    revoke.click()
    expect(page.locator("#keys tr", has_text="deploy-bot")).to_contain_text("revoked")
    denied = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {plain}"})
    assert denied.status_code == 401
    tab.screenshot("tenants")
    _docs_copy(tab, "tenants")


def test_usage_and_overview_show_the_ledgers_numbers_and_a_member_only_its_own(
        gateway: Gateway, admin: httpx.Client, console: Callable[..., Console]) -> None:
    tenant = admin.post("/admin/tenants", json={"name": f"usage-{uuid.uuid4().hex[:6]}",
                                                "budget_usd": 5}).json()
    other = admin.post("/admin/tenants", json={"name": f"other-{uuid.uuid4().hex[:6]}"}).json()
    created = admin.post("/admin/keys", json={"tenant_id": tenant["id"], "name": "app"}).json()
    key = created["key"]
    for _ in range(3):
        answer = httpx.post(f"{gateway.base_url}/chat/completions", json=CHAT, timeout=60,
                            headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text

    def settled() -> dict[str, Any] | None:
        rows = admin.get("/admin/usage", params={"group_by": "model",
                                                 "tenant_id": tenant["id"]}).json()["data"]
        done = rows and rows[0]["requests"] == 3 and rows[0]["unfinished"] == 0
        return rows[0] if done else None

    ledger = wait_until(settled, 30, "the three requests in the ledger")

    tab = console(gateway.url)
    tab.sign_in(API_KEY)
    tab.open("usage")
    page = tab.page
    expect(page.locator("#u-tenant option", has_text=tenant["name"])).to_have_count(1)
    page.select_option("#u-tenant", tenant["id"])
    page.select_option("#u-group", "model")
    page.select_option("#u-period", label="whole range")
    page.click("#usage-form button[type=submit]")
    expect(page.locator("#usage-table tbody tr")).to_have_count(1)
    [row] = _cells(tab, "#usage-table")
    assert row["Model"] == CHAT_MODEL
    assert _num(row["Requests"]) == ledger["requests"] == 3
    assert _num(row["Prompt tokens"]) == ledger["prompt_tokens"] > 0
    assert _num(row["Completion tokens"]) == ledger["completion_tokens"] > 0
    bar = page.locator("#usage-chart .bar-row")
    assert _num(bar.get_attribute("data-value") or "") == (
        ledger["prompt_tokens"] + ledger["completion_tokens"])
    with page.expect_download() as download:
        page.click("#u-csv")
    csv = download.value.path().read_text().splitlines()
    assert csv[0].startswith("model,requests,") and csv[1].startswith(f"{CHAT_MODEL},3,")
    page.select_option("#u-tenant", label="all")
    page.select_option("#u-group", "tenant_id")
    page.select_option("#u-period", "day")
    page.click("#usage-form button[type=submit]")
    expect(page.locator("#usage-table tbody tr", has_text=tenant["name"])).to_have_count(1)
    tab.screenshot("usage")
    _docs_copy(tab, "usage")

    # The overview: the engines as routing sees them, the tenant's requests and its budget.
    tab.open("overview")
    engine = page.locator(f".engine[data-model='{CHAT_MODEL}']")
    expect(engine.locator("h3 .badge.healthy")).to_contain_text("healthy")
    expect(engine.locator("tbody tr").first).to_contain_text("closed")
    tenant_row = page.locator("#by-tenant tr", has_text=tenant["name"])
    expect(tenant_row).to_have_count(1)
    assert _num(_cell(tab, "#by-tenant", tenant["name"], "Requests today")) == 3
    expect(page.locator("#budgets tr", has_text=tenant["name"])).to_contain_text("$5.00")
    tab.screenshot("overview")
    _docs_copy(tab, "overview")

    # A member: its own tenant's usage whatever it asks for, no admin page, no other tenant.
    member = console(gateway.url)
    member.sign_in(key)
    assert member.page.goto(f"{gateway.url}/console/tenants").status == 404  # type: ignore[union-attr]
    member.open("usage")
    page = member.page
    expect(page.locator("#u-tenant")).to_have_count(0)
    expect(page.locator("#usage-table tbody tr")).to_have_count(1)
    asked: dict[str, Any] = page.evaluate("""async (other) => {
        const usage = await fetch(`/v1/usage?group_by=tenant_id&tenant_id=${other}`);
        const object = await fetch(`/admin/tenants/${other}`);
        return {usage: await usage.json(), object: object.status};
    }""", other["id"])
    assert [r["tenant_id"] for r in asked["usage"]["data"]] == [tenant["id"]]
    assert asked["object"] == 403
    member.open("overview")
    expect(page.locator("[data-stat=requests-month] b")).to_have_text("3")
    expect(page.locator("#engines")).to_have_count(0)  # engines are operators' business


def _cell(tab: Console, container: str, row_text: str, column: str) -> str:
    rows = [r for r in _cells(tab, container) if any(row_text in v for v in r.values())]
    assert len(rows) == 1, rows
    return rows[0][column]


def test_a_tenant_named_like_a_script_is_shown_as_text(
        gateway: Gateway, console: Callable[..., Console]) -> None:
    tab = console(gateway.url)
    dialogs: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    tab.page.on("dialog", dismiss)
    tab.sign_in(API_KEY)
    tab.open("tenants")
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    tab.page.fill("#nt-name", evil)
    tab.page.click("#new-tenant button[type=submit]")
    expect(tab.page.locator("#tenant-h")).to_have_text(f"Tenant {evil}")
    expect(tab.page.locator("#tenants td", has_text=evil)).to_have_count(1)
    for slug in ("overview", "usage", "tenants"):
        tab.open(slug)
        tab.page.wait_for_load_state("networkidle")
        assert tab.page.locator("main script, main img").count() == 0, slug
    assert dialogs == []
