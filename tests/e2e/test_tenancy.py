"""Tenants and keys through the admin API and the CLI, against the real gateway and vLLM:
key lifecycle, roles, model allow-lists, usage and spend."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL
from tests.e2e.conftest import Gateway

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def admin(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as client:
        yield client


def new_key(admin: httpx.Client, **fields: Any) -> dict[str, Any]:
    tenant = admin.post("/admin/tenants", json={"name": f"team-{uuid.uuid4().hex[:8]}"})
    assert tenant.status_code == 201, tenant.text
    key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"], **fields})
    assert key.status_code == 201, key.text
    return dict(key.json())


def chat(gateway: Gateway, key: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})


def test_key_is_shown_once_and_stored_hashed(admin: httpx.Client) -> None:
    created = new_key(admin, name="ci")
    assert created["key"].startswith(created["prefix"]) and created["key"].startswith("sk-")
    listed = admin.get("/admin/keys", params={"tenant_id": created["tenant_id"]}).json()
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert "key" not in listed["data"][0]
    assert created["key"] not in admin.get(f"/admin/keys/{created['id']}").text


def test_key_lifecycle_create_use_revoke(gateway: Gateway, admin: httpx.Client) -> None:
    created = new_key(admin)
    assert chat(gateway, created["key"]).status_code == 200
    assert admin.post(f"/admin/keys/{created['id']}/revoke").status_code == 200
    refused = chat(gateway, created["key"])
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_key_expires(gateway: Gateway, admin: httpx.Client) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=3)
    created = new_key(admin, expires_at=expires.isoformat())
    assert chat(gateway, created["key"]).status_code == 200
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    assert chat(gateway, created["key"]).status_code == 401


def test_disabled_tenant_keys_stop_working(gateway: Gateway, admin: httpx.Client) -> None:
    created = new_key(admin)
    assert admin.post(f"/admin/tenants/{created['tenant_id']}/disable").status_code == 200
    assert chat(gateway, created["key"]).status_code == 401


def test_member_keys_cannot_use_the_admin_api(gateway: Gateway, admin: httpx.Client) -> None:
    member = new_key(admin)["key"]
    for method, path in (("GET", "/admin/tenants"), ("POST", "/admin/keys"),
                         ("GET", "/admin/usage")):
        resp = httpx.request(method, f"{gateway.url}{path}", json={},
                             headers={"Authorization": f"Bearer {member}"})
        assert resp.status_code == 403, path
        assert resp.json()["error"]["code"] == "permission_denied"
    second_admin = new_key(admin, role="admin")["key"]
    resp = httpx.get(f"{gateway.url}/admin/tenants",
                     headers={"Authorization": f"Bearer {second_admin}"})
    assert resp.status_code == 200
    assert httpx.get(f"{gateway.url}/admin/tenants").status_code == 401


def test_model_allow_list_hides_other_models(gateway: Gateway, admin: httpx.Client) -> None:
    key = new_key(admin, models=[EMBEDDING_MODEL])["key"]
    headers = {"Authorization": f"Bearer {key}"}
    denied = chat(gateway, key)
    assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found"
    unknown = chat(gateway, key, {**CHAT, "model": "no-such-model"})
    assert unknown.json()["error"]["message"].replace("no-such-model", CHAT_MODEL) == \
        denied.json()["error"]["message"]  # the same answer as for a model that is absent
    listed = httpx.get(f"{gateway.base_url}/models", headers=headers).json()["data"]
    assert [m["id"] for m in listed] == [EMBEDDING_MODEL]
    embedded = httpx.post(f"{gateway.base_url}/embeddings", headers=headers,
                          json={"model": EMBEDDING_MODEL, "input": "hello"})
    assert embedded.status_code == 200


def test_admin_input_is_validated(admin: httpx.Client) -> None:
    bad = admin.post("/admin/keys", json={"tenant_id": "ten_x", "role": "root"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"
    missing = admin.post("/admin/keys", json={"tenant_id": "ten_missing"})
    assert missing.status_code == 404
    name = f"dup-{uuid.uuid4().hex[:6]}"
    assert admin.post("/admin/tenants", json={"name": name}).status_code == 201
    assert admin.post("/admin/tenants", json={"name": name}).status_code == 409


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                                  "/tokenize", "/detokenize", "/sleep", "/wake_up",
                                  "/v1/tokenize", "/collective_rpc", "/reset_prefix_cache"])
def test_vllm_admin_routes_are_not_reachable(gateway: Gateway, path: str) -> None:
    resp = httpx.post(f"{gateway.url}{path}", headers=gateway.headers,
                      json={"lora_name": "x", "lora_path": "/tmp"})
    assert resp.status_code == 404


def wait_for_usage(admin: httpx.Client, requests: int, **params: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        rows: list[dict[str, Any]] = admin.get("/admin/usage", params=params).json()["data"]
        done = sum(r["requests"] - r["unfinished"] for r in rows)
        if done >= requests or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_usage_and_spend_per_key_and_model(gateway: Gateway, admin: httpx.Client) -> None:
    created = new_key(admin)
    price = admin.put(f"/admin/prices/{CHAT_MODEL}",
                      json={"input_per_mtok": 2.0, "output_per_mtok": 6.0})
    assert price.status_code == 200
    usages = [chat(gateway, created["key"]).json()["usage"] for _ in range(3)]
    rows = wait_for_usage(admin, 3, key_id=created["id"], group_by="key_id,model")
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["requests"]) == (CHAT_MODEL, 3)
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["cost_usd"] == pytest.approx((prompt * 2.0 + completion * 6.0) / 1e6)
    by_tenant = wait_for_usage(admin, 3, tenant_id=created["tenant_id"], period="day")
    assert by_tenant[0]["requests"] == 3 and by_tenant[0]["period"]
    assert by_tenant[0]["device_seconds"] > 0
    admin.put(f"/admin/prices/{CHAT_MODEL}", json={"input_per_mtok": 0, "output_per_mtok": 0})


def test_cli_creates_keys_and_reports_usage(gateway: Gateway) -> None:
    env = {**os.environ, "LLMOPS_CONFIG": str(gateway.config)}
    name = f"cli-{uuid.uuid4().hex[:6]}"

    def llmops(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "llmops.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    llmops("tenants", "create", name, "--rpm", "100")
    out = llmops("keys", "create", "--tenant", name, "--models", f"{CHAT_MODEL}*",
                 "--rpm", "5")
    key = out.split("key (shown once, store it now): ")[1].strip()
    assert chat(gateway, key).status_code == 200
    assert name in llmops("tenants", "list")
    deadline = time.monotonic() + 20
    while True:
        report = llmops("usage", "--tenant", name, "--group-by", "model").splitlines()
        if len(report) == 2:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.3)
    assert report[0].split()[:2] == ["model", "requests"]
    assert report[1].split()[:2] == [CHAT_MODEL, "1"]
