"""Retrieval eval runs, as plain Python shared by the gateway (which checks such a run when it
is created and shows its figures) and the workers (which run it).

A `vector_store_search` run (our extension of OpenAI's run data sources) asks a vector store
each item's `question` and scores where what answers it (`file_id`, `filename` or `span`)
ranks; with `rag`, it also asks a model for an answer grounded in the store and checks that a
cited source holds the expected `span` (or `answer`). Each output item holds one result per
metric, named as in `metric_names`, so the run's per-criterion tallies, kept in the same
transaction as its items, are all that is needed for its recall@k and MRR (`summary`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evals.data import DataError, Row
from evals.retrieval.metrics import RetrievalQuestion, parse_questions

__all__ = [
    "ANSWER_MATCH",
    "CITED_SPAN",
    "DEFAULT_KS",
    "MAX_RESULTS",
    "RECIPROCAL_RANK",
    "VECTOR_STORE_SEARCH",
    "default_ks",
    "hit_name",
    "metric_names",
    "questions",
    "summary",
]

VECTOR_STORE_SEARCH = "vector_store_search"
MAX_RESULTS = 50  # the vector store search API's own bound on max_num_results
DEFAULT_KS = (1, 3, 5, 10)
RECIPROCAL_RANK = "reciprocal_rank"
CITED_SPAN = "cited_span"
ANSWER_MATCH = "answer_match"


def default_ks(max_num_results: int) -> list[int]:
    """The usual cut-offs below `max_num_results`, and `max_num_results` itself."""
    return [k for k in DEFAULT_KS if k < max_num_results] + [max_num_results]


def hit_name(k: int) -> str:
    return f"hit@{k}"


def metric_names(data_source: Mapping[str, Any]) -> list[str]:
    """The results each item of the run holds, in the order runs show them."""
    names = [hit_name(k) for k in data_source["ks"]] + [RECIPROCAL_RANK]
    if data_source.get("rag"):
        names += [CITED_SPAN, ANSWER_MATCH]
    return names


def questions(rows: Sequence[Row], param: str = "data_source.source"
              ) -> list[RetrievalQuestion]:
    """Each row's item as a question; DataError naming the first that is not one."""
    try:
        return parse_questions(row.item for row in rows)
    except ValueError as exc:  # "row N: ...": items are numbered from 0 as in the API
        raise DataError(f"Item{str(exc).removeprefix('row')}. A retrieval item is "
                        '{"question", "file_id"?, "filename"?, "span"?, "answer"?}.',
                        param) from None


def summary(data_source: Mapping[str, Any], per_criteria: Mapping[str, Any], done: int
            ) -> dict[str, Any]:
    """A run's `retrieval` figures from its tallies. `done` counts every item stored, those
    that errored included: a question whose search failed counts as a miss, as it does in
    `evals.retrieval.metrics.report`. Rates over the items a check applies to (cited_span needs a
    span or answer, answer_match an answer) are None until one was checked."""

    def counts(name: str) -> dict[str, Any]:
        return dict(per_criteria.get(name) or {})

    def share(name: str) -> float | None:
        c = counts(name)
        checked = sum(int(c.get(k, 0)) for k in ("passed", "failed", "errored"))
        return int(c.get("passed", 0)) / checked if checked else None

    recall = {str(k): (int(counts(hit_name(k)).get("passed", 0)) / done if done else 0.0)
              for k in data_source["ks"]}
    mrr = float(counts(RECIPROCAL_RANK).get("score_sum", 0.0)) / done if done else 0.0
    rag = bool(data_source.get("rag"))
    return {"questions": done, "recall_at": recall, "mrr": mrr,
            "search_errors": int(counts(RECIPROCAL_RANK).get("errored", 0)),
            "cited_span_rate": share(CITED_SPAN) if rag else None,
            "answer_match_rate": share(ANSWER_MATCH) if rag else None}
