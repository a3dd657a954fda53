"""One item of a retrieval eval run (`vector_store_search`): search the vector store through
the gateway as the run's key and score where what answers the question ranks; with `rag`, ask
the model for an answer grounded in the store (the chat `retrieval` extension) and check that
a cited source holds the expected span or answer. The eval's own testing criteria, which grade
that answer, are applied by the run (`evals.runner`).

An item passes when what answers it is within the top max(ks) results and, with `rag`, a
citation holds its span (or answer) where it has one. hit@k for smaller k, the reciprocal rank
and answer_match are reported, not decisive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from evals.client import Completion, ModelCallError
from evals.data import sampling_params, wire_sample
from evals.retrieval.metrics import (
    QuestionResult,
    RetrievalQuestion,
    parse_questions,
    result_text,
    score_question,
)
from evals.retrieval.source import (
    ANSWER_MATCH,
    CITED_SPAN,
    RECIPROCAL_RANK,
    hit_name,
    metric_names,
)

__all__ = ["EXCERPT_CHARS", "RetrievalClient", "RetrievalItem", "excerpt", "retrieval_item"]

EXCERPT_CHARS = 300  # of each search result's text, in the output item


class RetrievalClient(Protocol):
    """What an item needs of the gateway (`evals.client.ItemClient`)."""

    async def search(self, vector_store_id: str, **options: Any) -> list[dict[str, Any]]: ...

    async def complete(self, model: str, messages: list[dict[str, Any]],
                       **params: Any) -> Completion: ...


@dataclass(frozen=True)
class RetrievalItem:
    sample: dict[str, Any]  # the output item's sample: OpenAI's shape and our search results
    results: list[dict[str, Any]]  # one per metric checked, named as in metric_names
    passed: bool  # the deciding metrics passed
    answer: Completion | None  # the RAG answer, for the eval's testing criteria
    errored: bool


def excerpt(text: str, span: str | None = None, size: int = EXCERPT_CHARS) -> str:
    """At most `size` characters of a result's text: around the expected span when the text
    holds it (so a reviewer sees why it counted), else its beginning."""
    if len(text) <= size:
        return text
    start = 0
    words = span.split() if span else []
    # The span as relevance sees it (any whitespace, any case), found in the original text.
    found = re.search(r"\s+".join(map(re.escape, words)), text, re.IGNORECASE) if words \
        else None
    if found is not None:
        start = max(0, min(found.start() - size // 4, len(text) - size))
    cut = text[start:start + size]
    return ("…" if start else "") + cut + ("…" if start + size < len(text) else "")


async def retrieval_item(item: dict[str, Any], data_source: dict[str, Any],
                         client: RetrievalClient) -> RetrievalItem:
    question = parse_questions([item])[0]  # checked when the run was created
    ks = list(data_source["ks"])
    rag = data_source.get("rag")
    messages = [{"role": "user", "content": question.question}]
    params = sampling_params(rag.get("sampling_params")) if rag else {}
    model = str(rag["model"]) if rag else ""
    search: dict[str, Any] = {"query": question.question,
                              "max_num_results": data_source["max_num_results"],
                              "search_mode": data_source.get("search_mode", "hybrid"),
                              "include_chunk": True}  # the sample shows which chunk ranked
    if data_source.get("filters") is not None:
        search["filters"] = data_source["filters"]
    try:
        found = await client.search(data_source["vector_store_id"], **search)
    except ModelCallError as exc:
        failed = {"code": exc.code, "message": str(exc)[:1000]}
        sample = _sample(messages, None, model, params, failed, question, [], None)
        return RetrievalItem(sample, [_errored(n, failed) for n in metric_names(data_source)],
                             False, None, True)
    answer: Completion | None = None
    error: dict[str, str] | None = None
    if rag:
        grounding: dict[str, Any] = {
            "vector_store_ids": [data_source["vector_store_id"]],
            "max_num_results": rag.get("max_num_results", 5),
            "search_mode": search["search_mode"]}
        if data_source.get("filters") is not None:
            grounding["filters"] = data_source["filters"]
        if rag.get("score_threshold") is not None:
            grounding["score_threshold"] = rag["score_threshold"]
        try:
            answer = await client.complete(model, messages, retrieval=grounding, **params)
        except ModelCallError as exc:
            error = {"code": exc.code, "message": str(exc)[:1000]}
    scored = _score(question, found, ks, answer)
    results = _results(scored, ks, rag is not None, error)
    decisive = [r for r in results if r["name"] in (hit_name(max(ks)), CITED_SPAN)]
    passed = error is None and all(r["passed"] for r in decisive)
    sample = _sample(messages, answer, model, params, error, question, found, scored)
    return RetrievalItem(sample, results, passed, answer, error is not None)


def _score(question: RetrievalQuestion, found: list[dict[str, Any]], ks: list[int],
           answer: Completion | None) -> QuestionResult:
    rag = None if answer is None else {"text": answer.text, "citations": answer.citations}
    return score_question(question, found, ks, rag)


def _result(name: str, passed: bool, score: float, detail: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "type": "retrieval", "passed": passed, "score": score,
            "sample": None, "error": None, "detail": detail}


def _errored(name: str, error: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "type": "retrieval", "passed": False, "score": 0.0, "sample": None,
            "error": error["message"], "detail": {"code": error["code"]}}


def _results(scored: QuestionResult, ks: list[int], rag: bool,
             rag_error: dict[str, str] | None) -> list[dict[str, Any]]:
    rank = scored.rank
    results = [_result(hit_name(k), scored.hits[k], float(scored.hits[k]),
                       {"rank": rank, "k": k}) for k in ks]
    results.append(_result(RECIPROCAL_RANK, rank is not None, scored.reciprocal_rank,
                           {"rank": rank}))
    if not rag:
        return results
    for name, verdict in ((CITED_SPAN, scored.cited_span), (ANSWER_MATCH, scored.answer_match)):
        if rag_error is not None:
            results.append(_errored(name, rag_error))
        elif verdict is not None:  # None: the item has nothing to check this against
            results.append(_result(name, verdict, float(verdict), {}))
    return results


def _sample(messages: list[dict[str, str]], answer: Completion | None, model: str,
            params: dict[str, Any], error: dict[str, str] | None,
            question: RetrievalQuestion, found: list[dict[str, Any]],
            scored: QuestionResult | None) -> dict[str, Any]:
    if answer is None:
        sample = wire_sample(messages, "", model, "", {}, error, params)
        sample["output"] = []  # no answer was asked for, or it failed
    else:
        sample = wire_sample(messages, answer.text, model, answer.finish_reason,
                             answer.usage, error, params)
        sample["citations"] = [{**c, "quote": excerpt(str(c.get("quote") or ""),
                                                      question.span or question.answer)}
                               for c in answer.citations]
    sample["search_results"] = [
        {"rank": rank, "file_id": r.get("file_id"), "filename": r.get("filename"),
         "score": r.get("score"), "chunk": r.get("chunk"),
         "text": excerpt(result_text(r), question.span)}
        for rank, r in enumerate(found, 1)]
    if scored is not None:
        sample["retrieval"] = {"rank": scored.rank, "reciprocal_rank": scored.reciprocal_rank,
                               "cited_span": scored.cited_span,
                               "answer_match": scored.answer_match}
    return sample
