"""How well the prompt embedding drift signal tells shifted traffic from the same traffic.

Offline, with the drift detector's own test (`observability.drift.mmd_test`, the gateway's
default alpha, permutations and `min_mmd`) on MiniLM embeddings computed in-process (the same
model the gateway's embedding engine serves): a reference window of kitchen questions against
recent windows where a growing share of the prompts are Python debugging questions
(`tests/drift_prompts.py`). Each cell is over `--trials` fresh pairs of windows: how often the
score crossed its threshold (0% share: the false alarm rate; above: the detection rate), and
the median score and threshold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from bench.report import machine, table, write_section
from bench.retrieval_tuning import Embedder
from llmops.settings import DriftConfig
from observability.drift import mmd_test
from tests.drift_prompts import prompts

SHARES = (0.0, 0.1, 0.25, 0.5, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    cfg = DriftConfig()
    embed = Embedder()
    need = max(args.windows) * (args.trials + 1)
    pools = {kind: embed(prompts(kind, 2 * need, seed=11), f"drift-{kind}-{2 * need}")
             for kind in ("kitchen", "python")}
    rng = np.random.default_rng(0)
    rows, seconds = [], []
    for window in args.windows:
        for share in SHARES:
            hits, scores, thresholds = 0, [], []
            for _ in range(args.trials):
                ref = pools["kitchen"][rng.choice(len(pools["kitchen"]), window, replace=False)]
                moved = round(share * window)
                recent = np.concatenate([
                    pools["kitchen"][rng.choice(len(pools["kitchen"]), window - moved,
                                                replace=False)],
                    pools["python"][rng.choice(len(pools["python"]), moved, replace=False)]])
                t0 = time.perf_counter()
                score, null = mmd_test(ref.astype(np.float16), recent.astype(np.float16),
                                       cfg.alpha, cfg.permutations, rng)
                seconds.append(time.perf_counter() - t0)
                threshold = max(null, cfg.min_mmd)
                hits += score > threshold
                scores.append(score)
                thresholds.append(threshold)
            rows.append([str(window), f"{share:.0%}", f"{hits / args.trials:.0%}",
                         f"{statistics.median(scores):.4f}",
                         f"{statistics.median(thresholds):.4f}"])
            print(" | ".join(rows[-1]), flush=True)
    body = table(["window", "shifted share", "over threshold", "median MMD²",
                  "median threshold"], rows)
    body += (f"\n\n{args.trials} trials per row; alpha {cfg.alpha}, {cfg.permutations} "
             f"permutations, min_mmd {cfg.min_mmd}. One comparison took "
             f"{statistics.median(seconds) * 1000:.1f} ms (median over all rows).\n")
    print(body)
    if not args.no_docs:
        write_section("Drift detection sensitivity",
                      " ".join([".venv/bin/python -m bench.drift_sensitivity", *sys.argv[1:]]),
                      machine(), __doc__.split("\n\n", 1)[1] + "\n" + body)


if __name__ == "__main__":
    main()
