"""What precise prefix routing costs the gateway per request: tokenizing the prompt with the
model's tokenizer and chat template, naming its blocks, and matching them against the engines'
block sets. No engines needed; the offline SmolLM2 folder is prepared if missing.

    .venv/bin/python -m bench.prompt_blocks [--replicas 8] [--rounds 200]

Requests are conversations of 8 tenants, each with its own system prompt of the given size and
a new user turn per request: a tenant's first request tokenizes everything (cold), later ones
find the system prompt in the tokenizer's cache (warm). The index is filled as if every replica
held 2,000 other prompts' blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import aiohttp

from gateway.inference.protocol import ChatCompletionRequest
from gateway.routing import Circuit, Replica
from gateway.routing.kv_events import KVEventIndex, ReplicaBlocks, chain_hashes
from gateway.routing.prompt_tokens import load_prompt_tokenizer
from llmops.cli import models_home
from llmops.cli.models import prepare_models

BLOCK_SIZE = 128  # vLLM's CPU backend default; GPUs default to 16
WORDS = ["alpha", "beta", "gamma", "delta", "river", "mountain", "ocean", "forest", "city",
         "music", "paper", "light"]


def request(system: str, turn: int) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Question {turn}: what do the words above say?"}]})


def percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49] * 1e3:7.3f} ms   p99 {q[98] * 1e3:7.3f} ms"


async def run(args: argparse.Namespace) -> None:
    tokenizer = load_prompt_tokenizer(str(prepare_models(models_home())["chat"]))
    rng = random.Random(0)
    replicas = [Replica(f"http://r{i}", "cpu", 64, 16, Circuit(2, 10))
                for i in range(args.replicas)]
    session = aiohttp.ClientSession()
    index = KVEventIndex(replicas, session, max_blocks=200_000, timeout_s=1)
    engine_hash = 0
    for replica in replicas:  # as if filled from events: 2,000 prompts of 8 blocks each
        held = ReplicaBlocks(max_blocks=200_000, block_size=BLOCK_SIZE)
        for _ in range(2000):
            tokens = [rng.randrange(49152) for _ in range(8 * BLOCK_SIZE)]
            engine_hash += 8
            held.apply([{"type": "BlockStored",
                         "block_hashes": list(range(engine_hash, engine_hash + 8)),
                         "token_ids": tokens, "block_size": BLOCK_SIZE, "medium": "GPU",
                         "parent_block_hash": None}])
        index._blocks[replica] = [held]
    print(f"{args.replicas} replicas, block size {BLOCK_SIZE}, {args.rounds} requests per size")
    for words in (250, 1000, 3000):
        systems = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(8)]
        reqs = [request(systems[i % 8], i) for i in range(args.rounds)]
        tokenize, name, match = [], [], []
        n_tokens = 0
        for req in reqs:
            t0 = time.perf_counter()
            tokens = tokenizer.tokens(req)
            t1 = time.perf_counter()
            assert tokens is not None
            blocks = chain_hashes(tokens, BLOCK_SIZE)
            t2 = time.perf_counter()
            index.matched(blocks)
            t3 = time.perf_counter()
            tokenize.append(t1 - t0)
            name.append(t2 - t1)
            match.append(t3 - t2)
            n_tokens = len(tokens)
        cold = statistics.median(tokenize[:8])
        print(f"~{n_tokens:5d} tokens  tokenize, cold   p50 {cold * 1e3:7.3f} ms")
        print(f"{'':14s}tokenize, warm   {percentiles(tokenize[8:])}")
        print(f"{'':14s}name blocks       {percentiles(name)}")
        print(f"{'':14s}match             {percentiles(match)}")
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
