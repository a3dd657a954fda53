"""The feedback ranker's two steps, on vectors small enough to check by hand."""

from __future__ import annotations

import numpy as np

from retrieval import SparseVector
from retrieval.feedback import EXPANSION_TERMS, EXPANSION_WEIGHT, expand, regularize


def unit(*xs: float) -> list[float]:
    v = np.array([*xs, *[0.0] * (4 - len(xs))])
    return list(v / np.linalg.norm(v))


QUERY = unit(1, 1, 1, 1)


def test_a_lone_top_chunk_drops_below_one_among_relevant_chunks() -> None:
    # 0: the fused top, but alike only chunks that scored low; 1-3: a close group scoring high.
    vectors = [unit(1, 0), unit(0.1, 1), unit(0.1, 1, 0.1), unit(0.1, 1, 0, 0.1),
               unit(1, 0, 0.1), unit(1, 0, 0, 0.1)]
    scores = [1.0, 0.95, 0.9, 0.9, 0.3, 0.3]
    order = regularize(scores, vectors, ["a", "b", "c", "d", "e", "f"], QUERY)
    assert order[0] == 1
    assert order.index(0) > order.index(3)
    assert sorted(order) == list(range(6))


def test_regularize_keeps_the_fused_order_when_nothing_else_tells_candidates_apart() -> None:
    assert regularize([], [], [], QUERY) == []
    assert regularize([0.5], [unit(1)], ["a"], QUERY) == [0]
    same = [unit(1, 1)] * 4
    assert regularize([0.4, 0.3, 0.2, 0.1], same, ["a", "b", "c", "d"], QUERY) == [0, 1, 2, 3]


def test_tied_scores_give_one_order_whatever_order_the_engine_listed_them_in() -> None:
    # Two overlapping chunks of one file tie in rank fusion (ranks 1+2 and 2+1) and share
    # their neighbours from other files: the one nearer the query goes first, every time.
    query = unit(1, 0)
    near, far = unit(1, 0.1), unit(1, 0.3)
    others = [unit(0.5, 1), unit(0.4, 1), unit(0.3, 1, 0.1)]
    fused = 1 / 61 + 1 / 62
    for chunks in ([near, far], [far, near]):
        order = regularize([fused, fused, 0.02, 0.019, 0.018], [*chunks, *others],
                           ["a", "a", "b", "c", "d"], query)
        assert [chunks[i] for i in order[:2]] == [near, far]


def test_chunks_of_one_file_are_not_evidence_for_each_other() -> None:
    # 1, 2 and 8 are alike, among weak 5 and 6; 0 leads 3, 4 and 7, alike and fair.
    vectors = [unit(1, 0), unit(0, 1), unit(0, 1, 0.02), unit(1, 0, 0.1), unit(1, 0, 0, 0.1),
               unit(0, 1, 0, 0.3), unit(0, 1, 0.3, 0.3), unit(1, 0, 0.1, 0.1),
               unit(0, 1, 0.02, 0.02)]
    scores = [0.9, 1.0, 0.95, 0.75, 0.75, 0.2, 0.2, 0.75, 0.95]
    order = regularize(scores, vectors, list("abcdefghi"), QUERY)
    assert order[0] == 1 and sorted(order[1:3]) == [2, 8]
    # The same three as overlapping chunks of one file: only 5, 6 and 0's group vouch for 1.
    order = regularize(scores, vectors, list("abbdefghb"), QUERY)
    assert order[:2] == [0, 1] and order.index(2) > order.index(3)
    # A file with no other candidate keeps its own score.
    assert regularize([1.0, 0.5], [unit(1), unit(1, 0.1)], ["a", "a"], QUERY) == [0, 1]


def test_expand_moves_the_dense_query_towards_the_feedback_chunks() -> None:
    query = unit(1, 0)
    chunks = [unit(0, 1), unit(0.2, 1)]
    centroid = np.mean(chunks, axis=0)
    moved, _ = expand(query, SparseVector([1], [1.0]),
                      [(c, SparseVector([1], [1.0])) for c in chunks])
    assert abs(np.linalg.norm(moved) - 1) < 1e-9
    assert np.dot(moved, centroid) > np.dot(query, centroid)
    assert np.dot(moved, query) > 0.5  # moved, not replaced


def test_expand_adds_the_feedback_terms_below_the_query_terms() -> None:
    query = SparseVector([5, 9], [1.0, 1.0])
    # Term 9 is the query's own; 100+ are the feedback's, 100 the heaviest in both chunks.
    first = SparseVector([9, *range(100, 120)], [0.5, 3.0, *[0.1] * 19])
    second = SparseVector([100, 101], [2.0, 1.0])
    _, sparse = expand(unit(1), query, [(unit(1), first), (unit(1), second)])
    weights = dict(zip(sparse.indices, sparse.values, strict=True))
    assert sparse.indices == sorted(sparse.indices)
    assert weights[5] == 1.0 and weights[9] > 1.0  # a query term found in feedback gains
    assert weights[100] == EXPANSION_WEIGHT  # the heaviest feedback term
    added = set(weights) - {5, 9}
    assert 0 < len(added) <= EXPANSION_TERMS and 101 in added
    assert all(0 < weights[t] <= EXPANSION_WEIGHT for t in added)


def test_expand_without_feedback_is_the_query() -> None:
    sparse = SparseVector([3], [1.0])
    assert expand(unit(1, 1), sparse, []) == (unit(1, 1), sparse)
