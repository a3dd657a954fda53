"""Ledger completeness on the real stack: every request (plain, streamed, failed, refused,
disconnected) leaves exactly one record whose tokens match vLLM's own counters, also when the
gateway is killed and restarted mid-run."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy

from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL
from tests.e2e.conftest import Engines, Gateway, GatewayFactory, standard_models

HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def counter(engine_url: str, name: str) -> float:
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def records(gateway: Gateway, finished: int, total: int = 0, timeout_s: float = 30
            ) -> dict[str, Any]:
    """The gateway's usage rows by request id, once `finished` of them are final (status not
    0) and there are `total` in all."""
    engine = sqlalchemy.create_engine(gateway.settings["database_url"])
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as conn:
                rows = {r.request_id: r for r in conn.execute(
                    sqlalchemy.text("SELECT * FROM usage_records"))}
            done = sum(r.status != 0 for r in rows.values())
            if (done >= finished and len(rows) >= total) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        engine.dispose()


class Client:
    """Sends requests with our own request ids, so that each can be found in the ledger."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.sent: dict[str, str] = {}  # request id -> what kind of request

    def headers(self, kind: str) -> dict[str, str]:
        rid = f"{kind}-{uuid.uuid4().hex[:10]}"
        self.sent[rid] = kind
        return {**self.gateway.headers, "x-request-id": rid}

    def post(self, kind: str, path: str, body: dict[str, Any] | bytes,
             timeout: float = 120) -> httpx.Response:
        content = body if isinstance(body, bytes) else None
        return httpx.post(f"{self.gateway.base_url}{path}", headers=self.headers(kind),
                          json=None if content else body, content=content, timeout=timeout)

    def stream(self, kind: str, body: dict[str, Any], *, read_events: int | None = None,
               hang_up_at_done: bool = False) -> list[str]:
        events = []
        with httpx.stream("POST", f"{self.gateway.base_url}/chat/completions",
                          headers=self.headers(kind), json={**body, "stream": True},
                          timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if read_events is not None and len(events) >= read_events:
                        break  # hang up mid-stream
                    if hang_up_at_done and line == "data: [DONE]":
                        break  # as the openai client does: the answer is complete
        return events


@pytest.fixture
def ledger_gateway(engines: Engines, gateway_factory: GatewayFactory) -> Gateway:
    return gateway_factory(standard_models(engines))


def test_every_request_leaves_exactly_one_matching_record(
        engines: Engines, ledger_gateway: Gateway) -> None:
    chat_url = engines.chat.url
    before = (counter(chat_url, "vllm:prompt_tokens_total"),
              counter(chat_url, "vllm:generation_tokens_total"))
    client = Client(ledger_gateway)
    expect: dict[str, tuple[int, int, int]] = {}  # request id -> (status, prompt, completion)

    for _ in range(3):
        resp = client.post("plain", "/chat/completions",
                           {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 6})
        u = resp.json()["usage"]
        expect[resp.headers["x-request-id"]] = (200, u["prompt_tokens"], u["completion_tokens"])
    resp = client.post("completion", "/completions",
                       {"model": CHAT_MODEL, "prompt": "The sea is", "max_tokens": 5})
    u = resp.json()["usage"]
    expect[resp.headers["x-request-id"]] = (200, u["prompt_tokens"], u["completion_tokens"])
    resp = client.post("embedding", "/embeddings",
                       {"model": EMBEDDING_MODEL, "input": ["one", "two words"]})
    expect[resp.headers["x-request-id"]] = (200, resp.json()["usage"]["prompt_tokens"], 0)

    # Streams: with usage asked for, the last event carries it; without, none shows.
    with_usage = client.stream("stream", {"model": CHAT_MODEL, "messages": HELLO,
                                          "max_tokens": 8,
                                          "stream_options": {"include_usage": True}})
    assert '"usage"' in with_usage[-2] and all('"usage"' not in e for e in with_usage[:-2])
    for hang_up in (False, True):
        events = client.stream("stream", {"model": CHAT_MODEL, "messages": HELLO,
                                          "max_tokens": 8}, hang_up_at_done=hang_up)
        assert events[-1] == "data: [DONE]" and all('"usage"' not in e for e in events)

    # Failed at the engine (beyond its context), refused by the gateway, and a bad key.
    assert client.post("failed", "/chat/completions", {"model": CHAT_MODEL, "messages": HELLO,
                                                       "max_tokens": 100_000}).status_code == 400
    assert client.post("invalid", "/chat/completions", b"{not json").status_code == 400
    assert client.post("unknown", "/chat/completions",
                       {"model": "nope", "messages": HELLO}).status_code == 404

    # Disconnected streams: the client hangs up after a few events.
    for _ in range(2):
        client.stream("gone", {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 300,
                               "ignore_eos": True}, read_events=4)

    rows = records(ledger_gateway, len(client.sent))
    assert set(rows) == set(client.sent)  # exactly one record per request
    for rid, (status, prompt, completion) in expect.items():
        row = rows[rid]
        assert (row.status, row.prompt_tokens, row.completion_tokens) == (status, prompt,
                                                                          completion)
    statuses = {rid: rows[rid].status for rid in rows}
    assert {statuses[r] for r, k in client.sent.items() if k == "stream"} == {200}
    assert {statuses[r] for r, k in client.sent.items() if k == "gone"} == {499}
    assert {statuses[r] for r, k in client.sent.items() if k in ("failed", "invalid")} == {400}
    assert {statuses[r] for r, k in client.sent.items() if k == "unknown"} == {404}
    gone = [rows[r] for r, k in client.sent.items() if k == "gone"]
    assert all(r.prompt_tokens > 0 and 0 < r.completion_tokens < 300 for r in gone)

    # The chat engine's own counters agree with the ledger (an aborted stream may have made
    # a token or two after the last event the gateway saw).
    time.sleep(1.0)
    chat_rows = [r for r in rows.values() if r.model == CHAT_MODEL]
    prompt_delta = counter(chat_url, "vllm:prompt_tokens_total") - before[0]
    completion_delta = counter(chat_url, "vllm:generation_tokens_total") - before[1]
    assert sum(r.prompt_tokens for r in chat_rows) == prompt_delta
    ledger_completion = sum(r.completion_tokens for r in chat_rows)
    assert 0 <= completion_delta - ledger_completion <= 2 * len(gone)


def test_gateway_killed_mid_run_loses_and_doubles_nothing(
        engines: Engines, ledger_gateway: Gateway, logs: Path) -> None:
    client = Client(ledger_gateway)
    body = {"model": CHAT_MODEL, "messages": HELLO, "max_tokens": 4}
    for _ in range(4):
        assert client.post("before", "/chat/completions", body).status_code == 200

    records(ledger_gateway, 4)  # their end events are out before the kill

    # Two long streams in flight, past admission (their first event arrived) ...
    http = httpx.Client(timeout=120)
    streams: list[tuple[httpx.Response, Iterator[str]]] = []
    for _ in range(2):
        resp = http.send(http.build_request(
            "POST", f"{ledger_gateway.base_url}/chat/completions",
            headers=client.headers("killed"),
            json={**body, "max_tokens": 400, "ignore_eos": True, "stream": True}),
            stream=True)
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        streams.append((resp, lines))
    # ... when the gateway is killed outright.
    ledger_gateway.running.kill()
    for resp, lines in streams:
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
        resp.close()
    http.close()
    ledger_gateway.restart(logs)
    for _ in range(4):
        assert client.post("after", "/chat/completions", body).status_code == 200

    rows = records(ledger_gateway, finished=8, total=10)
    assert set(rows) == set(client.sent)
    for rid, kind in client.sent.items():
        if kind == "killed":
            assert rows[rid].status == 0  # admitted, never finished: recorded as such
        else:
            assert rows[rid].status == 200 and rows[rid].completion_tokens > 0
