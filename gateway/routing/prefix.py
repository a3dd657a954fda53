"""Where a prompt's prefix likely sits in a KV cache: the prompt as a hash chain of fixed-size
blocks, and a bounded index of which replica recently served which blocks.

It is approximate on purpose: no tokenizer, no word from the engine. A replica that served a
prompt keeps its leading blocks cached until memory pressure evicts them, which the index
approximates with a time to live. Anything with `matched(blocks)` (say, a view built from the
engines' own KV-cache events) can stand in for `PrefixIndex` behind the prefix scorer.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import orjson

from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest

__all__ = ["PrefixHolders", "PrefixIndex", "prefix_blocks", "rendered"]

# Hashing stops here: a prefix longer than this many blocks gains nothing more from routing.
_MAX_BLOCKS = 4096
_RECORD, _UNIT = "\x1e", "\x1f"  # ASCII separators: no message text is mistaken for them


def rendered(request: OpenAIRequest | None) -> bytes:
    """The prompt in a canonical form (tools, then each message's role and content in order;
    or a completion's prompt), so equal prompts render equally whatever the JSON's spacing or
    key order. Empty for requests without a prompt (embeddings)."""
    if isinstance(request, ChatCompletionRequest):
        parts = [_json(request.tools)] if request.tools else []
        for m in request.messages:
            content = m.content if isinstance(m.content, str) else _json(m.content)
            extra = m.model_extra
            calls = _json(extra["tool_calls"]) if extra and "tool_calls" in extra else ""
            parts.append(f"{m.role}{_UNIT}{content}{_UNIT}{calls}")
        return _RECORD.join(parts).encode()
    if isinstance(request, CompletionRequest):
        prompt = request.prompt
        return (prompt if isinstance(prompt, str) else _json(prompt)).encode()
    return b""


def prefix_blocks(request: OpenAIRequest | None, block_chars: int) -> tuple[int, ...]:
    """The hash chain of the rendered prompt's whole blocks of `block_chars` bytes: each hash
    covers its block and every block before it, so two prompts share a leading hash exactly
    when they share that prefix. A trailing part block is left out (engines cache whole
    blocks only)."""
    text = rendered(request)
    count = min(len(text) // block_chars, _MAX_BLOCKS)
    running = hashlib.blake2b(digest_size=8)
    chain = []
    view = memoryview(text)
    for i in range(count):
        running.update(view[i * block_chars:(i + 1) * block_chars])
        chain.append(int.from_bytes(running.copy().digest(), "little"))
    return tuple(chain)


class PrefixHolders(Protocol):
    """Which replicas (by URL) hold how many of a request's leading blocks."""

    def matched(self, blocks: Sequence[int]) -> dict[str, int]: ...

    def record(self, replica: str, blocks: Sequence[int]) -> None:
        """`replica` was sent a request with these blocks."""


class PrefixIndex:
    """The blocks each replica was recently sent, for one model. Memory is bounded by
    `max_blocks` (least recently sent go first; a prompt's leading blocks, shared by the most
    requests, are refreshed last); a replica's claim on a block lapses `ttl_s` after it was
    last sent there."""

    def __init__(self, max_blocks: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_blocks = max_blocks
        self.ttl_s = ttl_s
        self.clock = clock
        self._blocks: OrderedDict[int, dict[str, float]] = OrderedDict()  # hash -> url -> when

    def __len__(self) -> int:
        return len(self._blocks)

    def record(self, replica: str, blocks: Sequence[int]) -> None:
        now = self.clock()
        entries = self._blocks
        for block in reversed(blocks):
            holders = entries.get(block)
            if holders is None:
                entries[block] = {replica: now}
            else:
                holders[replica] = now
                entries.move_to_end(block)
        while len(entries) > self.max_blocks:
            entries.popitem(last=False)

    def matched(self, blocks: Sequence[int]) -> dict[str, int]:
        """Leading blocks held, by replica URL; replicas holding none are left out."""
        horizon = self.clock() - self.ttl_s
        held: dict[str, int] = {}
        for i, block in enumerate(blocks):
            holders = self._blocks.get(block)
            if holders is None:
                break
            live = [r for r, when in holders.items()
                    if when > horizon and (i == 0 or held.get(r) == i)]
            if not live:
                break
            for replica in live:
                held[replica] = i + 1
        return held


def _json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
