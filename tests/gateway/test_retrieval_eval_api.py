"""Retrieval eval runs (our `vector_store_search` data source) through the Evals API in
process, on a real SQLite store, the embedded vector index and the real Redis broker: what is
refused when the run is created, and naming which param; what an accepted run stores; and the
run's recall@k and MRR from the items a worker records."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.evals import RunCreateResponse

from evals.store import Evals, ItemOutcome
from llmops.settings import Settings
from llmops.store import Database
from tests.databases import in_process_gateway
from tests.gateway.test_evals_api import openai_shape

ADMIN = "sk-unit-retrieval-evals"
EVAL = {"name": "manuals", "data_source_config": {"type": "custom", "item_schema": {
    "type": "object", "required": ["question"], "properties": {
        "question": {"type": "string"}, "file_id": {"type": "string"},
        "filename": {"type": "string"}, "span": {"type": "string"},
        "answer": {"type": "string"}}}},
    "testing_criteria": [{"type": "string_check", "name": "says it", "operation": "ilike",
                          "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}]}

Api = tuple[httpx.AsyncClient, Settings]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    dead = "http://127.0.0.1:9"  # no engine is called when runs are only created
    settings = Settings(admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
                        files={"root": tmp_path / "files"},
                        retrieval={"path": tmp_path / "qdrant"},
                        models=[{"name": "chat", "kind": "chat",
                                 "pools": [{"device": "cpu", "urls": [dead]}]},
                                {"name": "embed", "kind": "embedding",
                                 "pools": [{"device": "cpu", "urls": [dead]}]}])
    async with in_process_gateway(settings, ADMIN) as client:
        yield client, settings


async def store_with_file(client: httpx.AsyncClient) -> tuple[str, str]:
    """A vector store holding kettle.txt (its ingestion is queued, never run here)."""
    upload = await client.post("/v1/files", data={"purpose": "assistants"},
                               files={"file": ("kettle.txt", b"A seven-year warranty.")})
    assert upload.status_code == 200, upload.text
    vs = await client.post("/v1/vector_stores", json={"name": "manuals",
                                                      "file_ids": [upload.json()["id"]]})
    assert vs.status_code == 200, vs.text
    return vs.json()["id"], upload.json()["id"]


def run_shape(run: dict[str, Any]) -> None:
    """OpenAI's run object: strictly so but for the data source, whose type is ours (the
    client parses it leniently, keeping its fields; tests/e2e/test_retrieval_eval.py)."""
    openai_shape({**run, "data_source": {"type": "jsonl", "source": run["data_source"][
        "source"]}}, RunCreateResponse)


def data_source(store_id: str, items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"type": "vector_store_search", "vector_store_id": store_id,
            "source": {"type": "file_content", "content": [{"item": i} for i in items]},
            **extra}


async def test_bad_retrieval_runs_are_refused_naming_the_param(api: Api) -> None:
    client, _ = api
    ev = (await client.post("/v1/evals", json=EVAL)).json()
    store_id, file_id = await store_with_file(client)
    tenant = (await client.post("/admin/tenants", json={"name": "other"})).json()
    other_key = (await client.post("/admin/keys", json={"tenant_id": tenant["id"]})).json()
    foreign = (await client.post("/v1/vector_stores", json={"name": "theirs"}, headers={
        "authorization": f"Bearer {other_key['key']}"})).json()["id"]
    good = {"question": "How long is the warranty?", "file_id": file_id}
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        (data_source("vs_missing", [good]), 400, "data_source.vector_store_id", "not found"),
        (data_source(foreign, [good]), 400, "data_source.vector_store_id", "not found"),
        (data_source(store_id, [good], max_num_results=51), 400,
         "data_source.max_num_results", "50"),
        (data_source(store_id, [good], max_num_results=5, ks=[1, 10]), 400, "data_source.ks",
         "max_num_results (5)"),
        (data_source(store_id, [good], ks=[]), 400, "data_source.ks", "at least 1"),
        (data_source(store_id, [good], filters={"type": "like", "key": "y", "value": 1}),
         400, "data_source.filters.type", "like"),
        (data_source(store_id, [good], search_mode="fuzzy"), 400, "data_source.search_mode",
         "hybrid"),
        (data_source(store_id, [good], model="chat"), 400, "data_source.model", "Extra"),
        (data_source(store_id, [good], rag={"model": "nope"}), 404, "data_source.rag.model",
         "nope"),
        (data_source(store_id, [good], rag={"model": "chat", "sampling_params": {
            "reasoning_effort": "high"}}), 400,
         "data_source.rag.sampling_params.reasoning_effort", "not supported"),
        (data_source(store_id, [good, {"question": "Who?"}]), 400, "data_source.source",
         "Item 1: name what answers the question"),
        (data_source(store_id, [good, {"question": "Who?", "file_id": "file-nope"}]), 400,
         "data_source.source", "Item 1: file file-nope is not in vector store"),
        (data_source(store_id, [{"question": "Who?", "filename": "lock.html"}]), 400,
         "data_source.source", "no file named 'lock.html'"),
        (data_source(store_id, [{"question": 7, "span": "x"}]), 400, "data_source.source",
         "item_schema"),  # the eval's item schema applies first
    ]
    for body, status, param, words in cases:
        refused = await client.post(f"/v1/evals/{ev['id']}/runs", json={"data_source": body})
        error = refused.json()["error"]
        assert (refused.status_code, error["param"]) == (status, param), (body, error)
        assert words in error["message"], (body, error)
    runs = (await client.get(f"/v1/evals/{ev['id']}/runs")).json()["data"]
    assert runs == []  # nothing was queued
    # A criterion named like a metric would share its tallies: refused where it would grade.
    clash = (await client.post("/v1/evals", json={**EVAL, "testing_criteria": [
        {**EVAL["testing_criteria"][0], "name": "hit@1"}]})).json()  # type: ignore[index]
    refused = await client.post(f"/v1/evals/{clash['id']}/runs", json={
        "data_source": data_source(store_id, [good], rag={"model": "chat"})})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "data_source.rag"
    searched = await client.post(f"/v1/evals/{clash['id']}/runs", json={
        "data_source": data_source(store_id, [good])})
    assert searched.status_code == 200, searched.text


async def test_a_retrieval_run_and_its_figures(api: Api) -> None:
    client, settings = api
    ev = (await client.post("/v1/evals", json=EVAL)).json()
    store_id, file_id = await store_with_file(client)
    items = [{"question": "How long is the warranty?", "file_id": file_id},
             {"question": "Which file?", "filename": "kettle.txt", "span": "seven-year"},
             {"question": "What warranty?", "span": "warranty", "answer": "seven"}]
    plain = (await client.post(f"/v1/evals/{ev['id']}/runs", json={
        "data_source": data_source(store_id, items)})).json()
    run_shape(plain)
    assert plain["data_source"]["ks"] == [1, 3, 5, 10]  # the defaults, stored
    assert plain["data_source"]["max_num_results"] == 10 and plain["model"] == ""
    assert plain["name"] == f"{store_id} retrieval" and plain["datasource_item_count"] == 3
    # Without rag there is no answer for the eval's own criterion to grade.
    assert [r["testing_criteria"] for r in plain["per_testing_criteria_results"]] == [
        "hit@1", "hit@3", "hit@5", "hit@10", "reciprocal_rank"]
    assert plain["retrieval"] == {"questions": 0, "recall_at": {"1": 0.0, "3": 0.0, "5": 0.0,
                                                                "10": 0.0},
                                  "mrr": 0.0, "search_errors": 0, "cited_span_rate": None,
                                  "answer_match_rate": None}

    rag = (await client.post(f"/v1/evals/{ev['id']}/runs", json={
        "data_source": data_source(store_id, items, max_num_results=4, ks=[3, 1, 3],
                                   rag={"model": "chat", "max_num_results": 2})})).json()
    assert rag["model"] == "chat" and rag["data_source"]["ks"] == [1, 3]
    assert rag["data_source"]["rag"] == {"model": "chat", "max_num_results": 2}
    assert [r["testing_criteria"] for r in rag["per_testing_criteria_results"]] == [
        "says it", "hit@1", "hit@3", "reciprocal_rank", "cited_span", "answer_match"]

    # What a worker records (evals.retrieval.items): ranks 1, 3 and a failed search.
    def results(rank: int | None, error: str | None = None) -> list[dict[str, Any]]:
        out = [{"name": f"hit@{k}", "passed": rank is not None and rank <= k,
                "score": float(rank is not None and rank <= k), "error": error}
               for k in (1, 3)]
        return [*out, {"name": "reciprocal_rank", "passed": rank is not None,
                       "score": 1 / rank if rank else 0.0, "error": error}]

    db = Database(settings.database_url)
    try:
        evals = Evals(db)
        assert await evals.claim(rag["id"], "w", 60)
        for index, rank, error, cited in ((0, 1, None, True), (1, 3, None, False),
                                          (2, None, "search broke", None)):
            extra = [] if cited is None else [
                {"name": "cited_span", "passed": cited, "score": float(cited), "error": None}]
            assert await evals.record(rag["id"], "w", ItemOutcome(
                index, items[index], {"output": []}, results(rank, error) + extra,
                "error" if error else "pass" if cited else "fail", {}))
    finally:
        await db.close()
    run = (await client.get(f"/v1/evals/{ev['id']}/runs/{rag['id']}")).json()
    run_shape(run)
    assert run["result_counts"] == {"total": 3, "passed": 1, "failed": 1, "errored": 1}
    assert run["retrieval"] == {"questions": 3, "recall_at": {"1": 1 / 3, "3": 2 / 3},
                                "mrr": pytest.approx((1 + 1 / 3) / 3), "search_errors": 1,
                                "cited_span_rate": 0.5, "answer_match_rate": None}
    per = {r["testing_criteria"]: r for r in run["per_testing_criteria_results"]}
    assert per["hit@3"] == {"testing_criteria": "hit@3", "passed": 2, "failed": 0,
                            "errored": 1}
    listed = (await client.get(f"/v1/evals/{ev['id']}/runs")).json()["data"]
    assert {r["id"]: "retrieval" in r for r in listed} == {plain["id"]: True, rag["id"]: True}
