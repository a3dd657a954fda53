"""The hybrid ranker: reciprocal rank fusion, refined by the candidates themselves.

Plain hybrid search fuses a dense and a sparse candidate list (RRF). The feedback ranker
(`QdrantIndex.search(..., feedback=True)`, the API's default `ranker: "auto"`) adds two
classic steps that use only what the first search returned:

1. Score regularization (the cluster hypothesis: similar chunks deserve similar scores): each
   candidate's fused score is blended with the mean score of its `NEIGHBOURS` most similar
   candidates from other files (cosine of their stored dense vectors), so a lone chunk that
   one list ranked high by accident drops, and a chunk among relevant ones rises.
2. Pseudo-relevance feedback from the `FEEDBACK_CHUNKS` best candidates: Rocchio on the dense
   query (moved towards their mean vector) and RM3-style expansion of the sparse one (their
   most weighted BM25 terms added at less than the query's own weight), then a second hybrid
   search with both, regularized again.

On Cranfield the ranker takes hybrid nDCG@10 from 0.395 to 0.427 through the API and helps on
both halves of the queries (docs/benchmarks.md); it costs a second search: at 100k chunks
p50 20 ms against plain fusion's 5 ms, so `ranker: "none"` stays the fast path. The
feedback constants are the ones textbooks start from (Rocchio's beta 1, five feedback
documents, ten expansion terms); BLEND and NEIGHBOURS were picked from a small grid on
Cranfield (0.2-0.6, 2-10). bench/retrieval_tuning.py shows each constant changed alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.sparse import SparseVector

__all__ = ["CANDIDATES", "FEEDBACK_CHUNKS", "expand", "regularize"]

CANDIDATES = 50  # fused candidates each step reorders
NEIGHBOURS = 3
BLEND = 0.4  # weight of the neighbours' mean score
FEEDBACK_CHUNKS = 5
DENSE_BETA = 1.0
EXPANSION_TERMS = 10
EXPANSION_WEIGHT = 0.5  # of the best expansion term; the query's own terms weigh 1 or more


def regularize(scores: Sequence[float], vectors: Sequence[Sequence[float]],
               files: Sequence[str], query: Sequence[float]) -> list[int]:
    """Candidate positions, best first, after blending each fused score with those of its
    most similar candidates from other files. `vectors` are the candidates' dense vectors
    (unit length); chunks of one file overlap, so they are not evidence for each other.
    Equal scores go to the candidate nearer the dense `query`."""
    n = len(scores)
    if n <= 1:
        return list(range(n))
    s = np.asarray(scores, dtype=np.float64)
    s = s / (s.max() or 1.0)
    v = np.asarray(vectors, dtype=np.float32)  # half the work of float64, same nDCG
    # einsum, not `v @ v.T`: BLAS would start threads that, on a busy machine (vLLM beside
    # us), wait for cores: p99 of this step 29 ms instead of 5 ms.
    similarity = np.einsum("id,jd->ij", v, v)
    file = np.asarray(files)
    similarity[file[:, None] == file[None, :]] = -np.inf  # the diagonal too
    k = min(NEIGHBOURS, n - 1)
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    valid = np.isfinite(np.take_along_axis(similarity, nearest, axis=1))
    count = valid.sum(axis=1)
    neighbours = np.where(count > 0, (s[nearest] * valid).sum(axis=1) / np.maximum(count, 1), s)
    # Rank fusion ties often (ranks 1+2 and 2+1), and the engine lists tied points in no set
    # order, so ties, to rounding, are broken here: one order for one query, every time.
    blended = np.round((1 - BLEND) * s + BLEND * neighbours, 9)
    nearness = np.einsum("id,d->i", v, np.asarray(query, dtype=np.float64))
    return [int(i) for i in np.lexsort((-nearness, -blended))]


def expand(dense: Sequence[float], sparse: SparseVector,
           feedback: Sequence[tuple[Sequence[float], SparseVector]]) -> tuple[list[float],
                                                                          SparseVector]:
    """The query moved towards `feedback` (dense and sparse vectors of the best chunks)."""
    if not feedback:
        return list(dense), sparse
    q = np.asarray(dense, dtype=np.float64)
    centroid = np.mean([np.asarray(d, dtype=np.float64) for d, _ in feedback], axis=0)
    moved = q + DENSE_BETA * centroid
    moved /= np.linalg.norm(moved) or 1.0
    # Each chunk's BM25 weights as a distribution, averaged: long chunks do not dominate.
    weights: dict[int, float] = {}
    for _, chunk in feedback:
        total = sum(chunk.values) or 1.0
        for term, value in zip(chunk.indices, chunk.values, strict=True):
            weights[term] = weights.get(term, 0.0) + value / total / len(feedback)
    expanded = dict(zip(sparse.indices, sparse.values, strict=True))
    best = sorted(weights, key=lambda t: -weights[t])[:EXPANSION_TERMS]
    for term in best:
        expanded[term] = (expanded.get(term, 0.0)
                          + EXPANSION_WEIGHT * weights[term] / weights[best[0]])
    indices = sorted(expanded)
    return moved.tolist(), SparseVector(indices, [expanded[t] for t in indices])
