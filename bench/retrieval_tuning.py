"""What moves hybrid retrieval quality on Cranfield, measured offline on the library itself:
the settings tried for bench/retrieval_quality.py, with the same chunking, BM25 encoder,
Edge index and scoring, but MiniLM run in-process (transformers, mean pooling, normalised,
as vLLM serves it) and vectors cached, so that a variant takes seconds, not a stack.

    .venv/bin/python -m bench.retrieval_tuning

Each row is nDCG@10 over all 225 queries, and over the odd and even halves: a setting worth
keeping helps on both halves, not only on the whole. Variants: BM25 k1/b/avg_len, chunk size,
fusion of the dense and sparse candidate lists (RRF constant and weights, Qdrant's DBSF,
min-max), and the feedback ranker (retrieval/feedback.py: score regularization and
pseudo-relevance feedback) with each of its constants changed alone.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.report import machine, table, write_section
from bench.retrieval_quality import CRANFIELD, documents, judgments, ndcg, queries
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from retrieval import EdgeIndex, Hit, Point, SparseEncoder, SparseVector, chunk_text
from retrieval import feedback as feedback_ranker

CACHE = Path.home() / ".cache" / "llmops" / "bench-retrieval-tuning"
Run = list[list[int]]  # per query, document ids best first


class Embedder:
    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        weights = prepare_models(models_home())["embedding"]
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(weights)
        self.model = AutoModel.from_pretrained(weights).eval()

    def __call__(self, texts: Sequence[str], name: str) -> np.ndarray:
        path = CACHE / f"{name}.npy"
        if path.exists():
            cached = np.load(path)
            if len(cached) == len(texts):
                return np.asarray(cached)
        out = []
        for i in range(0, len(texts), 64):
            batch = self.tokenizer(list(texts[i:i + 64]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            with self.torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1)
            out.append(self.torch.nn.functional.normalize(mean, dim=-1).numpy())
        vectors = np.concatenate(out)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
        return np.asarray(vectors)


class Collection:
    """Cranfield chunked like the ingestion worker does, in an Edge index."""

    def __init__(self, embed: Embedder, size: int, overlap: int) -> None:
        docs = documents(CRANFIELD)
        self.rows = [(d, c) for d, text in sorted(docs.items()) if text
                     for c in chunk_text(text, embed.tokenizer, size, overlap)]
        self.vectors = embed([c.text for _, c in self.rows], f"chunks-{size}-{overlap}")
        self.query_texts = queries(CRANFIELD)
        self.query_vectors = embed(self.query_texts, "queries")
        self.qrels = judgments(CRANFIELD)

    def index(self, encoder: SparseEncoder, path: Path) -> EdgeIndex:
        index = EdgeIndex(path, self.vectors.shape[1])
        by_doc: dict[int, list[Point]] = {}
        for (doc, chunk), vector in zip(self.rows, self.vectors, strict=True):
            by_doc.setdefault(doc, []).append(Point.for_chunk(
                tenant="t", store="s", file=str(doc), filename=f"{doc}.txt", attributes={},
                content_hash="h", chunk=chunk, dense=vector.tolist(),
                sparse=encoder.encode_document(chunk.text)))
        for doc, points in by_doc.items():
            index.replace_file("t", "s", str(doc), points)
        return index

    def score(self, run: Run) -> tuple[float, float, float]:
        per_query = [ndcg(r, self.qrels.get(q, {})) for q, r in enumerate(run, 1)]
        return (float(np.mean(per_query)), float(np.mean(per_query[0::2])),
                float(np.mean(per_query[1::2])))


def documents_of(hits: Sequence[Hit]) -> list[int]:
    ranked: list[int] = []
    for h in hits:
        if int(h.payload["file"]) not in ranked:
            ranked.append(int(h.payload["file"]))
    return ranked


Ranked = list[tuple[str, int, float]]  # (point id, document, engine score)


def candidates(index: EdgeIndex, col: Collection, encoder: SparseEncoder, mode: str,
               depth: int) -> list[Ranked]:
    out = []
    for q, text in zip(col.query_vectors, col.query_texts, strict=True):
        hits = index.search("t", ["s"], q.tolist(), encoder.encode_query(text), mode, depth, None)
        if mode == "sparse":  # undo the library's s / (s + 10) to get the BM25 score
            out.append([(h.id, int(h.payload["file"]), 10 * h.score / (1 - h.score))
                        for h in hits])
        else:
            out.append([(h.id, int(h.payload["file"]), h.score) for h in hits])
    return out


def fuse(lists: Sequence[tuple[Ranked, float]], how: str, k: int = 60) -> list[int]:
    """Chunk-level fusion of weighted candidate lists, then documents at their best chunk."""
    scores: dict[str, float] = {}
    doc_of: dict[str, int] = {}
    for ranked, weight in lists:
        values = np.array([s for _, _, s in ranked]) if ranked else np.zeros(1)
        if how == "dbsf":  # Qdrant's: mean +- 3 standard deviations mapped to [0, 1]
            lo, hi = values.mean() - 3 * values.std(), values.mean() + 3 * values.std()
        else:
            lo, hi = values.min(), values.max()
        for rank, (pid, doc, s) in enumerate(ranked):
            doc_of[pid] = doc
            part = 1 / (k + rank + 1) if how == "rrf" else (s - lo) / (hi - lo or 1.0)
            scores[pid] = scores.get(pid, 0.0) + weight * part
    ranked_docs: list[int] = []
    for pid in sorted(scores, key=lambda p: -scores[p]):
        if doc_of[pid] not in ranked_docs:
            ranked_docs.append(doc_of[pid])
    return ranked_docs


def ranker_variants(index: EdgeIndex, col: Collection, encoder: SparseEncoder,
                    show: Callable[[str, tuple[float, float, float]], None]) -> None:
    """The library's feedback ranker, then each of its constants changed alone (and each
    step turned off), to show how much the result depends on them."""
    def run(encode: Callable[[str], SparseVector] = encoder.encode_query, feedback: bool = True
            ) -> tuple[float, float, float]:
        return col.score([documents_of(index.search("t", ["s"], q.tolist(), encode(t), "hybrid",
                                                    50, None, feedback=feedback))
                          for q, t in zip(col.query_vectors, col.query_texts, strict=True)])

    def once(text: str) -> SparseVector:  # the encoder before it counted repeated terms
        counted = encoder.encode_query(text)
        return SparseVector(counted.indices, [1.0] * len(counted.indices))

    show("  the library's feedback ranker (ranker auto)", run())
    show("    sparse query terms counted once", run(once))
    show("  plain RRF, sparse query terms counted once", run(once, feedback=False))
    changes: list[tuple[str, dict[str, float]]] = [
        ("regularization only (no feedback chunks)", {"FEEDBACK_CHUNKS": 0}),
        ("feedback only (no regularization)", {"BLEND": 0.0}),
        ("BLEND 0.2", {"BLEND": 0.2}), ("BLEND 0.6", {"BLEND": 0.6}),
        ("NEIGHBOURS 2", {"NEIGHBOURS": 2}), ("NEIGHBOURS 5", {"NEIGHBOURS": 5}),
        ("FEEDBACK_CHUNKS 3", {"FEEDBACK_CHUNKS": 3}),
        ("FEEDBACK_CHUNKS 8", {"FEEDBACK_CHUNKS": 8}),
        ("DENSE_BETA 0.5", {"DENSE_BETA": 0.5}), ("DENSE_BETA 2", {"DENSE_BETA": 2.0}),
        ("EXPANSION_TERMS 20", {"EXPANSION_TERMS": 20}),
        ("EXPANSION_WEIGHT 0.3", {"EXPANSION_WEIGHT": 0.3}),
        ("EXPANSION_WEIGHT 1", {"EXPANSION_WEIGHT": 1.0}),
    ]
    for label, values in changes:
        saved = {name: getattr(feedback_ranker, name) for name in values}
        for name, value in values.items():
            setattr(feedback_ranker, name, type(saved[name])(value))
        try:
            show(f"    {label}", run())
        finally:
            for name, value in saved.items():
                setattr(feedback_ranker, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/")
    args = parser.parse_args()
    embed = Embedder()
    rows: list[tuple[str, tuple[float, float, float]]] = []

    def show(name: str, score: tuple[float, float, float]) -> None:
        rows.append((name, score))
        print(f"{name:62s} {score[0]:.3f}  (odd {score[1]:.3f}, even {score[2]:.3f})",
              flush=True)

    def variant(col: Collection, encoder: SparseEncoder, label: str,
                extra: Callable[[EdgeIndex, list[Ranked], list[Ranked]], None] | None = None
                ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            index = col.index(encoder, Path(tmp) / "shard")
            try:
                dense = candidates(index, col, encoder, "dense", 200)
                sparse = candidates(index, col, encoder, "sparse", 200)
                show(f"{label}: dense", col.score([fuse([(d, 1.0)], "rrf") for d in dense]))
                show(f"{label}: sparse", col.score([fuse([(s, 1.0)], "rrf") for s in sparse]))
                hybrid = [documents_of(index.search("t", ["s"], q.tolist(),
                                                    encoder.encode_query(t), "hybrid", 50,
                                                    None))
                          for q, t in zip(col.query_vectors, col.query_texts, strict=True)]
                show(f"{label}: hybrid (the library: RRF k=60)", col.score(hybrid))
                if extra is not None:
                    extra(index, dense, sparse)
            finally:
                index.close()

    default = Collection(embed, 254, 127)  # what `auto` chunking gives MiniLM, as in the API
    for k1, b, avg in ((1.2, 0.75, 256), (1.2, 0.75, 128), (1.2, 0.75, 100), (2.0, 0.75, 128),
                       (0.9, 0.4, 128), (1.2, 1.0, 128)):
        variant(default, SparseEncoder(k1, b, avg), f"254/127 chunks, BM25 k1={k1} b={b} "
                f"avg_len={avg}")

    encoder = SparseEncoder()
    col_score = default.score

    def fusions(index: EdgeIndex, dense: list[Ranked], sparse: list[Ranked]) -> None:
        for k in (10, 20, 60):
            show(f"  RRF k={k}, 200 candidates each",
                 col_score([fuse([(d, 1.0), (s, 1.0)], "rrf", k) for d, s in zip(dense, sparse,
                                                                               strict=True)]))
        show("  RRF k=60, 50 candidates each", col_score(
            [fuse([(d[:50], 1.0), (s[:50], 1.0)], "rrf") for d, s in zip(dense, sparse,
                                                                        strict=True)]))
        for wd in (0.7, 1.5):
            show(f"  weighted RRF k=60, dense weight {wd}", col_score(
                [fuse([(d, wd), (s, 1.0)], "rrf") for d, s in zip(dense, sparse, strict=True)]))
        for how in ("dbsf", "minmax"):
            show(f"  {how}", col_score([fuse([(d, 1.0), (s, 1.0)], how)
                                        for d, s in zip(dense, sparse, strict=True)]))
        ranker_variants(index, default, encoder, show)

    variant(default, encoder, "library defaults (fusion variants below)", fusions)
    small = Collection(embed, 128, 64)
    variant(small, SparseEncoder(), "128/64 chunks, BM25 defaults")
    if args.no_docs:
        return
    body = (
        "Offline, on the library (Edge index, `SparseEncoder`, the worker's chunking), MiniLM "
        "run in-process; nDCG@10 as in the quality benchmark (gain 2^(5 - grade) - 1), over "
        "all 225 queries and over the odd and even halves. Indented rows fuse the dense and "
        "sparse candidates of the row above them differently, or rank them with the library's "
        "feedback ranker (the API's default), then with one of its constants changed.\n\n"
        + table(
            ["variant", "nDCG@10", "odd queries", "even queries"],
            [["↳ " * ((len(name) - len(name.lstrip())) // 2) + name.strip(), f"{a:.3f}",
              f"{o:.3f}", f"{e:.3f}"] for name, (a, o, e) in rows]))
    path = write_section("Retrieval quality: what was tried (Cranfield, offline)",
                         ".venv/bin/python -m bench.retrieval_tuning", machine(), body)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
