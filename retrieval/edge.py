"""The index embedded in-process with Qdrant Edge (`qdrant-edge-py`): one shard on disk.

Writes are searchable as soon as `update` returns, and durable then too: the shard's
write-ahead log is replayed on open (checked by killing a writer without `flush()`). We do
not flush per write, since a flush takes about 100 ms and holds the GIL; `close()` flushes.

The binding is safe to call from several threads, but holds the GIL inside its calls, so a
long call stalls every thread of the process (the gateway's event loop included). Searches
and upserts take milliseconds. Edge has no background optimizer: `optimize()` builds the
HNSW index and vacuums deleted points, but it freezes the process for its whole run (2.5 s
at 10k 384-dim points, 73-200 s at 100k on 2 cores). Unoptimized, a search scans the points
of its scope: under 10 ms p99 while a search scopes up to ~30k chunks (100k chunks over 10
tenants: hybrid p99 8.3 ms, no faster once optimized; see docs/benchmarks.md). Beyond that,
use a Qdrant server, or optimize with the gateway stopped. A shard folder is locked by the
process that opens it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from retrieval.filters import And, Condition, HasId, Match, MatchAny, Not, Or, Range
from retrieval.index import (
    DENSE_VECTOR,
    INDEXED_FIELDS,
    RRF_K,
    SPARSE_VECTOR,
    Found,
    Point,
    QdrantIndex,
    Query,
    stored_dense,
)
from retrieval.sparse import SparseVector

__all__ = ["EdgeIndex"]

# qdrant-edge-py 0.9.0 turns MatchValue(True) into MatchValue(1), which matches no stored
# boolean. Boolean attributes are therefore mirrored as keywords "key=true" / "key=false" in
# this payload field, which boolean filters match instead; searches never return it.
_BOOLS = "_bool_attributes"
_UPSERT_BATCH = 256


class EdgeIndex(QdrantIndex):
    """A Qdrant Edge shard at `path`, created (with its payload indexes) on first use."""

    def __init__(self, path: Path, dense_size: int) -> None:
        super().__init__(dense_size)
        self.path = path
        config = qe.EdgeConfig(
            vectors={DENSE_VECTOR: qe.EdgeVectorParams(size=dense_size,
                                                       distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)})
        if (path / "edge_config.json").exists():
            # Passing the config makes Edge check it against the shard (e.g. the dense size).
            self._shard = qe.EdgeShard.load(str(path), config)
        else:
            path.mkdir(parents=True, exist_ok=True)
            self._shard = qe.EdgeShard.create(str(path), config)
        # Also on load: a process may have died between creating the shard and its indexes.
        indexed = self._shard.info().payload_schema
        for field in INDEXED_FIELDS:
            if field not in indexed:
                schema = qe.KeywordIndexParams(is_tenant=field == "tenant")
                self._shard.update(qe.UpdateOperation.create_field_index(field, schema))
        self._shard.flush()
        self._closed = False

    def optimize(self) -> bool:
        """Build indexes and vacuum deletions; True when anything was optimized. Blocks the
        whole process while it runs (see the module docstring)."""
        with self._lock.write():
            optimized = self._shard.optimize()
            self._shard.flush()
            return optimized

    def close(self) -> None:
        with self._lock.write():
            if not self._closed:
                self._closed = True
                self._shard.flush()
                self._shard.close()

    def _upsert(self, points: Sequence[Point]) -> None:
        for i in range(0, len(points), _UPSERT_BATCH):
            batch = [_edge_point(p) for p in points[i:i + _UPSERT_BATCH]]
            self._shard.update(qe.UpdateOperation.upsert_points(batch))

    def _delete(self, condition: Condition) -> None:
        self._shard.update(qe.UpdateOperation.delete_points_by_filter(_filter(condition)))

    def _count(self, condition: Condition) -> int:
        return self._shard.count(qe.CountRequest(exact=True, filter=_filter(condition)))

    def _query(self, query: Query) -> list[Found]:
        scope = _filter(query.scope)
        idf = qe.SearchParams(idf=qe.IdfParams(corpus=_filter(query.idf_corpus)))
        request: qe.QueryRequest
        if query.mode == "hybrid":
            assert query.dense is not None and query.sparse is not None
            request = qe.QueryRequest(
                limit=query.limit,
                prefetches=[
                    qe.Prefetch(query.prefetch_limit, filter=scope,
                                query=qe.Query.Nearest(query.dense, using=DENSE_VECTOR)),
                    qe.Prefetch(query.prefetch_limit, filter=scope, params=idf,
                                query=qe.Query.Nearest(_sparse(query), using=SPARSE_VECTOR)),
                ],
                # The stubs type `query` as Fusion, but fusions are its nested classes.
                query=qe.Fusion.Rrf(k=RRF_K),  # type: ignore[arg-type]
                filter=scope, with_payload=["file"] if query.candidates_only else True,
                with_vector=[DENSE_VECTOR, SPARSE_VECTOR] if query.candidates_only
                else [DENSE_VECTOR])
        elif query.mode == "dense":
            assert query.dense is not None
            request = qe.QueryRequest(
                limit=query.limit, query=qe.Query.Nearest(query.dense, using=DENSE_VECTOR),
                filter=scope, with_payload=True)
        else:
            request = qe.QueryRequest(
                limit=query.limit, query=qe.Query.Nearest(_sparse(query), using=SPARSE_VECTOR),
                filter=scope, params=idf, with_payload=True)
        return [_found(p) for p in self._shard.query(request)]


def _sparse(query: Query) -> qe.SparseVector:
    assert query.sparse is not None
    return qe.SparseVector(query.sparse.indices, query.sparse.values)


def _edge_point(point: Point) -> qe.Point:
    payload = dict(point.payload)
    attributes = payload.get("attributes") or {}
    payload[_BOOLS] = [f"{k}={'true' if v else 'false'}" for k, v in attributes.items()
                       if isinstance(v, bool)]
    vectors: dict[str, Any] = {
        DENSE_VECTOR: point.dense,
        SPARSE_VECTOR: qe.SparseVector(point.sparse.indices, point.sparse.values)}
    return qe.Point(point.id, vectors, payload)


def _found(point: qe.ScoredPoint) -> Found:
    payload = dict(point.payload or {})
    payload.pop(_BOOLS, None)
    vectors = point.vector
    dense = vectors.get(DENSE_VECTOR) if isinstance(vectors, dict) else None
    bm25 = vectors.get(SPARSE_VECTOR) if isinstance(vectors, dict) else None
    sparse = (SparseVector(list(bm25.indices), list(bm25.values))
              if isinstance(bm25, qe.SparseVector) else None)
    return Found(str(point.id), point.score, payload, stored_dense(dense), sparse)


def _filter(condition: Condition) -> qe.Filter:
    converted = _condition(condition)
    return converted if isinstance(converted, qe.Filter) else qe.Filter(must=[converted])


def _condition(c: Condition) -> Any:
    if isinstance(c, Match):
        if isinstance(c.value, bool):
            key = c.key.removeprefix("attributes.")
            mirrored = f"{key}={'true' if c.value else 'false'}"
            return qe.FieldCondition(_BOOLS, match=qe.MatchValue(mirrored))
        return qe.FieldCondition(c.key, match=qe.MatchValue(c.value))
    if isinstance(c, MatchAny):
        return qe.FieldCondition(c.key, match=qe.MatchAny(list(c.values)))
    if isinstance(c, Range):
        return qe.FieldCondition(c.key, range=qe.RangeFloat(gt=c.gt, gte=c.gte, lt=c.lt,
                                                            lte=c.lte))
    if isinstance(c, HasId):
        return qe.HasIdCondition(set(c.ids))
    if isinstance(c, And):
        return qe.Filter(must=[_condition(p) for p in c.conditions])
    if isinstance(c, Or):
        return qe.Filter(should=[_condition(p) for p in c.conditions])
    if isinstance(c, Not):
        return qe.Filter(must_not=[_condition(c.condition)])
    raise TypeError(f"unknown condition {c!r}")
