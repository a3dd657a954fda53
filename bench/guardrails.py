"""What guardrails cost the gateway: the stream filter per SSE chunk, and the prompt scan per
kilobyte, measured in-process on this machine (no network, no model).

    .venv/bin/python -m bench.guardrails [--tokens 2000] [--rounds 5]

The stream case relays a synthetic answer (ordinary prose with a few values in it, one token
of 1-8 characters per chunk, vLLM's chunk shape with continuous usage) through the gateway's
SSE tap with no guardrails, with every category only logged (the built-in policy) and with
every category redacted, and prints the median time per chunk. The scan case times
`check_input` on prompts of ordinary text from 1 KB to 1 MB under the built-in policy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import orjson

from gateway.inference.context import RequestContext
from gateway.inference.hooks import GuardrailHook, Hooks, UsageHook
from gateway.inference.sse import SseRelay
from guardrails import Guardrails, OutputFilter, Tally
from guardrails.schema import CATEGORIES
from llmops.settings import GuardrailsConfig
from tenancy.tenants import Limits, Principal

WHO = Principal("key_bench", "ten_bench", "member", None, Limits(), Limits())
HOOKS = Hooks([GuardrailHook(Guardrails(GuardrailsConfig())), UsageHook()])
PROSE = ("The kettle comes with a seven-year warranty covering the heating element, and the "
         "service desk answers within 24 hours on weekdays between 9:00 and 17:30. ")
VALUES = (" Write to jane.doe@example.com or call +44 20 7946 0958;"
          " the card 4111 1111 1111 1111 was refunded. ")


def tokens(count: int, seed: int = 7) -> list[str]:
    """`count` pieces of 1-8 characters of prose, with a few values every ~400 tokens."""
    rng = random.Random(seed)
    text, out = "", []
    while len(out) < count:
        if not text:
            text = PROSE * 3 + VALUES
        n = rng.randint(1, 8)
        out.append(text[:n])
        text = text[n:]
    return out


def events(pieces: list[str]) -> list[bytes]:
    usage = {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}
    out = []
    for i, piece in enumerate(pieces):
        chunk: dict[str, Any] = {
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [{"index": 0, "delta": {"content": piece},
                                       "logprobs": None, "finish_reason": None}],
            "usage": {**usage, "completion_tokens": i + 1}}
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    return out


def per_chunk_us(chunks: list[bytes], guard: OutputFilter | None) -> float:
    ctx = RequestContext(WHO, "req", "/v1/chat/completions", "chat", lambda *_: None,
                         model="m", output=guard)
    tap = SseRelay(ctx, HOOKS)
    start = time.perf_counter()
    for chunk in chunks:
        tap.feed(chunk)
    tap.feed(b"data: [DONE]\n\n")
    return (time.perf_counter() - start) / len(chunks) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    chunks = events(tokens(args.tokens))
    cases = {"no guardrails": None, "log every category": "log",
             "redact every category": "redact"}
    print(f"stream filter, {args.tokens} chunks, median of {args.rounds} rounds:")
    base = None
    for name, action in cases.items():
        def guard(action: str | None = action) -> OutputFilter | None:
            return None if action is None else OutputFilter(
                dict.fromkeys(CATEGORIES, action), Tally())  # type: ignore[arg-type]

        us = statistics.median(per_chunk_us(chunks, guard()) for _ in range(args.rounds))
        base = us if base is None else base
        print(f"  {name:24} {us:7.1f} us/chunk  (+{us - base:.1f})")

    guardrails = Guardrails(GuardrailsConfig())
    policy = guardrails.policy(WHO)
    print("prompt scan (built-in policy: every category logged):")
    for size in (1 << 10, 64 << 10, 1 << 20):
        text = (PROSE * (size // len(PROSE) + 1))[:size]
        payload = {"model": "m", "messages": [{"role": "user", "content": text}]}
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            guardrails.check_input(policy, payload, Tally())
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1000
        print(f"  {size >> 10:5} KB  {ms:8.2f} ms  ({ms / (size / 1024) * 1000:.1f} us/KB)")


if __name__ == "__main__":
    main()
