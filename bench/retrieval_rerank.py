"""Does zero-shot reranking by query likelihood (UPR, Sachan et al. 2022) with the small chat
model help hybrid retrieval on Cranfield? Offline, on the library as bench/retrieval_tuning.py
runs it, with SmolLM2-135M-Instruct run in-process (transformers, CPU) and scores cached.

    .venv/bin/python -m bench.retrieval_rerank --half odd --top-k 10

Each candidate document (its best hybrid chunk, truncated) is scored by the mean log-probability
of the query's tokens after "Passage: ...\\nPlease write a question based on this passage.\\n
Question:". Rows: the hybrid ranking, the top k reordered by that score alone, and fusions of
the two rankings (RRF, weighted) or of their normalised scores.

Measured 2026-11-22 on 2 shared CPU cores (~0.3 passages/s, so only queries 1-95 scored, top
10, passages cut to 128 tokens): no gain. Hybrid 0.377 (odd 0.387, even 0.367); UPR alone
0.343 (0.377, 0.308); the best fusion on the odd half (RRF k=5, UPR weight 1: odd 0.401) drops
the even half to 0.342. A 135M model's query likelihood is too weak a relevance signal here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.retrieval_quality import ndcg
from bench.retrieval_tuning import CACHE, Collection, Embedder
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from retrieval import SparseEncoder

PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


class QueryLikelihood:
    def __init__(self, passage_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        weights = prepare_models(models_home())["chat"]
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(weights)
        model: Any = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
        self.model = model.eval()
        self.passage_tokens = passage_tokens

    def __call__(self, query: str, passages: Sequence[str]) -> list[float]:
        tok = self.tokenizer
        q = tok(" " + query, add_special_tokens=False)["input_ids"]
        rows = []
        for p in passages:
            ids = tok(p, add_special_tokens=False)["input_ids"][:self.passage_tokens]
            prompt = tok(PROMPT.format(passage=tok.decode(ids)),
                         add_special_tokens=False)["input_ids"]
            rows.append(prompt + q)
        width = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = self.torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = self.torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        target = self.torch.tensor(q).unsqueeze(-1)
        out = []
        with self.torch.no_grad():
            hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for i, r in enumerate(rows):
                # the vocabulary projection only where a query token is predicted: it is a
                # fifth of the model's weights and most of its activations' memory
                h = hidden[i, len(r) - len(q) - 1:len(r) - 1]
                logp = self.torch.log_softmax(self.model.lm_head(h).float(), -1)
                out.append(float(logp.gather(-1, target).mean()))
        return out


def rrf(rankings: Sequence[tuple[list[int], float]], k: int = 60) -> list[int]:
    scores: dict[int, float] = {}
    for ranked, weight in rankings:
        for r, d in enumerate(ranked):
            scores[d] = scores.get(d, 0.0) + weight / (k + r + 1)
    return sorted(scores, key=lambda d: -scores[d])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", choices=("odd", "even", "all"), default="odd")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--passage-tokens", type=int, default=160)
    parser.add_argument("--limit", type=int, default=0, help="score only this many queries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-only", action="store_true",
                        help="score nothing: report on the queries already cached")
    args = parser.parse_args()
    embed = Embedder()
    col = Collection(embed, 256, 128)
    encoder = SparseEncoder()
    picked = [i for i in range(len(col.query_texts))
              if args.half == "all" or (i % 2 == 0) == (args.half == "odd")]
    if args.limit:
        picked = picked[:args.limit]
    # per query: documents best first with their best chunk's text and fused score
    runs: dict[int, list[tuple[int, str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        index = col.index(encoder, Path(tmp) / "shard")
        try:
            for i in picked:
                hits = index.search("t", ["s"], col.query_vectors[i].tolist(),
                                    encoder.encode_query(col.query_texts[i]), "hybrid", 50, None)
                seen: dict[int, tuple[int, str, float]] = {}
                for h in hits:
                    d = int(h.payload["file"])
                    seen.setdefault(d, (d, h.payload["text"], h.score))
                runs[i] = list(seen.values())
        finally:
            index.close()

    cache_path = CACHE / f"upr-{args.passage_tokens}.json"
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    import torch

    torch.set_num_threads(args.threads)
    scorer: QueryLikelihood | None = None
    t0, scored = time.perf_counter(), 0
    for n, i in enumerate(picked):
        todo = [(d, text) for d, text, _ in runs[i][:args.top_k] if f"{i}:{d}" not in cache]
        if not todo or args.eval_only:
            continue
        scorer = scorer or QueryLikelihood(args.passage_tokens)
        for (d, _), s in zip(todo, scorer(col.query_texts[i], [t for _, t in todo]),
                             strict=True):
            cache[f"{i}:{d}"] = s
        scored += len(todo)
        if n % 5 == 4:
            cache_path.write_text(json.dumps(cache))
            print(f"{n + 1}/{len(picked)} queries, {scored / (time.perf_counter() - t0):.2f} "
                  "passages/s", flush=True)
    cache_path.write_text(json.dumps(cache))

    def score(rank: dict[int, list[int]]) -> tuple[float, float, float]:
        per = {i: ndcg(r, col.qrels.get(i + 1, {})) for i, r in rank.items()}
        odd = [v for i, v in per.items() if i % 2 == 0]
        even = [v for i, v in per.items() if i % 2 == 1]
        return (float(np.mean(list(per.values()))), float(np.mean(odd)) if odd else float("nan"),
                float(np.mean(even)) if even else float("nan"))

    def show(name: str, rank: dict[int, list[int]]) -> None:
        a, o, e = score(rank)
        print(f"{name:48s} {a:.3f}  (odd {o:.3f}, even {e:.3f})", flush=True)

    k = args.top_k
    picked = [i for i in picked if all(f"{i}:{d}" in cache for d, _, _ in runs[i][:k])]
    print(f"{len(picked)} queries scored", flush=True)
    base = {i: [d for d, _, _ in runs[i]] for i in picked}
    show("hybrid", base)
    upr = {i: sorted(base[i][:k], key=lambda d, i=i: -cache[f"{i}:{d}"])  # type: ignore[misc]
           for i in picked}
    show(f"UPR reorder of top {k}", {i: upr[i] + base[i][k:] for i in picked})
    for rk in (5, 10, 60):
        for w in (0.5, 1.0, 2.0):
            show(f"RRF k={rk} hybrid + {w} x UPR (top {k})",
                 {i: rrf([(base[i][:k], 1.0), (upr[i], w)], rk) + base[i][k:] for i in picked})
    for lam in (0.2, 0.3, 0.5, 0.7):
        def interp(i: int, lam: float = lam) -> list[int]:
            h = np.array([s for _, _, s in runs[i][:k]])
            u = np.array([cache[f"{i}:{d}"] for d in base[i][:k]])
            h = (h - h.min()) / (np.ptp(h) or 1.0)
            u = (u - u.min()) / (np.ptp(u) or 1.0)
            mixed = (1 - lam) * h + lam * u
            return [base[i][j] for j in np.argsort(-mixed, kind="stable")] + base[i][k:]
        show(f"min-max interpolation, UPR weight {lam} (top {k})",
             {i: interp(i) for i in picked})


if __name__ == "__main__":
    main()
