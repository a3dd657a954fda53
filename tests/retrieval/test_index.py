"""The chunk index, the same tests on Qdrant Edge and on qdrant-client (local mode)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

from retrieval import (
    Chunk,
    EdgeIndex,
    Hit,
    InvalidFilterError,
    Point,
    QdrantIndex,
    ServerIndex,
    SparseEncoder,
)
from retrieval.index import scope_key

DIM = 8
ENCODER = SparseEncoder()


def vec(*weights: float) -> list[float]:
    return [*weights, *[0.0] * (DIM - len(weights))]


E0 = vec(1.0)


def server_index(client: QdrantClient, dim: int = DIM) -> ServerIndex:
    with warnings.catch_warnings():
        # Local mode ignores payload indexes and says so; a real server uses them.
        warnings.filterwarnings("ignore", "Payload indexes have no effect", UserWarning)
        return ServerIndex(client, dim)


@pytest.fixture(params=["edge", "server"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QdrantIndex]:
    built: QdrantIndex
    if request.param == "edge":
        built = EdgeIndex(tmp_path / "shard", DIM)
    else:
        built = server_index(QdrantClient(location=":memory:"))
    yield built
    built.close()


def point(text: str, dense: list[float], *, tenant: str = "t1", store: str = "vs_a",
          file: str = "file-1", chunk: int = 0, content: str = "v1",
          attributes: Mapping[str, str | float | bool] | None = None) -> Point:
    return Point.for_chunk(tenant=tenant, store=store, file=file, filename=f"{file}.txt",
                           attributes=attributes or {}, content_hash=content,
                           chunk=Chunk(chunk, 0, len(text), text), dense=dense,
                           sparse=ENCODER.encode_document(text))


def search(index: QdrantIndex, mode: str = "dense", dense: list[float] = E0, text: str = "",
           *, tenant: str = "t1", stores: tuple[str, ...] = ("vs_a",), limit: int = 10,
           filters: dict[str, Any] | None = None, threshold: float = 0.0) -> list[Hit]:
    """`mode` "feedback" is hybrid with the feedback ranker."""
    feedback = mode == "feedback"
    mode = "hybrid" if feedback else mode
    return index.search(tenant, list(stores), None if mode == "sparse" else dense,
                        None if mode == "dense" else ENCODER.encode_query(text), mode, limit,
                        filters, threshold, feedback=feedback)


def texts(hits: list[Hit]) -> list[str]:
    return [h.payload["text"] for h in hits]


def test_replace_file_replaces_the_old_chunks(index: QdrantIndex) -> None:
    old = [point(f"alpha {n}", vec(1.0, i), chunk=i) for i, n in enumerate(("one", "two", "six"))]
    index.replace_file("t1", "vs_a", "file-1", old)
    index.replace_file("t1", "vs_a", "file-1", old)  # the same content again: same ids
    assert index.count("vs_a") == 3
    new = [point(f"beta {n}", vec(1.0, i), chunk=i, content="v2")
           for i, n in enumerate(("one", "two"))]
    index.replace_file("t1", "vs_a", "file-1", new)
    assert index.count("vs_a") == 2
    assert sorted(texts(search(index))) == ["beta one", "beta two"]
    assert texts(search(index, "sparse", text="alpha")) == []
    hit = search(index, limit=1)[0]
    assert hit.payload == {"tenant": "t1", "store": "vs_a", "file": "file-1",
                           "filename": "file-1.txt", "chunk": 0, "start": 0, "end": 8,
                           "text": "beta one", "attributes": {}}
    index.replace_file("t1", "vs_a", "file-1", [])
    assert index.count("vs_a") == 0


def test_replace_file_only_takes_points_of_that_file(index: QdrantIndex) -> None:
    with pytest.raises(ValueError, match="belongs to"):
        index.replace_file("t1", "vs_a", "file-2", [point("x", E0, file="file-1")])
    with pytest.raises(ValueError, match="8 dimensions"):
        index.replace_file("t1", "vs_a", "file-1", [point("x", [1.0, 0.0])])


def test_delete_file_and_store(index: QdrantIndex) -> None:
    for store, file in (("vs_a", "f1"), ("vs_a", "f2"), ("vs_b", "f3")):
        index.replace_file("t1", store, file, [point(file, E0, store=store, file=file, chunk=c)
                                               for c in range(2)])
    index.delete_file("vs_a", "f1")
    assert (index.count("vs_a"), index.count("vs_b")) == (2, 2)
    index.delete_store("vs_a")
    assert (index.count("vs_a"), index.count("vs_b")) == (0, 2)
    assert search(index, stores=("vs_a", "vs_b"))[0].payload["file"] == "f3"


def test_delete_tenant_takes_only_its_chunks(index: QdrantIndex) -> None:
    for tenant, store in (("t1", "vs_a"), ("t1", "vs_b"), ("t2", "vs_c")):
        index.replace_file(tenant, store, "f", [point("x", E0, tenant=tenant, store=store,
                                                      file="f")])
    index.delete_tenant("t1")
    assert [index.count(s) for s in ("vs_a", "vs_b", "vs_c")] == [0, 0, 1]
    index.delete_tenant("t1")  # again: nothing left, no error


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid", "feedback"])
def test_a_tenant_never_sees_another_tenants_chunks(index: QdrantIndex, mode: str) -> None:
    index.replace_file("t1", "vs_a", "f1", [point("secret launch plan", E0, file="f1")])
    index.replace_file("t2", "vs_b", "f2", [point("public launch plan", E0, tenant="t2",
                                                  store="vs_b", file="f2")])
    # Even the other tenant's store id, and a store id colliding with theirs, stay closed.
    index.replace_file("t2", "vs_a", "f3", [point("own launch notes", E0, tenant="t2",
                                                  file="f3")])
    query = "secret launch plan"
    mine = search(index, mode, text=query, tenant="t2", stores=("vs_a", "vs_b"))
    assert {h.payload["tenant"] for h in mine} == {"t2"}
    assert sorted(h.payload["file"] for h in mine) == ["f2", "f3"]
    assert texts(search(index, mode, text=query, tenant="t1")) == ["secret launch plan"]
    assert search(index, mode, text=query, tenant="t3", stores=("vs_a", "vs_b")) == []


FILTER_CASES: list[tuple[dict[str, Any], set[str]]] = [
    ({"type": "eq", "key": "lang", "value": "en"}, {"f1"}),
    ({"type": "eq", "key": "draft", "value": True}, {"f2"}),
    ({"type": "eq", "key": "draft", "value": False}, {"f1", "f3"}),
    ({"type": "ne", "key": "draft", "value": True}, {"f1", "f3"}),
    ({"type": "eq", "key": "year", "value": 2023}, {"f2"}),
    ({"type": "gt", "key": "year", "value": 2021}, {"f2", "f3"}),
    ({"type": "gte", "key": "year", "value": 2021}, {"f1", "f2", "f3"}),
    ({"type": "lt", "key": "year", "value": 2023}, {"f1"}),
    ({"type": "lte", "key": "rating", "value": 3}, {"f2"}),
    ({"type": "in", "key": "lang", "value": ["en", "de"]}, {"f1", "f3"}),
    ({"type": "nin", "key": "lang", "value": ["en"]}, {"f2", "f3"}),
    ({"type": "in", "key": "year", "value": [2021, 2024]}, {"f1", "f3"}),
    ({"type": "and", "filters": [{"type": "eq", "key": "draft", "value": False},
                                 {"type": "gt", "key": "year", "value": 2022}]}, {"f3"}),
    ({"type": "or", "filters": [
        {"type": "eq", "key": "lang", "value": "fr"},
        {"type": "and", "filters": [{"type": "eq", "key": "draft", "value": False},
                                    {"type": "lt", "key": "year", "value": 2022}]}]},
     {"f1", "f2"}),
]


def test_attribute_filters(index: QdrantIndex) -> None:
    files: dict[str, dict[str, str | float | bool]] = {
        "f1": {"lang": "en", "year": 2021, "draft": False, "rating": 4.5},
        "f2": {"lang": "fr", "year": 2023, "draft": True, "rating": 3.0},
        "f3": {"lang": "de", "year": 2024, "draft": False},
    }
    for file, attributes in files.items():
        index.replace_file("t1", "vs_a", file, [point("report", E0, file=file,
                                                      attributes=attributes)])
    for filters, expected in FILTER_CASES:
        for mode in ("dense", "sparse", "hybrid", "feedback"):
            found = {h.payload["file"] for h in search(index, mode, text="report",
                                                       filters=filters)}
            assert found == expected, (mode, filters)
    assert search(index, filters=FILTER_CASES[0][0])[0].payload["attributes"] == files["f1"]


def test_invalid_filters_and_arguments_are_rejected(index: QdrantIndex) -> None:
    with pytest.raises(InvalidFilterError) as info:
        search(index, filters={"type": "and", "filters": [{"type": "bad"}]})
    assert info.value.param == "filters.filters[0].type"
    with pytest.raises(ValueError, match="mode must be one of"):
        search(index, "semantic")
    with pytest.raises(ValueError, match="needs a sparse query"):
        index.search("t1", ["vs_a"], E0, None, "hybrid", 5, None, 0.0)
    with pytest.raises(ValueError, match="8 dimensions"):
        search(index, dense=[1.0])
    assert search(index, stores=()) == []


@pytest.fixture
def corpus(index: QdrantIndex) -> QdrantIndex:
    """A matches both the query's meaning and its words; B only its meaning, C only words."""
    docs = {
        "A": ("solar panel maintenance guide", vec(1.0, 0.35)),
        "B": ("weather report for tuesday", vec(1.0)),
        "C": ("solar panel solar panel maintenance of solar panels", vec(0.0, 0.0, 1.0)),
        "D": ("gardening notes for spring", vec(0.6, 1.0)),
        "E": ("kitchen inventory list", vec(0.4, 1.0)),
    }
    for file, (text, dense) in docs.items():
        index.replace_file("t1", "vs_a", file, [point(text, dense, file=file)])
    return index


QUERY = "solar panel maintenance"


def files(hits: list[Hit]) -> list[str]:
    return [h.payload["file"] for h in hits]


def test_each_mode_ranks_by_its_own_signal(corpus: QdrantIndex) -> None:
    assert files(search(corpus, "dense", text=QUERY))[:2] == ["B", "A"]
    assert files(search(corpus, "sparse", text=QUERY)) == ["C", "A"]
    assert files(search(corpus, "hybrid", text=QUERY))[0] == "A"


def test_scores_share_one_scale(corpus: QdrantIndex) -> None:
    dense = {h.payload["file"]: h.score for h in search(corpus, "dense", text=QUERY)}
    assert dense["B"] == pytest.approx(1.0, abs=1e-6)
    assert dense["A"] == pytest.approx(1 / math.sqrt(1 + 0.35**2), abs=1e-6)
    assert dense["C"] == 0.0
    # Hybrid ranks by fusion but reports the dense cosine, so thresholds mean the same.
    for hit in search(corpus, "hybrid", text=QUERY):
        assert hit.score == pytest.approx(dense[hit.payload["file"]], abs=1e-6)
    sparse = search(corpus, "sparse", text=QUERY)
    assert all(0.0 < h.score < 1.0 for h in sparse)
    assert sparse[0].score > sparse[1].score


def test_score_threshold_drops_weak_hits(corpus: QdrantIndex) -> None:
    assert files(search(corpus, "dense", text=QUERY, threshold=0.9)) == ["B", "A"]
    assert files(search(corpus, "hybrid", text=QUERY, threshold=0.9)) == ["A", "B"]
    assert files(search(corpus, "hybrid", text=QUERY, threshold=0.9, limit=1)) == ["A"]
    assert files(search(corpus, "feedback", text=QUERY, threshold=0.9)) == ["A", "B"]
    assert files(search(corpus, "feedback", text=QUERY, threshold=0.9, limit=1)) == ["A"]
    assert search(corpus, "sparse", text=QUERY, threshold=0.999) == []
    assert len(search(corpus, "dense", text=QUERY, limit=2)) == 2


def test_feedback_finds_relevant_chunks_in_other_words(index: QdrantIndex) -> None:
    """Five chunks match the query and share a vocabulary; "R" shares only that vocabulary,
    "U" is unrelated but nearer the query in the dense space. Plain fusion ranks U first;
    feedback learns the vocabulary (and direction) from the five and ranks R first."""
    docs = {f"M{i}": (f"wing flutter test {i}: aeroelastic divergence of the panel",
                      vec(0.8, 0.6, 0.05 * i)) for i in range(5)}
    docs["R"] = ("aeroelastic divergence of thin panels", vec(0.3, 0.95))
    docs["U"] = ("cooking pasta at altitude", vec(0.5, 0.0, 0.0, 0.87))
    for file, (text, dense) in docs.items():
        index.replace_file("t1", "vs_a", file, [point(text, dense, file=file)])
    plain = files(search(index, "hybrid", text="wing flutter"))
    found = search(index, "feedback", text="wing flutter")
    assert set(plain[:5]) == set(files(found)[:5]) == {f"M{i}" for i in range(5)}
    assert plain.index("U") < plain.index("R")
    assert files(found).index("R") < files(found).index("U")
    # Scores stay the cosine to the query as asked, whatever the ranker.
    cosine = {h.payload["file"]: h.score for h in search(index, "dense", text="wing flutter")}
    assert all(h.score == pytest.approx(cosine[h.payload["file"]], abs=1e-6) for h in found)
    assert len(search(index, "feedback", text="wing flutter", limit=3)) == 3


@pytest.mark.parametrize("mode", ["hybrid", "feedback"])
def test_a_search_answers_one_order_however_the_chunks_were_written(tmp_path: Path,
                                                                    mode: str) -> None:
    """Two chunks of file A tie in fusion (dense ranks them 2 and 1, BM25 1 and 2); Edge
    lists tied points in an order that varies with how they were written."""
    chunks = [("A", 0, "wing flutter of the wing", vec(0.9, 0.44)),
              ("A", 1, "flutter of the wing panel", vec(1.0, 0.05)),
              ("B", 0, "flutter margin", vec(0.5, 0.8)), ("C", 0, "wing loads", vec(0.4, 0.9)),
              ("D", 0, "panel flutter tests", vec(0.6, 0.7, 0.2))]
    orders = set()
    for n, written in enumerate([chunks, chunks[::-1], chunks[1::2] + chunks[::2]] * 2):
        index: QdrantIndex = (EdgeIndex(tmp_path / str(n), DIM) if n % 2 == 0
                              else server_index(QdrantClient(location=":memory:")))
        try:
            for file in dict.fromkeys(f for f, *_ in written):
                index.replace_file("t1", "vs_a", file, [
                    point(text, dense, file=f, chunk=c) for f, c, text, dense in written
                    if f == file])
            for _ in range(3):
                orders.add(tuple((h.payload["file"], h.payload["chunk"]) for h in search(
                    index, mode, dense=vec(1.0, 0.2), text="wing flutter")))
        finally:
            index.close()
    assert len(orders) == 1
    assert next(iter(orders))[:2] == (("A", 1), ("A", 0))  # the tie: nearer the query first


def test_edge_shard_persists_and_checks_its_size(tmp_path: Path) -> None:
    first = EdgeIndex(tmp_path / "shard", DIM)
    first.replace_file("t1", "vs_a", "f1", [point("kept", E0, file="f1")])
    first.close()
    again = EdgeIndex(tmp_path / "shard", DIM)
    try:
        assert again.count("vs_a") == 1
        assert texts(search(again, "hybrid", text="kept")) == ["kept"]
        again.optimize()
        assert texts(search(again, "sparse", text="kept")) == ["kept"]
    finally:
        again.close()
    with pytest.raises(Exception, match=r"(?i)vector size"):
        EdgeIndex(tmp_path / "shard", DIM * 2).close()


def test_server_collection_is_reused_and_checked(tmp_path: Path) -> None:
    first = server_index(QdrantClient(path=str(tmp_path / "local")))
    first.replace_file("t1", "vs_a", "f1", [point("kept", E0, file="f1")])
    first.close()
    again = server_index(QdrantClient(path=str(tmp_path / "local")))
    try:
        assert again.count("vs_a") == 1
    finally:
        again.close()
    client = QdrantClient(path=str(tmp_path / "local"))
    try:
        with pytest.raises(ValueError, match="size 8, not 16"):
            server_index(client, DIM * 2)
    finally:
        client.close()


def test_texts_without_terms(index: QdrantIndex) -> None:
    # A chunk or a query of only stopwords has an empty sparse vector: dense still works.
    index.replace_file("t1", "vs_a", "f1", [point("to be or not to be", E0, file="f1")])
    assert search(index, "sparse", text="to be") == []
    assert files(search(index, "hybrid", text="of the")) == ["f1"]
    assert files(search(index, "dense")) == ["f1"]


def test_edge_writes_survive_a_killed_process(tmp_path: Path) -> None:
    # No flush per write: the shard's write-ahead log must bring them back on open.
    script = f"""
import os
from pathlib import Path
from retrieval import Chunk, EdgeIndex, Point, SparseVector
index = EdgeIndex(Path({str(tmp_path / 'shard')!r}), {DIM})
point = Point.for_chunk(tenant="t1", store="vs_a", file="f1", filename="f1.txt",
                        attributes={{}}, content_hash="h", chunk=Chunk(0, 0, 4, "kept"),
                        dense={E0!r}, sparse=SparseVector([1], [1.0]))
index.replace_file("t1", "vs_a", "f1", [point])
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    index = EdgeIndex(tmp_path / "shard", DIM)
    try:
        assert index.count("vs_a") == 1
    finally:
        index.close()


def test_searches_never_see_a_half_replaced_file(index: QdrantIndex) -> None:
    """A search running while a file is replaced sees the old version or the new one."""
    import threading

    versions = {v: [point(f"alpha {v} {i}", vec(1.0, i / 10), chunk=i, content=v)
                    for i in range(size)] for v, size in (("v1", 12), ("v2", 5))}
    index.replace_file("t1", "vs_a", "file-1", versions["v1"])
    done = threading.Event()

    def writer() -> None:
        for n in range(40):
            index.replace_file("t1", "vs_a", "file-1", versions["v2" if n % 2 == 0 else "v1"])
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    while not done.is_set():
        words = {t.split()[1] for t in texts(search(index, limit=20))}
        assert len(words) == 1, words  # one version at a time
        seen |= words
    thread.join()
    assert seen <= {"v1", "v2"}


def test_the_scope_field_is_internal_and_unambiguous(index: QdrantIndex) -> None:
    index.replace_file("t1", "vs_a", "f1", [point("alpha", E0, file="f1")])
    for mode in ("dense", "sparse", "hybrid"):
        hits = search(index, mode, text="alpha")
        assert [h.payload["file"] for h in hits] == ["f1"]
        assert "scope" not in hits[0].payload
    assert scope_key("a/b", "c") != scope_key("a", "b/c")
