"""The index on a Qdrant server through `qdrant-client` (its local mode in tests).

All writes wait for the server to apply them (`wait=True`), so a point is searchable when
`replace_file` returns. The server optimizes and builds indexes in the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qdrant_client import QdrantClient, models

from retrieval.filters import And, Condition, HasId, Match, MatchAny, Not, Or, Range
from retrieval.index import (
    DEFAULT_COLLECTION,
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

__all__ = ["ServerIndex"]

_UPSERT_BATCH = 128  # chunk texts make points a few KB each: keep requests small


class ServerIndex(QdrantIndex):
    """`collection` on the server behind `client`, created with its payload indexes if
    missing. The index owns the client: `close()` closes it."""

    def __init__(self, client: QdrantClient, dense_size: int, *,
                 collection: str = DEFAULT_COLLECTION) -> None:
        super().__init__(dense_size)
        self.client = client
        self.collection = collection
        if client.collection_exists(collection):
            self._check_collection()
        else:
            self._create_collection()

    def _create_collection(self) -> None:
        try:
            self.client.create_collection(
                self.collection,
                vectors_config={DENSE_VECTOR: models.VectorParams(
                    size=self.dense_size, distance=models.Distance.COSINE)},
                sparse_vectors_config={SPARSE_VECTOR: models.SparseVectorParams(
                    modifier=models.Modifier.IDF)})
        except Exception:
            if not self.client.collection_exists(self.collection):
                raise
            # Another process created it between our check and our call: use theirs.
            self._check_collection()
            return
        self._create_indexes(INDEXED_FIELDS)

    def _create_indexes(self, fields: Sequence[str]) -> None:
        for field in fields:
            schema = models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD,
                                               is_tenant=field == "tenant")
            self.client.create_payload_index(self.collection, field, field_schema=schema,
                                             wait=True)

    def _check_collection(self) -> None:
        info = self.client.get_collection(self.collection)
        vectors = info.config.params.vectors
        dense = vectors.get(DENSE_VECTOR) if isinstance(vectors, dict) else None
        if dense is None or dense.size != self.dense_size:
            size = None if dense is None else dense.size
            raise ValueError(f"collection {self.collection!r} holds {DENSE_VECTOR!r} vectors "
                             f"of size {size}, not {self.dense_size}")
        # A collection from an older version may lack an index that searches now filter on.
        self._create_indexes([f for f in INDEXED_FIELDS if f not in (info.payload_schema or {})])

    def close(self) -> None:
        self.client.close()

    def _upsert(self, points: Sequence[Point]) -> None:
        for i in range(0, len(points), _UPSERT_BATCH):
            batch = [
                models.PointStruct(id=p.id, payload=p.payload, vector={
                    DENSE_VECTOR: p.dense,
                    SPARSE_VECTOR: models.SparseVector(indices=p.sparse.indices,
                                                       values=p.sparse.values)})
                for p in points[i:i + _UPSERT_BATCH]]
            self.client.upsert(self.collection, batch, wait=True)

    def _delete(self, condition: Condition) -> None:
        self.client.delete(self.collection, models.FilterSelector(filter=_filter(condition)),
                           wait=True)

    def _count(self, condition: Condition) -> int:
        return self.client.count(self.collection, count_filter=_filter(condition),
                                 exact=True).count

    def _query(self, query: Query) -> list[Found]:
        scope = _filter(query.scope)
        idf = models.SearchParams(idf=models.IdfCorpusParams(corpus=_filter(query.idf_corpus)))
        sparse = None
        if query.sparse is not None:
            sparse = models.SparseVector(indices=query.sparse.indices,
                                         values=query.sparse.values)
        if query.mode == "hybrid":
            response = self.client.query_points(
                self.collection,
                prefetch=[
                    models.Prefetch(query=query.dense, using=DENSE_VECTOR, filter=scope,
                                    limit=query.prefetch_limit),
                    models.Prefetch(query=sparse, using=SPARSE_VECTOR, filter=scope,
                                    params=idf, limit=query.prefetch_limit),
                ],
                query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)), query_filter=scope,
                limit=query.limit, with_payload=["file"] if query.candidates_only else True,
                with_vectors=[DENSE_VECTOR, SPARSE_VECTOR] if query.candidates_only
                else [DENSE_VECTOR])
        elif query.mode == "dense":
            response = self.client.query_points(
                self.collection, query=query.dense, using=DENSE_VECTOR, query_filter=scope,
                limit=query.limit, with_payload=True)
        else:
            response = self.client.query_points(
                self.collection, query=sparse, using=SPARSE_VECTOR, query_filter=scope,
                search_params=idf, limit=query.limit, with_payload=True)
        return [_found(p) for p in response.points]


def _found(point: models.ScoredPoint) -> Found:
    vectors = point.vector
    dense = vectors.get(DENSE_VECTOR) if isinstance(vectors, dict) else None
    bm25 = vectors.get(SPARSE_VECTOR) if isinstance(vectors, dict) else None
    sparse = (SparseVector(list(bm25.indices), list(bm25.values))
              if isinstance(bm25, models.SparseVector) else None)
    return Found(str(point.id), point.score, dict(point.payload or {}), stored_dense(dense),
                 sparse)


def _filter(condition: Condition) -> models.Filter:
    converted = _condition(condition)
    return converted if isinstance(converted, models.Filter) else models.Filter(must=[converted])


def _condition(c: Condition) -> Any:
    if isinstance(c, Match):
        return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))
    if isinstance(c, MatchAny):
        return models.FieldCondition(key=c.key, match=models.MatchAny(any=list(c.values)))
    if isinstance(c, Range):
        return models.FieldCondition(key=c.key, range=models.Range(gt=c.gt, gte=c.gte,
                                                                   lt=c.lt, lte=c.lte))
    if isinstance(c, HasId):
        return models.HasIdCondition(has_id=list(c.ids))
    if isinstance(c, And):
        return models.Filter(must=[_condition(p) for p in c.conditions])
    if isinstance(c, Or):
        return models.Filter(should=[_condition(p) for p in c.conditions])
    if isinstance(c, Not):
        return models.Filter(must_not=[_condition(c.condition)])
    raise TypeError(f"unknown condition {c!r}")
