"""Schemathesis fuzzes every operation of the gateway's own OpenAPI document against a real
gateway process (uvicorn, SQLite store, the shared Redis) over the FAKE vLLM upstream, with the
admin key so that authenticated routes are exercised past their auth: no answer is a 5xx, and
every 4xx is in OpenAI's error shape."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.stack import ADMIN_KEY, GatewayProcess, report

# Bounded so that the whole run takes about a minute; raise it for a deeper search.
EXAMPLES = int(os.environ.get("LLMOPS_FUZZ_EXAMPLES", "25"))
ERROR_KEYS = {"message", "type", "param", "code"}


def error_shape_problem(content: bytes) -> str | None:
    """Why an error answer is not in OpenAI's shape, or None when it is."""
    try:
        body = json.loads(content)
    except ValueError:
        return f"not JSON: {content[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != ERROR_KEYS:
        return f"not {{'error': {sorted(ERROR_KEYS)}}}: {content[:200]!r}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return f"message and type must be strings: {content[:200]!r}"
    return None


def test_fuzzed_requests_never_fail_the_server_and_errors_keep_the_shape(
        gateway: GatewayProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    failures: dict[str, str] = {}
    tried: dict[str, int] = {}
    started = time.monotonic()
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def fuzz(operation: Any, label: str) -> None:
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(data=st.data())
        def run(data: Any) -> None:
            case = data.draw(operation.as_strategy())
            resp = case.call(base_url=gateway.url, session=session, headers=auth, timeout=30)
            tried[label] = tried.get(label, 0) + 1
            if resp.status_code >= 500:
                failures.setdefault(label, f"{resp.status_code} for {case.body!r:.300}: "
                                           f"{resp.content[:300]!r}")
            elif resp.status_code >= 400 and (problem := error_shape_problem(resp.content)):
                failures.setdefault(label, f"{resp.status_code}: {problem}")

        run()

    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            fuzz(operation, operation.label)
    elapsed = time.monotonic() - started
    assert len(tried) >= 40, sorted(tried)  # every operation was reached
    assert sum(tried.values()) >= 40 * min(EXAMPLES, 5), tried
    report("schemathesis fuzz", operations=len(tried), requests=sum(tried.values()),
           examples_per_operation=EXAMPLES, seconds=round(elapsed, 1), failures=len(failures))
    assert not failures, f"after {elapsed:.0f} s: {failures}"


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe",
                                  b'{"model": 1}', b'{"messages": {}}'])
def test_malformed_bodies_are_400_in_openai_shape(gateway: GatewayProcess, body: bytes
                                                  ) -> None:
    """What a fuzzer seldom sends: bodies that are not the JSON object each route expects."""
    with gateway.client() as client:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                     "/v1/vector_stores", "/v1/fine_tuning/jobs", "/admin/tenants",
                     "/admin/keys"):
            resp = client.post(path, content=body,
                               headers={"content-type": "application/json"})
            assert resp.status_code == 400, (path, body, resp.status_code, resp.text)
            assert error_shape_problem(resp.content) is None, (path, body, resp.text)
