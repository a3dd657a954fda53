"""Retrieval metrics: relevance by file or span, hit@k, reciprocal rank, recall@k and MRR over
questions, and whether a RAG answer's citations hold the expected span."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from evals.retrieval.metrics import (
    RetrievalQuestion,
    cited_contains,
    evaluate_retrieval,
    first_relevant_rank,
    parse_questions,
    report,
    result_text,
    score_question,
)


def hit(file_id: str, text: str, filename: str = "") -> dict[str, Any]:
    """A result as the vector store search API returns it."""
    return {"file_id": file_id, "filename": filename or f"{file_id}.txt", "score": 0.5,
            "content": [{"type": "text", "text": text}]}


RESULTS = [hit("f1", "Kettles boil water."), hit("f2", "The warranty lasts\n seven YEARS."),
           hit("f3", "Descale every three months."), hit("f2", "Keep the receipt.")]


def test_relevance_by_file_id_filename_or_span() -> None:
    assert first_relevant_rank(RetrievalQuestion("q", file_id="f2"), RESULTS) == 2
    assert first_relevant_rank(RetrievalQuestion("q", filename="f3.txt"), RESULTS) == 3
    # A span wins over the file: the chunk must contain it (whitespace and case normalised).
    assert first_relevant_rank(RetrievalQuestion("q", file_id="f2", span="keep the RECEIPT"),
                               RESULTS) == 4
    assert first_relevant_rank(RetrievalQuestion("q", span="warranty lasts seven years"),
                               RESULTS) == 2
    assert first_relevant_rank(RetrievalQuestion("q", file_id="f9"), RESULTS) is None


def test_score_question_hits_and_reciprocal_rank() -> None:
    result = score_question(RetrievalQuestion("q", file_id="f3"), RESULTS, ks=(1, 3, 5))
    assert result.rank == 3
    assert result.hits == {1: False, 3: True, 5: True}
    assert result.reciprocal_rank == pytest.approx(1 / 3)
    missed = score_question(RetrievalQuestion("q", file_id="f9"), RESULTS, ks=(1, 3))
    assert (missed.rank, missed.hits, missed.reciprocal_rank) == (None, {1: False, 3: False}, 0)


def test_report_recall_at_k_and_mrr_by_hand() -> None:
    questions = [RetrievalQuestion("a", file_id="f1"),   # rank 1
                 RetrievalQuestion("b", file_id="f2"),   # rank 2
                 RetrievalQuestion("c", file_id="f3"),   # rank 3
                 RetrievalQuestion("d", file_id="f9")]   # missed
    ks = (1, 3, 5)
    summary = report([score_question(q, RESULTS, ks) for q in questions], ks)
    assert summary.count == 4 and summary.errors == 0
    assert summary.recall_at == {1: 0.25, 3: 0.75, 5: 0.75}
    assert summary.mrr == pytest.approx((1 + 1 / 2 + 1 / 3 + 0) / 4)
    assert summary.cited_span_rate is None and summary.answer_match_rate is None
    data = summary.to_dict()
    assert data["recall_at"] == {"1": 0.25, "3": 0.75, "5": 0.75}
    assert data["questions"][1]["rank"] == 2


def test_empty_report() -> None:
    summary = report([], (1, 5))
    assert (summary.count, summary.recall_at, summary.mrr) == (0, {1: 0.0, 5: 0.0}, 0.0)


def test_citations_contain_span_or_answer() -> None:
    citations = [{"index": 1, "file_id": "f2", "quote": "The warranty lasts\nseven years."}]
    assert cited_contains("Seven   years", citations)
    assert not cited_contains("ten years", citations)
    assert not cited_contains("seven years", [])
    rag = {"choices": [{"message": {"role": "assistant",
                                    "content": "It lasts Seven years [1]."}}],
           "citations": citations}
    question = RetrievalQuestion("How long?", file_id="f2", span="warranty lasts seven years",
                                 answer="seven years")
    result = score_question(question, RESULTS, (1,), rag)
    assert (result.cited_span, result.answer_match) == (True, True)
    wrong = score_question(question, RESULTS, (1,), {"text": "Two years.", "citations": [
        {"file_id": "f1", "text": "Kettles boil water."}]})
    assert (wrong.cited_span, wrong.answer_match) == (False, False)
    # Without a span, the expected answer is what a citation must contain.
    no_span = RetrievalQuestion("How long?", file_id="f2", answer="seven years")
    assert score_question(no_span, RESULTS, (1,), rag).cited_span is True


def test_result_text_shapes() -> None:
    assert result_text({"text": "a"}) == "a"
    assert result_text({"quote": "b"}) == "b"
    assert result_text({"content": [{"type": "text", "text": "c"},
                                    {"type": "text", "text": "d"}]}) == "c\nd"
    assert result_text({}) == ""


def test_parse_questions() -> None:
    rows = [{"question": "q1", "file_id": "f1"},
            {"question": "q2", "filename": "a.txt", "span": "s", "answer": "x"}]
    assert parse_questions(rows) == [
        RetrievalQuestion("q1", file_id="f1"),
        RetrievalQuestion("q2", filename="a.txt", span="s", answer="x")]
    with pytest.raises(ValueError, match="row 1: name what answers the question"):
        parse_questions([rows[0], {"question": "q3"}])
    with pytest.raises(ValueError, match="row 0: question is required"):
        parse_questions([{"file_id": "f1"}])
    with pytest.raises(ValueError, match="row 0: span must be a non-empty string"):
        parse_questions([{"question": "q", "span": 3}])


async def test_evaluate_retrieval_drives_search_and_answer() -> None:
    corpus = {"kettle": RESULTS[:2], "descale": RESULTS[2:], "broken": None}
    asked: list[str] = []

    async def search(question: str) -> Sequence[Mapping[str, Any]]:
        results = corpus[question]
        if results is None:
            raise ConnectionError("gateway down")
        return results

    async def answer(question: str) -> Mapping[str, Any]:
        asked.append(question)
        return {"text": "Seven years.", "citations": [{"quote": RESULTS[1]["content"][0]["text"]}]}

    summary = await evaluate_retrieval(
        [{"question": "kettle", "file_id": "f2", "answer": "seven years"},
         RetrievalQuestion("descale", span="every three months"),
         {"question": "broken", "file_id": "f1"}],
        search, answer, ks=(3, 1))
    assert summary.recall_at == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    assert summary.mrr == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert summary.errors == 1
    assert summary.questions[2].error == "ConnectionError: gateway down"
    assert summary.questions[2].hits == {1: False, 3: False}
    assert summary.answer_match_rate == 1.0  # only the first question has an answer to match
    assert summary.cited_span_rate == 0.5  # the descale answer cites the warranty chunk
    assert sorted(asked) == ["descale", "kettle"]


async def test_evaluate_retrieval_rejects_bad_ks() -> None:
    async def search(question: str) -> Sequence[Mapping[str, Any]]:
        return []

    with pytest.raises(ValueError, match="ks must be positive"):
        await evaluate_retrieval([RetrievalQuestion("q", file_id="f")], search, ks=(0,))
