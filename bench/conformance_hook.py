"""What answering in OpenAI's published shape costs: the conformance hook (the one place that
leaves out the nulls OpenAI's schema has no room for) on what vLLM 0.32 sends, in process,
against the work the gateway does on every answer object anyway (parsing it).

    .venv/bin/python -m bench.conformance_hook [--n 50000] [--rounds 5]

Prints, per object, the median over rounds of: parsing the engine's bytes, the hook, and
writing the object again (only when the hook changed it: a stream's text chunks usually pass
as the engine's bytes)."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from gateway.inference.hooks import CHANGED, ConformanceHook

# vLLM 0.32's answers: a whole chat answer (`model_dump()`: nulls and extra fields included),
# a stream's text chunk and its last chunk (`model_dump_json(exclude_unset=True)`).
USAGE = {"prompt_tokens": 9, "total_tokens": 16, "completion_tokens": 7,
         "prompt_tokens_details": None, "completion_tokens_details": None}
WHOLE = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "message": {
             "role": "assistant", "content": "The capital of France is Paris.", "refusal": None,
             "annotations": None, "audio": None, "function_call": None, "tool_calls": [],
             "reasoning": None},
             "logprobs": None, "finish_reason": "stop", "stop_reason": None, "token_ids": None}],
         "service_tier": None, "system_fingerprint": None, "usage": USAGE,
         "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": " Paris"}, "logprobs": None,
                      "finish_reason": None}]}
LAST = {**CHUNK, "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None,
                              "finish_reason": "stop", "stop_reason": None}],
        "usage": USAGE}


def per_object_us(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def measure(obj: dict[str, Any], whole: bool, n: int, rounds: int
            ) -> tuple[float, float, float]:
    """Median µs per object of parsing, the hook, and writing it again (0 if unchanged)."""
    hook = ConformanceHook()
    ctx: Any = None  # the hook reads only the object
    raw = orjson.dumps(obj)
    changed = hook.on_data(ctx, copy.deepcopy(obj), whole) == CHANGED
    done = orjson.loads(raw)
    hook.on_data(ctx, done, whole)
    rows = []
    for _ in range(rounds):
        fresh = iter([orjson.loads(raw) for _ in range(n)])  # the hook edits what it sees
        parse = per_object_us(lambda: orjson.loads(raw), n)
        run = per_object_us(partial(lambda it: hook.on_data(ctx, next(it), whole), fresh), n)
        rewrite = per_object_us(lambda: orjson.dumps(done), n) if changed else 0.0
        rows.append((parse, run, rewrite))
    parse, run, rewrite = (statistics.median(r[i] for r in rows) for i in range(3))
    return parse, run, rewrite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'object':<12}{'parse us':>10}{'hook us':>10}{'rewrite us':>12}{'hook/parse':>12}")
    for name, obj, whole in (("whole", WHOLE, True), ("text chunk", CHUNK, False),
                             ("last chunk", LAST, False)):
        parse, run, rewrite = measure(obj, whole, args.n, args.rounds)
        print(f"{name:<12}{parse:>10.3f}{run:>10.3f}{rewrite:>12.3f}{run / parse:>12.2f}")


if __name__ == "__main__":
    main()
