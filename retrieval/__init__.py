"""Retrieval for RAG: parsing, chunking, BM25 sparse vectors, the Qdrant index, hybrid search.

A library without HTTP, database or queue: the gateway searches through `VectorIndex`, the
ingestion worker runs `extract_text` -> `chunk_text` -> embed + `SparseEncoder` ->
`Point.for_chunk` -> `VectorIndex.replace_file`. The engine adapters (`EdgeIndex`,
`ServerIndex`) are imported lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retrieval.chunking import Chunk, ChunkingStrategy, InvalidChunkingError, chunk_text
from retrieval.filters import InvalidFilterError, parse_filters
from retrieval.index import (
    DEFAULT_COLLECTION,
    RRF_K,
    SEARCH_MODES,
    SPARSE_SCORE_PIVOT,
    Hit,
    Point,
    QdrantIndex,
    VectorIndex,
    open_index,
    point_id,
)
from retrieval.parsing import (
    CorruptFileError,
    Document,
    ParseError,
    UnsupportedFileError,
    extract_text,
)
from retrieval.sparse import SparseEncoder, SparseVector

if TYPE_CHECKING:
    from retrieval.edge import EdgeIndex
    from retrieval.server import ServerIndex

    def _adapters_are_indexes(edge: EdgeIndex, server: ServerIndex) -> list[VectorIndex]:
        return [edge, server]  # mypy checks both adapters against the protocol

__all__ = [
    "DEFAULT_COLLECTION",
    "RRF_K",
    "SEARCH_MODES",
    "SPARSE_SCORE_PIVOT",
    "Chunk",
    "ChunkingStrategy",
    "CorruptFileError",
    "Document",
    "EdgeIndex",
    "Hit",
    "InvalidChunkingError",
    "InvalidFilterError",
    "ParseError",
    "Point",
    "QdrantIndex",
    "ServerIndex",
    "SparseEncoder",
    "SparseVector",
    "UnsupportedFileError",
    "VectorIndex",
    "chunk_text",
    "extract_text",
    "open_index",
    "parse_filters",
    "point_id",
]


def __getattr__(name: str) -> Any:
    if name == "EdgeIndex":
        from retrieval.edge import EdgeIndex

        return EdgeIndex
    if name == "ServerIndex":
        from retrieval.server import ServerIndex

        return ServerIndex
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
