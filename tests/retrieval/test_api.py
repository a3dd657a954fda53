"""The package's public surface: what other packages may import from `retrieval`."""

from __future__ import annotations

import pickle

import retrieval


def test_exported_names() -> None:
    assert sorted(retrieval.__all__) == [
        "Chunk", "ChunkingStrategy", "CorruptFileError", "DEFAULT_COLLECTION", "Document",
        "EdgeIndex", "Hit", "InvalidChunkingError", "InvalidFilterError", "ParseError", "Point",
        "QdrantIndex", "RRF_K", "SEARCH_MODES", "SPARSE_SCORE_PIVOT", "ServerIndex",
        "SparseEncoder", "SparseVector", "UnsupportedFileError", "VectorIndex", "chunk_text",
        "extract_text", "open_index", "parse_filters", "point_id",
    ]
    for name in retrieval.__all__:
        assert getattr(retrieval, name) is not None


def test_point_ids_are_deterministic() -> None:
    first = retrieval.point_id("vs_a", "file-1", "sha256:abc", 3)
    assert first == "c468b814-59c3-5a34-bc68-1e5c1c177463"
    assert first != retrieval.point_id("vs_a", "file-1", "sha256:abd", 3)


def test_errors_survive_pickling() -> None:
    # Celery moves exceptions between processes.
    errors: list[Exception] = [
        retrieval.CorruptFileError("a.pdf", "the PDF is corrupt (x)"),
        retrieval.InvalidFilterError("bad", "filters.type"),
        retrieval.InvalidChunkingError("bad", "chunking_strategy.type"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error)
