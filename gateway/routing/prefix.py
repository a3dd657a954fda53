"""Where a prompt's prefix likely sits in a KV cache: the prompt as a hash chain of fixed-size
blocks, and a bounded index of which replica recently served which blocks.

It is approximate on purpose: no tokenizer, no word from the engine. A replica that served a
prompt keeps its leading blocks cached until memory pressure evicts them, which the index
approximates with a time to live. Anything with `matched(blocks)` (say, a view built from the
engines' own KV-cache events) can stand in for `PrefixIndex` behind the prefix scorer.
"""

from __future__ import annotations

import time
import zlib
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
    blocks only).

    The hash is CRC-32 and Adler-32 of the prefix side by side (64 bits), both carried on
    from block to block in C: a few microseconds a prompt. Not a cryptographic hash: a
    crafted collision could only misdirect the crafter's own requests."""
    text = rendered(request)
    end = min(len(text) // block_chars, _MAX_BLOCKS) * block_chars
    crc = adler = 1
    chain = []
    for start in range(0, end, block_chars):
        block = text[start:start + block_chars]
        crc, adler = zlib.crc32(block, crc), zlib.adler32(block, adler)
        chain.append(crc << 32 | adler)
    return tuple(chain)


class PrefixHolders(Protocol):
    """Which replicas (by URL) hold how many of a request's leading blocks: what the gateway
    sent where (`PrefixIndex`), or what the engines report they cache (`KVEventIndex`)."""

    def blocks(self, request: OpenAIRequest | None, adapter: str | None) -> tuple[int, ...]:
        """The request's prompt as the blocks `matched` compares."""

    def matched(self, blocks: Sequence[int]) -> dict[str, int]: ...

    def record(self, replica: str, blocks: Sequence[int]) -> None:
        """`replica` was sent a request with these blocks."""


class PrefixIndex:
    """The blocks each replica was recently sent, for one model. Memory is bounded by
    `max_blocks` (least recently sent go first; a prompt's leading blocks, shared by the most
    requests, are refreshed last); a replica's claim on a block lapses `ttl_s` after it was
    last sent there."""

    def __init__(self, max_blocks: int, ttl_s: float, block_chars: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_blocks = max_blocks
        self.block_chars = block_chars
        self.ttl_s = ttl_s
        self.clock = clock
        self._blocks: OrderedDict[int, dict[str, float]] = OrderedDict()  # hash -> url -> when

    def __len__(self) -> int:
        return len(self._blocks)

    def blocks(self, request: OpenAIRequest | None, adapter: str | None) -> tuple[int, ...]:
        return prefix_blocks(request, self.block_chars)

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
        """Leading blocks held, by replica URL; replicas holding none are left out.

        What a replica holds is a run from the first block: every prompt sent with a block
        had all blocks before it, recorded at the same moment and refreshed later than it in
        the LRU order. So its length is found by bisection, in a few lookups."""
        if not blocks:
            return {}
        entries = self._blocks
        horizon = self.clock() - self.ttl_s
        first = entries.get(blocks[0])
        if first is None:
            return {}
        held: dict[str, int] = {}
        for replica, when in first.items():
            if when <= horizon:
                continue
            low, high = 1, len(blocks)  # it holds `low` blocks, at most `high`
            while low < high:
                mid = (low + high + 1) // 2
                holders = entries.get(blocks[mid - 1])
                if holders is not None and holders.get(replica, horizon) > horizon:
                    low = mid
                else:
                    high = mid - 1
            held[replica] = low
        return held


def _json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
