"""A soak of mixed traffic through a real gateway process on loopback: chat, streamed chat,
embeddings and answers grounded in a vector store (RAG), from several client threads, for a
bounded time. Afterwards the ledger is reconciled exactly against the requests sent (one
record per request, the upstream's usage on each) and the gateway's resident memory must be
flat (the median of the last third of the run within 10% of the first third's).

The upstream is the FAKE vLLM of `tests.reliability.fake_vllm` (so that the gateway, not the
engines, is what is soaked); Redis is the shared one under a prefix of the run's own, the
store a SQLite file, and an ingestion worker builds the vector store first.

    python -m tests.reliability.soak --duration 600      # `make soak`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy

from gateway.inference.searching import request_id as search_request_id
from tests.e2e.conftest import Running
from tests.reliability.fake_vllm import COMPLETION_TOKENS, PROMPT_TOKENS
from tests.reliability.stack import (
    CHAT,
    EMBED,
    GatewayProcess,
    fake_upstream,
    gateway_config,
    ingest_worker,
    start_gateway,
)

__all__ = ["SoakResult", "run_soak"]

KINDS = ("chat", "stream", "embedding", "rag")
DOCUMENT = " ".join(f"Section {i}: the Zorblax kettle model {i} has a {i % 7 + 1}-year "
                    "warranty and boils water in ninety seconds." for i in range(60))


@dataclass
class SoakResult:
    duration_s: float
    threads: int
    sent: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    requests_per_s: float = 0.0
    ledger_records: int = 0
    missing_records: int = 0
    unexpected_records: int = 0
    mismatched_records: int = 0
    rss_mib_first_third: float = 0.0
    rss_mib_last_third: float = 0.0
    rss_growth: float = 0.0
    rss_samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rag_store(gateway: GatewayProcess, key: str) -> str:
    """A vector store of the key's tenant holding one document, ingested by a real worker."""
    worker = ingest_worker(gateway)
    try:
        with gateway.client(key, timeout=60) as client:
            file_id = client.post("/v1/files", files={"file": ("kettle.txt", DOCUMENT.encode())},
                                  data={"purpose": "assistants"}).json()["id"]
            store = client.post("/v1/vector_stores", json={"name": "soak",
                                                           "file_ids": [file_id]}).json()["id"]
            deadline = time.monotonic() + 180
            while client.get(f"/v1/vector_stores/{store}").json()["status"] != "completed":
                if time.monotonic() > deadline:
                    raise RuntimeError("the soak's vector store was never ingested")
                time.sleep(0.3)
        return str(store)
    finally:
        worker.stop()


def _traffic(gateway: GatewayProcess, key: str, store: str, stop: threading.Event,
             sent: dict[str, tuple[str, int]], lock: threading.Lock, n: int) -> None:
    message = [{"role": "user", "content": "How long is the kettle's warranty?"}]
    with httpx.Client(base_url=gateway.url, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        i = n
        while not stop.is_set():
            kind = KINDS[i % len(KINDS)]
            i += 1
            rid = f"{kind}-{uuid.uuid4().hex}"
            headers = {"x-request-id": rid}
            try:
                if kind == "stream":
                    with client.stream("POST", "/v1/chat/completions", headers=headers, json={
                            "model": CHAT, "messages": message, "stream": True}) as resp:
                        body = resp.read()
                    status = resp.status_code
                    if status == 200 and not body.rstrip().endswith(b"data: [DONE]"):
                        status = -1
                elif kind == "embedding":
                    status = client.post("/v1/embeddings", headers=headers, json={
                        "model": EMBED, "input": ["kettle", "warranty"]}).status_code
                else:
                    body_json: dict[str, Any] = {"model": CHAT, "messages": message}
                    if kind == "rag":
                        body_json["retrieval"] = {"vector_store_ids": [store],
                                                  "score_threshold": 0.0, "max_num_results": 3}
                    resp = client.post("/v1/chat/completions", headers=headers, json=body_json)
                    status = resp.status_code
                    if kind == "rag" and status == 200 and not resp.json().get("citations"):
                        status = -3  # answered without its sources
            except httpx.HTTPError:
                status = -2
            with lock:
                sent[rid] = (kind, status)


def _rss(pid: int) -> int:
    """The gateway's resident memory, its children included."""
    proc = psutil.Process(pid)
    return int(proc.memory_info().rss + sum(c.memory_info().rss
                                            for c in proc.children(recursive=True)))


def _reconcile(database_url: str, key_id: str, sent: dict[str, tuple[str, int]],
               result: SoakResult) -> None:
    """The soak key's records, but for the ingestion of the store's file (billed to the key
    that attached it, with request ids of their own): one per request, and one more for the
    query embedding of each grounded request's search."""
    expected = set(sent) | {search_request_id(rid) for rid, (kind, _) in sent.items()
                            if kind == "rag"}
    engine = sqlalchemy.create_engine(database_url)
    deadline = time.monotonic() + 120
    try:
        while True:
            with engine.connect() as conn:
                rows = {r.request_id: r for r in conn.execute(sqlalchemy.text(
                    "SELECT request_id, status, prompt_tokens, completion_tokens "
                    "FROM usage_records WHERE key_id = :key AND request_id NOT LIKE 'ingest.%'"),
                    {"key": key_id})}
            final = {rid for rid, r in rows.items() if r.status != 0}
            if expected <= final or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        engine.dispose()
    result.ledger_records = len(rows)
    result.missing_records = len(expected - set(rows))
    result.unexpected_records = len(set(rows) - expected)
    for rid, (kind, status) in sent.items():
        row = rows.get(rid)
        if row is None:
            continue
        want = (200, 2, 0) if kind == "embedding" else (200, PROMPT_TOKENS, COMPLETION_TOKENS)
        if status == 200 and (row.status, row.prompt_tokens, row.completion_tokens) != want:
            result.mismatched_records += 1


def run_soak(duration_s: float, folder: Path, upstream: Running | None = None,
             threads: int = 4, max_growth: float = 0.10) -> SoakResult:
    """Soak a fresh gateway for `duration_s` seconds; the result says what went wrong."""
    own_upstream = upstream is None
    upstream = upstream or fake_upstream(folder)
    settings = gateway_config(folder, upstream.url, redis_url="redis://127.0.0.1:6379/0")
    gateway = start_gateway(folder, folder, settings)
    result = SoakResult(duration_s=duration_s, threads=threads)
    try:
        created = gateway.new_key()
        key = created["key"]
        store = _rag_store(gateway, key)
        sent: dict[str, tuple[str, int]] = {}
        lock = threading.Lock()
        stop = threading.Event()
        workers = [threading.Thread(target=_traffic, args=(gateway, key, store, stop, sent,
                                                           lock, n)) for n in range(threads)]
        rss: list[int] = []
        started = time.monotonic()
        for w in workers:
            w.start()
        warm_up = min(10.0, duration_s / 6)  # first caches and pools fill: not a leak
        while (elapsed := time.monotonic() - started) < duration_s:
            if elapsed >= warm_up:
                rss.append(_rss(gateway.running.proc.pid))
            time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(timeout=120)
        elapsed = time.monotonic() - started
        result.sent = len(sent)
        result.by_kind = dict(Counter(k for k, _ in sent.values()))
        result.by_status = {str(s): c for s, c in Counter(s for _, s in sent.values()).items()}
        result.requests_per_s = round(len(sent) / elapsed, 1)
        _reconcile(settings["database_url"], created["id"], sent, result)
        third = max(1, len(rss) // 3)
        first, last = statistics.median(rss[:third]), statistics.median(rss[-third:])
        result.rss_samples = len(rss)
        result.rss_mib_first_third = round(first / 2**20, 1)
        result.rss_mib_last_third = round(last / 2**20, 1)
        result.rss_growth = round(last / first - 1, 4)
        if set(result.by_status) != {"200"}:
            result.problems.append(f"not every request was served: {result.by_status}")
        if set(result.by_kind) != set(KINDS):
            result.problems.append(f"not every kind of traffic was sent: {result.by_kind}")
        for name in ("missing_records", "unexpected_records", "mismatched_records"):
            if getattr(result, name):
                result.problems.append(f"{name}: {getattr(result, name)}")
        searches = result.by_kind.get("rag", 0)
        if result.ledger_records != result.sent + searches:
            result.problems.append(f"{result.ledger_records} records for {result.sent} requests "
                                   f"and {searches} searches")
        if result.rss_growth > max_growth:
            result.problems.append(f"gateway memory grew {result.rss_growth:.1%} "
                                   f"({result.rss_mib_first_third} -> "
                                   f"{result.rss_mib_last_third} MiB)")
    finally:
        gateway.stop()
        if own_upstream:
            upstream.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--max-growth", type=float, default=0.10,
                        help="allowed RSS growth, last third over first (default 0.10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmops-soak-") as tmp:
        result = run_soak(args.duration, Path(tmp), threads=args.threads,
                          max_growth=args.max_growth)
    print(json.dumps({**asdict(result), "ok": result.ok}, indent=2))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
