"""Retrieval evaluation: how well a vector store finds what answers each question.

Each question names what answers it: a file (`file_id` or `filename`) and/or a `span` of text.
A search result is relevant when its text contains the span (whitespace and case normalised),
or, for a question without a span, when it comes from the expected file. Per question we report
the rank of the first relevant result, hit@k and the reciprocal rank; over all questions,
recall@k (the share of questions answered in the top k) and MRR. For RAG answers, we check
whether a cited source contains the expected span (or answer) and whether the answer states the
expected answer.

The functions are pure; `evaluate_retrieval` only drives the runner's async search and answer
callables (the gateway's vector store search and chat endpoints).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "QuestionResult",
    "RetrievalQuestion",
    "RetrievalReport",
    "cited_contains",
    "evaluate_retrieval",
    "first_relevant_rank",
    "normalize",
    "parse_questions",
    "report",
    "result_text",
    "score_question",
]

DEFAULT_KS = (1, 3, 5, 10)
Search = Callable[[str], Awaitable[Sequence[Mapping[str, Any]]]]
Answer = Callable[[str], Awaitable[Mapping[str, Any]]]

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class RetrievalQuestion:
    question: str
    file_id: str | None = None
    filename: str | None = None
    span: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class QuestionResult:
    question: str
    rank: int | None
    """1-based rank of the first relevant result; None when none was returned."""
    hits: dict[int, bool]
    """hit@k for each k: a relevant result among the top k (recall@k for one target)."""
    reciprocal_rank: float
    cited_span: bool | None = None
    """Whether a cited source of the RAG answer contains the span (or answer); None: no check."""
    answer_match: bool | None = None
    """Whether the RAG answer's text contains the expected answer; None: no answer to check."""
    error: str | None = None


@dataclass(frozen=True)
class RetrievalReport:
    count: int
    recall_at: dict[int, float]
    mrr: float
    cited_span_rate: float | None
    answer_match_rate: float | None
    errors: int
    questions: list[QuestionResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count, "mrr": self.mrr, "errors": self.errors,
            "recall_at": {str(k): v for k, v in self.recall_at.items()},
            "cited_span_rate": self.cited_span_rate, "answer_match_rate": self.answer_match_rate,
            "questions": [{"question": q.question, "rank": q.rank,
                           "hits": {str(k): v for k, v in q.hits.items()},
                           "reciprocal_rank": q.reciprocal_rank, "cited_span": q.cited_span,
                           "answer_match": q.answer_match, "error": q.error}
                          for q in self.questions],
        }


def parse_questions(rows: Iterable[Mapping[str, Any]]) -> list[RetrievalQuestion]:
    """Questions from JSONL rows; raises ValueError naming the row (0-based) that is wrong."""
    return [_parse_row(i, row) for i, row in enumerate(rows)]


def _parse_row(i: int, row: Mapping[str, Any]) -> RetrievalQuestion:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {i}: a question must be a JSON object")
    values: dict[str, str | None] = {}
    for key in ("question", "file_id", "filename", "span", "answer"):
        value = row.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"row {i}: {key} must be a non-empty string")
        values[key] = value
    if values["question"] is None:
        raise ValueError(f"row {i}: question is required")
    if not (values["file_id"] or values["filename"] or values["span"]):
        raise ValueError(f"row {i}: name what answers the question: file_id, filename or span")
    return RetrievalQuestion(str(values["question"]), values["file_id"], values["filename"],
                             values["span"], values["answer"])


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def result_text(result: Mapping[str, Any]) -> str:
    """The text of a search result or citation: `text`, `quote` (our citations), or the
    text parts of `content` (OpenAI's vector store search results)."""
    for key in ("text", "quote"):
        if isinstance(result.get(key), str):
            return str(result[key])
    content = result.get("content")
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def _is_relevant(question: RetrievalQuestion, result: Mapping[str, Any]) -> bool:
    if question.span is not None:
        return normalize(question.span) in normalize(result_text(result))
    if question.file_id is not None:
        return result.get("file_id") == question.file_id
    return result.get("filename") == question.filename


def first_relevant_rank(question: RetrievalQuestion, results: Sequence[Mapping[str, Any]]
                        ) -> int | None:
    """1-based rank of the first relevant result, or None."""
    for rank, result in enumerate(results, 1):
        if _is_relevant(question, result):
            return rank
    return None


def cited_contains(expected: str, citations: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any cited source's text contains `expected` (normalised whitespace and case)."""
    wanted = normalize(expected)
    return any(wanted in normalize(result_text(c)) for c in citations)


def score_question(question: RetrievalQuestion, results: Sequence[Mapping[str, Any]],
                   ks: Sequence[int] = DEFAULT_KS, rag: Mapping[str, Any] | None = None
                   ) -> QuestionResult:
    """Score one question from its ranked search results and, optionally, its RAG answer
    (`{"text"|"content": ..., "citations": [...]}` or a whole chat completion)."""
    rank = first_relevant_rank(question, results)
    cited = matched = None
    if rag is not None:
        text, citations = _answer_parts(rag)
        expected = question.span or question.answer
        if expected is not None:
            cited = cited_contains(expected, citations)
        if question.answer is not None:
            matched = normalize(question.answer) in normalize(text)
    return QuestionResult(question.question, rank,
                          {k: rank is not None and rank <= k for k in ks},
                          1.0 / rank if rank else 0.0, cited, matched)


def report(results: Sequence[QuestionResult], ks: Sequence[int] = DEFAULT_KS
           ) -> RetrievalReport:
    """Aggregate per-question results; a question that errored counts as a miss."""
    n = len(results)

    def rate(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    return RetrievalReport(
        count=n,
        recall_at={k: sum(r.hits.get(k, False) for r in results) / n if n else 0.0 for k in ks},
        mrr=sum(r.reciprocal_rank for r in results) / n if n else 0.0,
        cited_span_rate=rate([r.cited_span for r in results if r.cited_span is not None]),
        answer_match_rate=rate([r.answer_match for r in results if r.answer_match is not None]),
        errors=sum(r.error is not None for r in results),
        questions=list(results),
    )


async def evaluate_retrieval(
    questions: Sequence[RetrievalQuestion | Mapping[str, Any]],
    search: Search,
    answer: Answer | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    concurrency: int = 4,
) -> RetrievalReport:
    """Search (and, with `answer`, ask) for every question, then score and aggregate.

    `search(question)` returns the ranked results (at least max(ks) of them should be asked
    for); `answer(question)` returns the RAG answer with its citations. A call that fails is
    recorded as that question's error and counts as a miss."""
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError("ks must be positive integers")
    ks = sorted(set(ks))
    parsed = [q if isinstance(q, RetrievalQuestion) else _parse_row(i, q)
              for i, q in enumerate(questions)]
    gate = asyncio.Semaphore(concurrency)

    async def one(question: RetrievalQuestion) -> QuestionResult:
        async with gate:
            try:
                results = await search(question.question)
                rag = await answer(question.question) if answer is not None else None
            except Exception as exc:  # one failed call must not sink the whole report
                return QuestionResult(question.question, None, dict.fromkeys(ks, False), 0.0,
                                      error=f"{type(exc).__name__}: {exc}"[:500])
            return score_question(question, results, ks, rag)

    return report(await asyncio.gather(*(one(q) for q in parsed)), ks)


def _answer_parts(rag: Mapping[str, Any]) -> tuple[str, list[Mapping[str, Any]]]:
    citations = rag.get("citations") or []
    if isinstance(rag.get("choices"), list) and rag["choices"]:
        message = rag["choices"][0].get("message") or {}
        text = message.get("content") or ""
    else:
        text = rag.get("text") or rag.get("content") or ""
    return str(text), [c for c in citations if isinstance(c, Mapping)]
