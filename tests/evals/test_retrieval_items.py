"""One item of a retrieval eval run, with the gateway replaced by canned answers: which
metrics an item holds, what decides its verdict, and what its sample shows."""

from __future__ import annotations

from typing import Any

from evals.client import Completion, ModelCallError
from evals.retrieval.items import excerpt, retrieval_item
from evals.retrieval.source import default_ks, metric_names, summary

WARRANTY = "The Zorblax kettle comes with a seven-year warranty."


def hit(file_id: str, text: str) -> dict[str, Any]:
    return {"file_id": file_id, "filename": f"{file_id}.txt", "score": 0.5,
            "content": [{"type": "text", "text": text}], "chunk": {"index": 0}}


class Gateway:
    """Canned search results and answer; records what it was asked."""

    def __init__(self, found: list[dict[str, Any]], citations: list[dict[str, Any]] | None = None,
                 fail: str | None = None) -> None:
        self.found, self.citations, self.fail = found, citations or [], fail
        self.asked: list[tuple[str, dict[str, Any]]] = []

    async def search(self, vector_store_id: str, **options: Any) -> list[dict[str, Any]]:
        self.asked.append(("search", {"vector_store_id": vector_store_id, **options}))
        if self.fail == "search":
            raise ModelCallError("http_500", "search broke")
        return self.found

    async def complete(self, model: str, messages: list[dict[str, Any]], **params: Any
                       ) -> Completion:
        self.asked.append(("chat", {"model": model, "messages": messages, **params}))
        if self.fail == "chat":
            raise ModelCallError("http_503", "no replica")
        return Completion("Seven years.", "stop", {"prompt_tokens": 9, "completion_tokens": 3,
                                                   "total_tokens": 12}, [], [],
                          self.citations)


def source(**extra: Any) -> dict[str, Any]:
    return {"type": "vector_store_search", "vector_store_id": "vs_1", "max_num_results": 5,
            "ks": [1, 3, 5], "search_mode": "hybrid", **extra}


ITEM = {"question": "How long is the warranty?", "span": "seven-year warranty",
        "answer": "seven"}
FOUND = [hit("f1", "Kettles boil water."), hit("f2", WARRANTY), hit("f3", "Descale often.")]
RAG = {"model": "chat", "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
       "max_num_results": 2}


async def test_search_only_scores_the_rank_and_passes_within_the_largest_k() -> None:
    gateway = Gateway(FOUND)
    item = await retrieval_item(ITEM, source(filters={"type": "eq", "key": "a", "value": 1}),
                                gateway)
    assert gateway.asked == [("search", {
        "vector_store_id": "vs_1", "query": ITEM["question"], "max_num_results": 5,
        "search_mode": "hybrid", "filters": {"type": "eq", "key": "a", "value": 1},
        "include_chunk": True})]  # the search results' `chunk` is asked for: the sample shows it
    verdicts = {r["name"]: (r["passed"], r["score"]) for r in item.results}
    assert verdicts == {"hit@1": (False, 0.0), "hit@3": (True, 1.0), "hit@5": (True, 1.0),
                        "reciprocal_rank": (True, 0.5)}
    assert [r["name"] for r in item.results] == metric_names(source())
    assert item.passed and not item.errored and item.answer is None
    assert item.sample["retrieval"]["rank"] == 2 and item.sample["output"] == []
    assert [r["rank"] for r in item.sample["search_results"]] == [1, 2, 3]
    assert item.sample["search_results"][1]["text"] == WARRANTY
    assert item.sample["search_results"][1]["chunk"] == {"index": 0}


async def test_not_found_within_the_largest_k_fails() -> None:
    item = await retrieval_item({"question": "q", "file_id": "f3"}, source(ks=[1, 2]),
                                Gateway(FOUND))
    assert not item.passed
    assert {r["name"]: r["passed"] for r in item.results} == {
        "hit@1": False, "hit@2": False, "reciprocal_rank": True}  # found, at rank 3


async def test_rag_answer_passes_only_when_a_citation_holds_the_span() -> None:
    cited = [{"index": 1, "file_id": "f2", "quote": WARRANTY}]
    gateway = Gateway(FOUND, cited)
    item = await retrieval_item(ITEM, source(rag=RAG), gateway)
    chat = gateway.asked[1][1]
    assert chat["retrieval"] == {"vector_store_ids": ["vs_1"], "max_num_results": 2,
                                 "search_mode": "hybrid"}
    assert chat["model"] == "chat" and chat["max_tokens"] == 8 and chat["temperature"] == 0
    assert {r["name"]: r["passed"] for r in item.results}["cited_span"] is True
    assert {r["name"]: r["passed"] for r in item.results}["answer_match"] is True
    assert item.passed and item.answer is not None and item.answer.text == "Seven years."
    assert item.sample["output"] == [{"role": "assistant", "content": "Seven years."}]
    assert item.sample["citations"] == cited and item.sample["usage"]["total_tokens"] == 12

    uncited_gateway = Gateway(FOUND, [
        {"index": 1, "file_id": "f1", "quote": "Kettles boil water."}])
    only = {"type": "eq", "key": "year", "value": 2024}
    uncited = await retrieval_item(ITEM, source(rag={**RAG, "score_threshold": 0.4},
                                                filters=only), uncited_gateway)
    assert not uncited.passed  # found by search, but the answer cites the wrong source
    assert uncited_gateway.asked[1][1]["retrieval"] == {  # the same store, filters and mode
        "vector_store_ids": ["vs_1"], "max_num_results": 2, "search_mode": "hybrid",
        "filters": only, "score_threshold": 0.4}
    # Without a span or answer there is nothing to check the citations against.
    by_file = await retrieval_item({"question": "q", "file_id": "f2"}, source(rag=RAG),
                                   Gateway(FOUND))
    assert by_file.passed and {r["name"] for r in by_file.results} == {
        "hit@1", "hit@3", "hit@5", "reciprocal_rank"}


async def test_failed_calls_error_the_item_and_its_metrics() -> None:
    failed = await retrieval_item(ITEM, source(rag=RAG), Gateway(FOUND, fail="search"))
    assert failed.errored and not failed.passed
    assert [r["name"] for r in failed.results] == metric_names(source(rag=RAG))
    assert all(r["error"] == "search broke" for r in failed.results)
    assert failed.sample["error"] == {"code": "http_500", "message": "search broke"}
    unanswered = await retrieval_item(ITEM, source(rag=RAG), Gateway(FOUND, fail="chat"))
    assert unanswered.errored and unanswered.sample["search_results"]
    errors = {r["name"]: r["error"] for r in unanswered.results}
    assert errors["hit@1"] is None and errors["cited_span"] == "no replica"


def test_excerpts_show_the_span() -> None:
    text = "x" * 1000 + " the SPAN here " + "y" * 1000
    shown = excerpt(text, "span here", size=100)
    assert "SPAN here" in shown and shown.startswith("…") and shown.endswith("…")
    assert len(shown) == 102
    assert excerpt(text, None, size=100) == "x" * 100 + "…"
    assert excerpt("short", "absent") == "short"


def test_default_ks_and_the_run_summary() -> None:
    assert default_ks(10) == [1, 3, 5, 10] and default_ks(4) == [1, 3, 4]
    assert default_ks(1) == [1]
    tallies = {"hit@1": {"passed": 1, "failed": 2, "errored": 1},
               "hit@3": {"passed": 3, "failed": 0, "errored": 1},
               "reciprocal_rank": {"passed": 3, "failed": 0, "errored": 1,
                                   "score_sum": 1 + 0.5 + 1 / 3},
               "cited_span": {"passed": 1, "failed": 1, "errored": 0}}
    figures = summary({"ks": [1, 3], "rag": {"model": "chat"}}, tallies, 4)
    assert figures == {"questions": 4, "recall_at": {"1": 0.25, "3": 0.75},
                       "mrr": (1 + 0.5 + 1 / 3) / 4, "search_errors": 1,
                       "cited_span_rate": 0.5, "answer_match_rate": None}
    assert summary({"ks": [1]}, {}, 0)["recall_at"] == {"1": 0.0}
