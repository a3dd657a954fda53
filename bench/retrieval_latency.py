"""Latency of tenant-filtered top-10 searches on the chunk index itself (no HTTP, no embedding),
at 10k and 100k chunks, before and after `EdgeIndex.optimize()`.

    .venv/bin/python -m bench.retrieval_latency [--sizes 10000 100000] [--queries 1000]

Synthetic chunks: 384-dim normalised vectors drawn around 1,000 random centres (so that
nearest neighbours mean something and HNSW recall can be measured), BM25 vectors from
`SparseEncoder` over ~110 words of Zipf-distributed synthetic vocabulary, and a 400-character
text payload. 10 tenants with one store each, files of 100 chunks written through
`replace_file`, as the gateway does. Queries: a random tenant, a noisy copy of one of its
chunks' vectors and 6 Zipf-drawn words; each query runs in the three modes and in hybrid
with the feedback ranker (retrieval/feedback.py, the API's default), in shuffled order, so
that the machine's background load hits them alike. Every search goes through
`QdrantIndex.search` (tenant scope, IDF over the scope, scores), limit 10.

Edge (the embedded default): the shard is written, then copied, and the copy optimized
(`optimize()` builds HNSW; its duration is shown with the longest stall a 5 ms ticker thread
saw meanwhile: the binding holds the GIL). Queries then run on both copies, interleaved, with
the index's tenant filter (the one-keyword `scope` field) and, for comparison, the filter it
used before (`tenant == X AND store IN stores`). "HNSW recall" is the overlap of the dense
top-10 on the optimized copy with the exact top-10 on the other. `ServerIndex` over
qdrant-client's local mode (pure Python) runs at the smallest size only,
with fewer queries. Figures go to docs/benchmarks.md and docs/retrieval_latency.png.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import retrieval.index
from bench.report import DOCS, machine, pct, table, write_section
from retrieval import Chunk, EdgeIndex, Point, QdrantIndex, ServerIndex, SparseEncoder
from retrieval.filters import And, Condition, Match, MatchAny
from retrieval.sparse import SparseVector

DIM = 384
TENANTS = 10
FILE_CHUNKS = 100
MODES = ("dense", "sparse", "hybrid", "feedback")  # feedback: hybrid, the API's default ranker
FILTERS = ("scope field", "tenant AND store")


@dataclass
class Corpus:
    dense: np.ndarray
    texts: list[str]
    sparse: list[SparseVector]
    queries: list[tuple[str, list[float], SparseVector]]

    def points(self) -> Iterator[tuple[str, str, str, list[Point]]]:
        """(tenant, store, file, points) per file of FILE_CHUNKS chunks, tenants in turn."""
        for f in range(len(self.texts) // FILE_CHUNKS):
            tenant = f"tenant-{f % TENANTS}"
            store, file = f"vs_{tenant}", f"file-{f}"
            points = []
            for j in range(FILE_CHUNKS):
                i = f * FILE_CHUNKS + j
                points.append(Point.for_chunk(
                    tenant=tenant, store=store, file=file, filename=f"{file}.txt",
                    attributes={}, content_hash="h", chunk=Chunk(j, 0, len(self.texts[i]),
                                                                 self.texts[i]),
                    dense=self.dense[i].tolist(), sparse=self.sparse[i]))
            yield tenant, store, file, points


def corpus(n: int, queries: int, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, int(rng.integers(4, 10)))) for _ in range(20_000)]
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    zipf /= zipf.sum()
    centres = rng.standard_normal((1000, DIM), dtype=np.float32)
    dense = centres[rng.integers(1000, size=n)] + 0.8 * rng.standard_normal((n, DIM),
                                                                             dtype=np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    encoder = SparseEncoder()
    texts = [" ".join(vocab[i] for i in rng.choice(len(vocab), 110, p=zipf)) for _ in range(n)]
    sparse = [encoder.encode_document(t) for t in texts]
    files_per_tenant = n // FILE_CHUNKS // TENANTS
    asked = []
    for _ in range(queries):
        tenant = int(rng.integers(TENANTS))
        file = int(rng.integers(files_per_tenant)) * TENANTS + tenant
        near = dense[file * FILE_CHUNKS + int(rng.integers(FILE_CHUNKS))]
        q = near + 0.05 * rng.standard_normal(DIM, dtype=np.float32)
        q /= np.linalg.norm(q)
        words = " ".join(vocab[i] for i in rng.choice(len(vocab), 6, p=zipf))
        asked.append((f"tenant-{tenant}", q.tolist(), encoder.encode_query(words)))
    return Corpus(dense, [t[:400] for t in texts], sparse, asked)


def load(index: QdrantIndex, data: Corpus) -> float:
    """Write every file; returns chunks per second."""
    t0 = time.perf_counter()
    for tenant, store, file, points in data.points():
        index.replace_file(tenant, store, file, points)
    return len(data.texts) / (time.perf_counter() - t0)


class Scope:
    """Which tenant filter `QdrantIndex.search` builds: the index's one-keyword `scope` field,
    or, for comparison, `tenant == X AND store IN stores` as it filtered before that field
    (both fields are still indexed). A switch, so both can be measured side by side."""

    def __init__(self) -> None:
        self.compound = False
        self.field_scope = retrieval.index._scope
        retrieval.index._scope = self._scope

    def _scope(self, tenant: str, stores: Sequence[str], filters: Any) -> Condition:
        if not self.compound:
            return self.field_scope(tenant, stores, filters)
        assert filters is None
        return And((Match("tenant", tenant), MatchAny("store", tuple(stores))))


def run_queries(indexes: Mapping[str, QdrantIndex], data: Corpus, n: int, scope: Scope,
                filters: Sequence[str]) -> tuple[dict[str, dict[str, list[float]]],
                                                 dict[str, list[list[str]]]]:
    """Each query in each (index, filter, mode), in shuffled order so that background load
    hits them alike; latencies (seconds) per "index, filter" label and mode, and the dense
    top-10 ids per index (with the scope field)."""
    runs = [(name, f, mode) for name in indexes for f in filters for mode in MODES]
    latencies: dict[str, dict[str, list[float]]] = {
        f"{name}, {f}": {m: [] for m in MODES} for name in indexes for f in filters}
    dense_top: dict[str, list[list[str]]] = {name: [] for name in indexes}
    shuffle = random.Random(1)
    for tenant, dense, sparse in data.queries[:n]:
        for name, f, mode in shuffle.sample(runs, len(runs)):
            scope.compound = f != FILTERS[0]
            t0 = time.perf_counter()
            hits = indexes[name].search(tenant, [f"vs_{tenant}"], dense, sparse,
                                        "hybrid" if mode == "feedback" else mode, 10, None,
                                        feedback=mode == "feedback")
            latencies[f"{name}, {f}"][mode].append(time.perf_counter() - t0)
            if mode == "dense" and f == FILTERS[0]:
                dense_top[name].append([h.id for h in hits])
    scope.compound = False
    return latencies, dense_top


def optimize(index: EdgeIndex) -> tuple[float, float]:
    """Duration of `optimize()` and the longest stall of a thread ticking every 5 ms."""
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    t0 = time.perf_counter()
    index.optimize()
    took = time.perf_counter() - t0
    done.set()
    ticker.join()
    return took, max(gaps, default=0.0)


def recall(exact: list[list[str]], approx: list[list[str]]) -> float:
    return float(np.mean([len(set(e) & set(a)) / len(e) for e, a in zip(exact, approx,
                                                                          strict=True) if e]))


def row(engine: str, n: int, state: str, lat: dict[str, list[float]]) -> list[str]:
    cells = [engine, f"{n:,}", state]
    for mode in MODES:
        cells += [f"{pct(lat[mode], 0.5) * 1000:.2f}", f"{pct(lat[mode], 0.99) * 1000:.2f}"]
    return cells


def chart(results: list[tuple[str, dict[str, list[float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    width = 0.8 / len(results)
    for ax, (q, name) in zip(axes, ((0.5, "p50"), (0.99, "p99")), strict=True):
        for k, (label, lat) in enumerate(results):
            xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(MODES))]
            ax.bar(xs, [pct(lat[m], q) * 1000 for m in MODES], width, label=label)
        ax.axhline(10, color="red", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(MODES)), MODES)
        ax.set_title(f"{name}, tenant-filtered top-10 on Edge")
        ax.set_ylabel("ms")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    global TENANTS
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--server-queries", type=int, default=50,
                        help="queries per mode on ServerIndex (local mode); 0 to skip it")
    parser.add_argument("--tenants", type=int, default=TENANTS,
                        help="tenants (one store each): a search scopes chunks / tenants")
    parser.add_argument("--no-compound", action="store_true",
                        help="skip the comparison with the former tenant AND store filter")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/")
    args = parser.parse_args()
    TENANTS = args.tenants
    scope = Scope()
    filters = FILTERS[:1] if args.no_compound else FILTERS
    host = machine()
    rows: list[list[str]] = []
    notes: list[list[str]] = []
    plotted: list[tuple[str, dict[str, list[float]]]] = []
    for n in args.sizes:
        t0 = time.perf_counter()
        data = corpus(n, args.queries)
        print(f"{n:,} chunks: corpus built in {time.perf_counter() - t0:.0f} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
            plain, optimized = Path(tmp) / "plain", Path(tmp) / "optimized"
            index = EdgeIndex(plain, DIM)
            try:
                rate = load(index, data)
            finally:
                index.close()
            shutil.copytree(plain, optimized)  # the same shard twice: one gets optimized
            indexes = {"as written": EdgeIndex(plain, DIM),
                       "optimized": EdgeIndex(optimized, DIM)}
            try:
                took, stall = optimize(indexes["optimized"])
                lat, tops = run_queries(indexes, data, args.queries, scope, filters)
            finally:
                for index in indexes.values():
                    index.close()
        for label, by_mode in lat.items():
            rows.append(row("Edge", n, label, by_mode))
            print(rows[-1], flush=True)
        plotted += [(f"{n // 1000}k, {label}", lat[label]) for label in
                    (f"as written, {FILTERS[0]}", f"optimized, {FILTERS[0]}")]
        notes.append(["Edge", f"{n:,}", f"{rate:,.0f}", f"{took:.1f} s", f"{stall:.1f} s",
                      f"{recall(tops['as written'], tops['optimized']):.3f}"])
        print(notes[-1], flush=True)
        if args.server_queries and n == min(args.sizes):
            from qdrant_client import QdrantClient

            with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp, \
                    warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Payload indexes have no effect")
                server = ServerIndex(QdrantClient(path=str(Path(tmp) / "local")), DIM)
                try:
                    rate = load(server, data)
                    lat, _ = run_queries({"local mode": server}, data, args.server_queries,
                                         scope, FILTERS[:1])
                finally:
                    server.close()
            rows.append(row("ServerIndex", n, f"local mode, {FILTERS[0]}",
                            lat[f"local mode, {FILTERS[0]}"]))
            notes.append(["ServerIndex (local mode)", f"{n:,}", f"{rate:,.0f}", "-", "-", "-"])
            print(rows[-1], notes[-1], flush=True)
    header = ["engine", "chunks", "shard, tenant filter"] + [f"{m} {q} ms" for m in MODES
                                              for q in ("p50", "p99")]
    latency = table(header, rows)
    build = table(["engine", "chunks", "upsert chunks/s", "optimize()", "longest GIL stall",
                   "HNSW recall@10 vs exact"], notes)
    print()
    print(latency)
    print()
    print(build)
    if args.no_docs:
        return
    DOCS.mkdir(exist_ok=True)
    image = "retrieval_latency.png" if TENANTS == 10 else f"retrieval_latency_{TENANTS}t.png"
    chart(plotted, DOCS / image)
    command = ".venv/bin/python -m bench.retrieval_latency" + "".join(
        f" {a}" for a in sys.argv[1:])
    body = (
        f"Tenant-filtered top-10 searches through `QdrantIndex.search` on synthetic chunks "
        f"({TENANTS} tenants, one store each, so a search scopes 1/{TENANTS} of the chunks; "
        f"{args.queries} queries per mode and variant on Edge, {args.server_queries} on the "
        f"local-mode server). Edge rows: the shard as written (no index: dense search scans "
        f"the tenant's chunks) and an optimized copy (HNSW), queried interleaved; the tenant "
        f"filter the index uses (`scope` field) and the one it used before (`tenant AND "
        f"store`). Other work shared the machine, so p99 includes "
        f"scheduling noise.\n\n{latency}\n\n{build}\n\n"
        f"![latency]({image})\n")
    title = "Retrieval index latency" + ("" if TENANTS == 10 else f", {TENANTS} tenants")
    print(f"written to {write_section(title, command, host, body)}")


if __name__ == "__main__":
    main()
