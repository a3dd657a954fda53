"""Security of a real gateway process (uvicorn, SQLite store, the shared Redis, over the FAKE
vLLM upstream): every route refuses a missing, wrong or malformed key, admin routes refuse a
member key, one tenant cannot see or touch another's files, fine-tuning jobs, vector stores
or usage, injected header bytes go nowhere, oversized and deeply nested JSON is refused
quickly, file names cannot reach the file system, and keys never show in logs or metrics."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from fastapi.routing import APIRoute

from gateway.app import create_app
from llmops.settings import Settings
from tests.reliability.stack import ADMIN_KEY, CHAT, EMBED, GatewayProcess, report
from tests.reliability.test_fuzz import error_shape_problem

# Public on purpose: liveness, readiness and the scrape endpoint (which has its own token).
PUBLIC = {"/healthz", "/readyz", "/metrics"}
WRONG_KEYS = ["sk-wrong-0000000000000000", ADMIN_KEY + "x", ADMIN_KEY[:-1], ADMIN_KEY.upper(),
              "sk-" + "A" * 4096]
TRAINING = b"".join(json.dumps({"messages": [
    {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
).encode() + b"\n" for i in range(12))


def routes(gateway: GatewayProcess) -> list[tuple[str, str]]:
    """(method, path) of every API route the gateway serves, path parameters filled in."""
    app = create_app(Settings(**gateway.settings))
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path not in PUBLIC:
            path = re.sub(r"\{(\w+)(:path)?\}", "x", route.path)
            found += [(m, path) for m in sorted(route.methods)]
    return found


def assert_refused(resp: httpx.Response, status: int, code: str, what: str) -> None:
    assert resp.status_code == status, (what, resp.status_code, resp.text)
    assert error_shape_problem(resp.content) is None, (what, resp.text)
    assert resp.json()["error"]["code"] == code, (what, resp.text)


def test_the_route_list_covers_the_whole_api(gateway: GatewayProcess) -> None:
    found = {p for _, p in routes(gateway)}
    prefixes = {"/v1/models", "/v1/chat", "/v1/completions", "/v1/embeddings", "/v1/files",
                "/v1/fine_tuning", "/v1/vector_stores", "/admin/tenants", "/admin/keys",
                "/admin/prices", "/admin/usage", "/admin/drift", "/internal/vector_stores",
                "/v1/responses", "/v1/conversations"}
    assert all(any(p.startswith(prefix) for p in found) for prefix in prefixes)
    assert len(routes(gateway)) >= 40


def test_every_route_refuses_a_missing_wrong_or_malformed_key(gateway: GatewayProcess) -> None:
    headers: list[dict[str, str]] = [{}, *({"Authorization": f"Bearer {k}"} for k in WRONG_KEYS),
                                     {"Authorization": ADMIN_KEY},  # no scheme
                                     {"Authorization": f"Basic {ADMIN_KEY}"},
                                     {"Authorization": "Bearer"}, {"X-Api-Key": ADMIN_KEY}]
    tried = 0
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for method, path in routes(gateway):
            for h in headers:
                resp = client.request(method, path, headers=h,
                                      json={} if method in ("POST", "PUT", "PATCH") else None)
                assert_refused(resp, 401, "invalid_api_key", f"{method} {path} {h}")
                tried += 1
    assert tried >= 40 * len(headers)
    report("routes without a valid key", routes=len(routes(gateway)),
           key_variants=len(headers), requests=tried, refused=tried)


@pytest.fixture(scope="module")
def tenants(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    return {"a": gateway.new_key(), "b": gateway.new_key()}


def test_admin_routes_refuse_a_member_key(gateway: GatewayProcess,
                                          tenants: dict[str, dict[str, Any]]) -> None:
    admin_routes = [(m, p) for m, p in routes(gateway)
                    if p.startswith(("/admin/", "/internal/"))]
    assert len(admin_routes) >= 15
    with gateway.client(tenants["a"]["key"]) as member:
        for method, path in admin_routes:
            resp = member.request(method, path,
                                  json={} if method in ("POST", "PUT", "PATCH") else None)
            assert_refused(resp, 403, "permission_denied", f"{method} {path}")
        # Nor can it make itself an admin through a field of its own requests.
        resp = member.post("/v1/files", files={"file": ("t.jsonl", TRAINING)},
                           data={"purpose": "fine-tune", "role": "admin"})
        assert resp.status_code == 200
        assert member.get("/admin/tenants").status_code == 403


@pytest.fixture(scope="module")
def owned(gateway: GatewayProcess, tenants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Tenant A's resources: a file, a vector store holding it, a fine-tuning job."""
    with gateway.client(tenants["a"]["key"]) as a:
        training = a.post("/v1/files", files={"file": ("train.jsonl", TRAINING)},
                          data={"purpose": "fine-tune"}).json()["id"]
        doc = a.post("/v1/files", files={"file": ("notes.txt", b"The vault code is 4471.")},
                     data={"purpose": "assistants"}).json()["id"]
        store = a.post("/v1/vector_stores", json={"name": "secret",
                                                  "file_ids": [doc]}).json()["id"]
        batch = a.post(f"/v1/vector_stores/{store}/file_batches", json={"file_ids": [doc]})
        assert batch.status_code == 200, batch.text
        job = a.post("/v1/fine_tuning/jobs", json={"model": CHAT, "training_file": training})
        assert job.status_code == 200, job.text
        conversation = a.post("/v1/conversations", json={"items": [
            {"role": "user", "content": "The vault code is 4471."}]})
        assert conversation.status_code == 200, conversation.text
        item = a.get(f"/v1/conversations/{conversation.json()['id']}/items").json()
        return {"training": training, "doc": doc, "store": store, "job": job.json()["id"],
                "batch": batch.json()["id"], "conversation": conversation.json()["id"],
                "item": item["data"][0]["id"]}


def test_another_tenant_cannot_see_or_touch_a_tenants_resources(
        gateway: GatewayProcess, tenants: dict[str, dict[str, Any]], owned: dict[str, str]
        ) -> None:
    f, doc, vs, job = owned["training"], owned["doc"], owned["store"], owned["job"]
    conv = owned["conversation"]
    attempts = [
        ("GET", f"/v1/files/{f}", None), ("GET", f"/v1/files/{f}/content", None),
        ("DELETE", f"/v1/files/{doc}", None),
        ("GET", f"/v1/files?after={f}", None),
        ("GET", f"/v1/fine_tuning/jobs/{job}", None),
        ("POST", f"/v1/fine_tuning/jobs/{job}/cancel", None),
        ("GET", f"/v1/fine_tuning/jobs/{job}/events", None),
        ("GET", f"/v1/fine_tuning/jobs/{job}/checkpoints", None),
        ("GET", f"/v1/fine_tuning/jobs?after={job}", None),
        ("GET", f"/v1/vector_stores/{vs}", None),
        ("POST", f"/v1/vector_stores/{vs}", {"name": "mine now"}),
        ("DELETE", f"/v1/vector_stores/{vs}", None),
        ("GET", f"/v1/vector_stores/{vs}/files", None),
        ("GET", f"/v1/vector_stores/{vs}/files/{doc}", None),
        ("POST", f"/v1/vector_stores/{vs}/files", {"file_id": doc}),
        ("DELETE", f"/v1/vector_stores/{vs}/files/{doc}", None),
        ("POST", f"/v1/vector_stores/{vs}/search", {"query": "vault code"}),
        ("POST", f"/v1/vector_stores/{vs}/file_batches", {"file_ids": [doc]}),
        ("GET", f"/v1/vector_stores/{vs}/file_batches/{owned['batch']}", None),
        ("POST", f"/v1/vector_stores/{vs}/file_batches/{owned['batch']}/cancel", None),
        ("GET", f"/v1/vector_stores/{vs}/file_batches/{owned['batch']}/files", None),
        ("POST", "/v1/chat/completions", {"model": CHAT, "messages": [
            {"role": "user", "content": "vault code?"}], "retrieval": {"vector_store_ids": [vs]}}),
        ("GET", f"/v1/conversations/{conv}", None),
        ("POST", f"/v1/conversations/{conv}", {"metadata": {"mine": "now"}}),
        ("DELETE", f"/v1/conversations/{conv}", None),
        ("GET", f"/v1/conversations/{conv}/items", None),
        ("POST", f"/v1/conversations/{conv}/items", {"items": [
            {"role": "user", "content": "hi"}]}),
        ("GET", f"/v1/conversations/{conv}/items/{owned['item']}", None),
        ("DELETE", f"/v1/conversations/{conv}/items/{owned['item']}", None),
        ("POST", "/v1/responses", {"model": CHAT, "input": "vault code?",
                                   "conversation": conv}),
        ("POST", "/v1/responses", {"model": CHAT, "input": "vault code?", "tools": [
            {"type": "file_search", "vector_store_ids": [vs]}], "tool_choice": "required"}),
    ]
    with gateway.client(tenants["b"]["key"]) as b:
        for method, path, body in attempts:
            resp = b.request(method, path, json=body)
            assert_refused(resp, 404, "not_found", f"{method} {path}")
            assert "4471" not in resp.text
        # A's objects used from B's own resources: refused as if they did not exist.
        own = b.post("/v1/vector_stores", json={"name": "b"}).json()["id"]
        resp = b.post(f"/v1/vector_stores/{own}/files", json={"file_id": doc})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "file_id"
        assert resp.json()["error"]["message"] == f"File {doc} not found."
        resp = b.post(f"/v1/vector_stores/{own}/file_batches", json={"file_ids": [doc]})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "file_ids[0]"
        resp = b.post("/v1/vector_stores", json={"name": "b2", "file_ids": [doc]})
        assert resp.status_code == 400 and resp.json()["error"]["param"].startswith("file_ids")
        resp = b.post("/v1/fine_tuning/jobs", json={"model": CHAT, "training_file": f})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "training_file"
        # B's listings hold none of A's ids, and usage is only for admins.
        listed = " ".join(b.get(p).text for p in ("/v1/files", "/v1/vector_stores",
                                                  "/v1/fine_tuning/jobs", "/v1/models"))
        assert not any(i in listed for i in owned.values())
        assert b.get("/admin/usage").status_code == 403
    with gateway.client(tenants["a"]["key"]) as a:  # A's resources are all still there
        assert a.get(f"/v1/files/{doc}").status_code == 200
        assert a.get(f"/v1/files/{f}/content").content == TRAINING
        assert a.get(f"/v1/vector_stores/{vs}").json()["name"] == "secret"
        assert a.get(f"/v1/vector_stores/{vs}/files/{doc}").status_code == 200
        assert a.get(f"/v1/fine_tuning/jobs/{job}").json()["status"] != "cancelled"
        assert len(a.get(f"/v1/conversations/{conv}/items").json()["data"]) == 1


def test_another_tenant_cannot_see_or_use_a_tenants_adapter(
        gateway: GatewayProcess, tenants: dict[str, dict[str, Any]]) -> None:
    """A's fine-tuned adapter (a job marked succeeded in the store; the FAKE upstream accepts
    the load) is listed and served for A only."""
    with gateway.client(tenants["a"]["key"]) as a:
        training = a.post("/v1/files", files={"file": ("t.jsonl", TRAINING)},
                          data={"purpose": "fine-tune"}).json()["id"]
        job = a.post("/v1/fine_tuning/jobs", json={"model": CHAT, "training_file": training,
                                                   "suffix": "private"}).json()["id"]
    adapter = f"ft:{CHAT}:private:{uuid.uuid4().hex[:6]}"
    engine = sqlalchemy.create_engine(gateway.settings["database_url"])
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(
            "UPDATE fine_tuning_jobs SET status = 'succeeded', fine_tuned_model = :name, "
            "result = :result WHERE id = :id"),
            {"name": adapter, "result": json.dumps({"adapter_path": "/adapters/x"}), "id": job})
    engine.dispose()
    chat = {"model": adapter, "messages": [{"role": "user", "content": "hi"}]}
    with gateway.client(tenants["a"]["key"]) as a, gateway.client(tenants["b"]["key"]) as b:
        deadline = time.monotonic() + 30
        while adapter not in a.get("/v1/models").text:  # the loader's periodic reconcile
            assert time.monotonic() < deadline, "the adapter was never served"
            time.sleep(0.3)
        assert a.post("/v1/chat/completions", json=chat).status_code == 200
        assert adapter not in b.get("/v1/models").text
        assert_refused(b.post("/v1/chat/completions", json=chat), 404, "model_not_found",
                       "B using A's adapter")
        assert_refused(b.post("/v1/completions", json={"model": adapter, "prompt": "hi"}),
                       404, "model_not_found", "B using A's adapter for completions")
        assert_refused(b.post("/v1/fine_tuning/jobs", json={"model": adapter,
                                                            "training_file": training}),
                       404, "model_not_found", "B fine-tuning A's adapter")


def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, list[tuple[str, str]]]:
    """Send bytes httpx would refuse to send; returns the status and the response headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
    return status, headers  # type: ignore[return-value]


SANE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


@pytest.mark.parametrize("value", [
    b"abc\rSet-Cookie: injected=1", b"abc\nSet-Cookie: injected=1", b"a\x00b", b"a\x7fb",
    b"\xc3\xa9t\xc3\xa9", b"a b", b"x" * 129, b"%0d%0aSet-Cookie:%20injected=1"])
def test_request_ids_with_injected_bytes_are_never_echoed(gateway: GatewayProcess,
                                                          value: bytes) -> None:
    port = gateway.running.service.port
    head = (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\nX-Request-Id: " + value)
    status, headers = raw_request(port, head)
    assert status in (200, 400), status  # served with an id of ours, or refused outright
    names = [n.lower() for n, _ in headers]
    assert "set-cookie" not in names
    ids = [v for n, v in headers if n.lower() == "x-request-id"]
    if status == 200:
        assert len(ids) == 1 and SANE_ID.match(ids[0])
        assert ids[0] != value.decode("latin-1") or SANE_ID.match(value.decode("latin-1"))


def test_file_name_cannot_inject_a_download_header(gateway: GatewayProcess) -> None:
    port = gateway.running.service.port
    boundary = b"b0und4ry"
    name = b'evil"; x=1\rSet-Cookie: injected=1.txt'
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            b"assistants\r\n--" + boundary + b'\r\nContent-Disposition: form-data; '
            b'name="file"; filename="' + name + b'"\r\nContent-Type: text/plain\r\n\r\nhello\r\n'
            b"--" + boundary + b"--\r\n")
    head = (b"POST /v1/files HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
            b"Content-Length: " + str(len(body)).encode())
    status, _ = raw_request(port, head, body)
    assert status in (200, 400), status
    with gateway.client() as admin:
        for f in admin.get("/v1/files").json()["data"]:
            resp = admin.get(f"/v1/files/{f['id']}/content")
            assert "set-cookie" not in resp.headers
            disposition = resp.headers.get("content-disposition", "")
            assert "\r" not in disposition and "\n" not in disposition


def nested(depth: int, kind: str = "list") -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                                  "/admin/tenants", "/v1/vector_stores", "/v1/fine_tuning/jobs",
                                  "/v1/vector_stores/vs_x/search"])
def test_deeply_nested_and_oversized_json_is_refused_quickly(gateway: GatewayProcess,
                                                             path: str) -> None:
    limit = gateway.settings["max_body_bytes"]
    bodies = {
        "list nested 100k deep": nested(100_000),
        "object nested 20k deep": nested(20_000, "object"),
        "nested inside a valid request": b'{"model":"' + CHAT.encode() + b'","messages":'
        + nested(50_000) + b"}",
        "metadata nested": b'{"name":"n","metadata":' + nested(20_000, "object") + b"}",
    }
    with gateway.client() as client:
        for what, body in bodies.items():
            assert len(body) < limit
            started = time.monotonic()
            resp = client.post(path, content=body, headers={"content-type": "application/json"})
            took = time.monotonic() - started
            assert resp.status_code in (400, 404, 413), (what, resp.status_code, resp.text)
            assert error_shape_problem(resp.content) is None, (what, resp.text)
            assert took < 3.0, (what, took)
        big = b'{"model":"' + CHAT.encode() + b'","input":"' + b"x" * limit + b'"}'
        resp = client.post(path, content=big, headers={"content-type": "application/json"})
        assert_refused(resp, 413, "request_too_large", "declared length over the limit")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model":"' + CHAT.encode() + b'","input":"'
            for _ in range(limit // 65536 + 2):
                yield b"x" * 65536
            yield b'"}'
        resp = client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code in (400, 404, 413), (resp.status_code, resp.text[:300])
        assert error_shape_problem(resp.content) is None
    with gateway.client() as client:  # and the gateway is still fine
        assert client.get("/v1/models").status_code == 200


NAMES = ["../../../../tmp/llmops-escape.txt", "/etc/llmops-escape.txt", "..", ".", "",
         "a/../../b.txt", "..\\..\\windows.txt", "nul\x00byte.txt", "x" * 10_000,
         "\u202etxt.exe", "..\u2215..\u2215escape.txt", "%2e%2e%2fescape.txt", "con",
         "\U0001f600.txt", "name\r\nwith-newline.txt"]


def test_path_tricks_in_file_names_never_reach_the_file_system(gateway: GatewayProcess
                                                               ) -> None:
    root = Path(gateway.settings["files"]["root"])
    before = {p for p in root.rglob("*")} if root.exists() else set()
    ids = []
    with gateway.client() as client:
        for name in NAMES:
            resp = client.post("/v1/files", files={"file": (name, b"payload " + name.encode())},
                               data={"purpose": "assistants"})
            assert resp.status_code in (200, 400), (name, resp.status_code, resp.text)
            if resp.status_code == 200:
                body = resp.json()
                assert len(body["filename"]) <= 255
                ids.append(body["id"])
                content = client.get(f"/v1/files/{body['id']}/content")
                assert content.content == b"payload " + name.encode()
    assert not Path("/tmp/llmops-escape.txt").exists()
    assert not Path("/etc/llmops-escape.txt").exists()
    new = {p for p in root.rglob("*")} - before
    # Bytes land only at <root>/<tenant>/<file id>; names are metadata, never paths.
    files = {p for p in new if p.is_file()}
    assert {p.name for p in files} == set(ids)
    assert all(p.parent.parent == root and re.fullmatch(r"file-[0-9a-f]{24}", p.name)
               for p in files)
    assert not any((root / "incoming").iterdir())


def test_keys_never_appear_in_logs_or_metrics(gateway: GatewayProcess,
                                              tenants: dict[str, dict[str, Any]]) -> None:
    member = gateway.new_key()["key"]
    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    with gateway.client(member) as client:
        assert client.post("/v1/chat/completions", json={
            "model": CHAT, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        assert client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}
                           ).status_code == 200
        assert client.get("/admin/tenants").status_code == 403
    with gateway.client(wrong) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v1/chat/completions", json={"model": CHAT}).status_code == 401
    with gateway.client() as admin:
        created = admin.post("/admin/keys", json={"tenant_id": tenants["a"]["tenant_id"]})
        assert created.status_code == 201
        assert admin.post(f"/admin/keys/{created.json()['id']}/revoke").status_code == 200
    with gateway.client(created.json()["key"]) as revoked:
        assert revoked.get("/v1/models").status_code == 401
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=30).text
    assert "llmops_" in metrics
    time.sleep(0.5)  # the log is written by another process
    log = gateway.running.log.read_text(errors="replace")
    secrets = [ADMIN_KEY, member, wrong, created.json()["key"], tenants["a"]["key"],
               tenants["b"]["key"]]
    for secret in secrets:
        for text, where in ((log, "log"), (metrics, "metrics")):
            assert secret not in text, where
            assert secret[-16:] not in text, where  # nor a recognisable tail of it
