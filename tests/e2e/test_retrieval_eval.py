"""Retrieval evaluation end to end with the official openai client: three documents ingested
by a real Celery worker through the real embedding engine, then a `vector_store_search` eval
run executed by a real eval worker (the same Celery worker), searching the store through the
gateway as the tenant's key; once more with RAG answers from the real chat engine, whose
citations are checked for the expected span. recall@k and MRR must follow from the ranks the
items show, and those ranks from the store's own search."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from evals.retrieval.metrics import normalize
from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL, Service, free_port
from tests.clients import EVALS_API
from tests.e2e.conftest import (
    Engines,
    Gateway,
    GatewayFactory,
    Running,
    model,
    pool,
    start,
    wait_healthy,
    wait_until,
)

pytestmark = EVALS_API

DOCUMENTS = {
    "kettle.txt": (
        "Zorblax 9000 kettle support notes. The Zorblax 9000 kettle holds 1.7 litres of "
        "water and boils a full jug in about four minutes on a standard mains socket.\n\n"
        "The Zorblax 9000 kettle comes with a seven-year warranty covering the heating "
        "element and the lid hinge. To claim the warranty, keep your receipt and contact "
        "the Zorblax service desk.\n\nDescale the kettle every month in areas with hard "
        "water, using a spoonful of citric acid dissolved in warm water."),
    "heater.md": (
        "# Glimmerfin aquarium heater\n\n## Temperature\n\nThe Glimmerfin heater holds "
        "aquarium water between 18 and 32 degrees Celsius. Turn the dial on top to set the "
        "target temperature.\n\n## Power\n\nThe Glimmerfin heater draws 40 watts and suits "
        "tanks of up to sixty litres. Unplug it before you lift it out of the water.\n\n"
        "## Cleaning\n\nWipe algae off the glass tube with a soft cloth once a fortnight."),
    "lock.txt": (
        "Orbital bike lock manual. The Orbital bike lock is made of hardened steel and "
        "weighs nine hundred grams.\n\nTo reset the combination code of the Orbital bike "
        "lock, open the shackle, press the reset button and turn the dials to the new "
        "code. Release the button before you close the shackle again.\n\nKeep the lock "
        "mechanism dry and add a drop of oil to the dials every winter."),
}
# What answers each question: a file (by id or by name) and a span; the last one is not in
# the store at all.
QUESTIONS: list[tuple[dict[str, str], str | None, str | None]] = [
    ({"question": "How long is the warranty of the Zorblax 9000 kettle?",
      "span": "seven-year warranty", "answer": "seven"}, "kettle.txt", "file_id"),
    ({"question": "What water temperature can the Glimmerfin aquarium heater hold?",
      "span": "between 18 and 32 degrees", "answer": "32"}, "heater.md", "filename"),
    ({"question": "How do I reset the combination code of my Orbital bike lock?",
      "span": "press the reset button", "answer": "reset button"}, "lock.txt", "file_id"),
    ({"question": "How much water does the Zorblax 9000 kettle hold?",
      "span": "1.7 litres", "answer": "1.7"}, "kettle.txt", None),
    ({"question": "How many watts does the Glimmerfin heater draw?", "answer": "40 watts"},
     "heater.md", "filename"),
    ({"question": "Who won the 1962 chess olympiad in Varna?", "span": "chess olympiad",
      "answer": "Soviet Union"}, None, None),
]
ITEM_SCHEMA: dict[str, object] = {"type": "object", "required": ["question"], "properties": {
    name: {"type": "string"} for name in ("question", "file_id", "filename", "span", "answer")}}
MAX_RESULTS, KS = 5, [1, 3, 5]


@pytest.fixture(scope="module")
def stack(engines: Engines, gateway_factory: GatewayFactory, logs: Path
          ) -> Iterator[tuple[Gateway, Running]]:
    """A gateway whose embedding model has its tokenizer (for chunking), and one Celery
    worker on both the ingest and the eval queue."""
    gateway = gateway_factory(
        [model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url), context_length=2048),
         model(EMBEDDING_MODEL, "embedding", pool("cpu", engines.embedding.url),
               context_length=256, weights=str(engines.model_dirs["embedding"]))])
    port = free_port()
    worker = start(Service("retrieval-evaluator", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "ingest,eval",
        "--pool", "threads", "--concurrency", "2", "--loglevel", "info",
        "-n", f"reval-{uuid.uuid4().hex[:6]}@%h"], port, "/metrics",
        {"LLMOPS_CONFIG": str(gateway.config), "LLMOPS_PORT": str(gateway.running.service.port),
         "LLMOPS_METRICS__WORKER_PORT": str(port), "LLMOPS_EVALS__HEARTBEAT_S": "0.5"}), logs)
    wait_healthy([worker], timeout_s=120)
    yield gateway, worker
    worker.stop()


def finished(client: OpenAI, eval_id: str, run_id: str) -> Any:
    return wait_until(lambda: (r := client.evals.runs.retrieve(run_id, eval_id=eval_id))
                      .status in ("completed", "failed", "canceled") and r, 90, "run done")


def relevant(item: dict[str, Any], result: dict[str, Any]) -> bool:
    """Independent of evals.retrieval.metrics: the span in the (excerpted) text, else the file."""
    if "span" in item:
        return normalize(item["span"]) in normalize(result["text"])
    if "file_id" in item:
        return bool(result["file_id"] == item["file_id"])
    return bool(result["filename"] == item["filename"])


def check_ranks(client: OpenAI, store_id: str, output: Any) -> int | None:
    """The item's rank agrees with its search results, and those are what the store's own
    search answers for the question; returns the rank."""
    item, extra = output.datasource_item, output.sample.model_extra
    found = extra["search_results"]
    assert [r["rank"] for r in found] == list(range(1, len(found) + 1))
    rank = extra["retrieval"]["rank"]
    first = next((r["rank"] for r in found if relevant(item, r)), None)
    assert rank == first, (item, found)
    page = client.vector_stores.search(store_id, query=item["question"],
                                       max_num_results=MAX_RESULTS,
                                       extra_body={"include_chunk": True})
    assert [(r.file_id, r.model_extra["chunk"]["index"]) for r in page.data] == [  # type: ignore[index]
        (r["file_id"], r["chunk"]["index"]) for r in found]
    hits = {r.name: r for r in output.results}
    for k in KS:
        assert hits[f"hit@{k}"].passed == (rank is not None and rank <= k)
    assert hits["reciprocal_rank"].score == pytest.approx(1 / rank if rank else 0.0)
    return rank  # type: ignore[no-any-return]


@pytest.mark.timeout(300)
def test_retrieval_eval_reports_recall_and_mrr_from_the_actual_ranks(
        stack: tuple[Gateway, Running]) -> None:
    gateway, _ = stack
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=60) as admin:
        tenant = admin.post("/admin/tenants", json={"name": f"rag-{uuid.uuid4().hex[:6]}"})
        key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"]}).json()["key"]
    client = OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=60)

    ids = {name: client.files.create(file=(name, text.encode()), purpose="assistants").id
           for name, text in DOCUMENTS.items()}
    vs = client.vector_stores.create(name="manuals", file_ids=list(ids.values()),
                                     chunking_strategy={"type": "static", "static": {
                                         "max_chunk_size_tokens": 100,
                                         "chunk_overlap_tokens": 20}})
    wait_until(lambda: client.vector_stores.retrieve(vs.id).file_counts.completed == 3, 60,
               "ingested")
    items = []
    for question, filename, by in QUESTIONS:
        if by is not None and filename is not None:
            question = {**question, by: ids[filename] if by == "file_id" else filename}
        items.append(question)
    ev = client.evals.create(
        name="manuals retrieval", testing_criteria=[  # grades the RAG answers
            {"type": "string_check", "name": "says it", "operation": "ilike",
             "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}],
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA})
    source = {"type": "file_content", "content": [{"item": i} for i in items]}
    search = client.evals.runs.create(ev.id, data_source={  # type: ignore[arg-type]
        "type": "vector_store_search", "vector_store_id": vs.id, "source": source,
        "max_num_results": MAX_RESULTS, "ks": KS})
    rag = client.evals.runs.create(ev.id, data_source={  # type: ignore[arg-type]
        "type": "vector_store_search", "vector_store_id": vs.id, "source": source,
        "max_num_results": MAX_RESULTS, "ks": KS, "rag": {
            "model": CHAT_MODEL, "max_num_results": 2,
            "sampling_params": {"temperature": 0, "max_completion_tokens": 12}}})
    assert search.data_source.type == "vector_store_search"  # type: ignore[comparison-overlap]
    assert search.data_source.model_extra["vector_store_id"] == vs.id
    assert rag.model == CHAT_MODEL
    n = len(items)

    for run, with_rag in ((search, False), (rag, True)):
        done = finished(client, ev.id, run.id)
        assert done.status == "completed", done.error
        outputs = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100))
        assert [o.datasource_item_id for o in outputs] == list(range(n))
        ranks = [check_ranks(client, vs.id, o) for o in outputs]
        assert all(r is not None for r in ranks[:-1]), ranks  # answerable: found within k=5
        assert ranks[-1] is None  # nothing in the store speaks of chess

        figures = done.model_extra["retrieval"]
        assert figures["questions"] == n and figures["search_errors"] == 0
        assert figures["recall_at"] == pytest.approx(
            {str(k): sum(r is not None and r <= k for r in ranks) / n for k in KS})
        assert figures["mrr"] == pytest.approx(sum(1 / r for r in ranks if r) / n)
        counts = done.result_counts
        assert counts.total == n == counts.passed + counts.failed + counts.errored
        assert counts.errored == 0
        per = {r.testing_criteria: r for r in done.per_testing_criteria_results}
        for k in KS:
            assert per[f"hit@{k}"].passed == sum(r is not None and r <= k for r in ranks)
            assert per[f"hit@{k}"].passed + per[f"hit@{k}"].failed == n

        if not with_rag:
            assert "says it" not in per and done.per_model_usage == []
            assert all(o.sample.output == [] for o in outputs)
            # Passing means found within the largest k.
            assert [o.status for o in outputs] == [
                "pass" if r is not None and r <= KS[-1] else "fail" for r in ranks]
            continue
        assert per["says it"].passed + per["says it"].failed == n
        usage = {u.run_model_name: u for u in done.per_model_usage}
        assert usage[CHAT_MODEL].invocation_count == n
        cited = []
        for output in outputs:
            item, extra = output.datasource_item, output.sample.model_extra
            assert output.sample.model == CHAT_MODEL and output.sample.output[0].content
            expected = normalize(str(item.get("span") or item["answer"]))
            holds = any(expected in normalize(c["quote"]) for c in extra["citations"])
            verdicts = {r.name: r.passed for r in output.results}
            assert verdicts["cited_span"] == holds == extra["retrieval"]["cited_span"]
            said = normalize(str(item["answer"])) in normalize(output.sample.output[0].content)
            assert verdicts["answer_match"] == said
            assert output.status == ("pass" if all(verdicts[name] for name in (
                "hit@5", "cited_span", "says it")) else "fail")
            cited.append(holds)
        assert figures["cited_span_rate"] == pytest.approx(sum(cited) / n)
        assert cited[0], outputs[0].sample.model_extra  # the warranty is cited, span and all
        assert not cited[-1]

    shown = subprocess.run(
        [sys.executable, "-m", "llmops.cli", "evals", "show", ev.id, rag.id,
         "--base-url", gateway.base_url, "--api-key", key],
        capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    recall = ", ".join(f"@{k} {v:.2f}" for k, v in figures["recall_at"].items())
    assert f"retrieval over {n} questions: recall {recall}; MRR {figures['mrr']:.3f}" \
        in shown.stdout
    assert "hit@5:" in shown.stdout and "cited span" in shown.stdout
