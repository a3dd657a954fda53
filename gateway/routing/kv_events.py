"""Precise prefix routing: which prompt blocks each replica holds in its KV cache, learnt from
the engine's own KV-cache events (vLLM's `--kv-events-config`: a ZMQ PUB socket of msgpack
event batches, each with a sequence number, and a ROUTER socket that replays recent batches).

Blocks are named by our own chain hash over token ids (`chain_hashes`), computed the same way
from the token ids an event reports and from a request's tokens, so matching never depends on
vLLM's internal hash function, its seed or its version. The engine's hashes are kept only to
follow its parent links and removals."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import zmq
import zmq.asyncio

from gateway.inference.protocol import OpenAIRequest
from gateway.routing.prompt_tokens import PromptTokenizer, load_prompt_tokenizer
from gateway.routing.replica import Replica
from llmops.settings import ModelConfig, RoutingConfig

__all__ = [
    "EventSource",
    "KVEventIndex",
    "ReplicaBlocks",
    "build_kv_event_indexes",
    "chain_hashes",
    "decode_batch",
    "discover_sources",
]

log = logging.getLogger(__name__)

_END_SEQ = -1  # the replay socket's end-of-replay marker


def chain_hashes(
    tokens: Sequence[int], block_size: int, *, parent: int = 0, salt: str | None = None
) -> list[int]:
    """One 64-bit hash per full block of `tokens`, each covering its block and every block
    before it (as the engine's prefix cache does). `parent` is the hash of the block before
    `tokens[0]` (0 at the start of a prompt); `salt` keeps apart what the engine keeps apart
    for the same tokens (a LoRA adapter's blocks)."""
    if salt:
        parent = _digest(parent, salt.encode())
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = _digest(parent, array("q", tokens[start:start + block_size]).tobytes())
        out.append(parent)
    return out


def _digest(parent: int, data: bytes) -> int:
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class EventSource:
    """Where one engine (one data-parallel rank of a replica) publishes its events."""

    endpoint: str  # e.g. tcp://10.0.0.7:5557
    replay_endpoint: str | None
    topic: str


def _reachable(endpoint: str, host: str) -> str:
    """The engine reports the address it bound (`tcp://*:5557`); connect to its host instead."""
    scheme, sep, rest = endpoint.partition("://")
    bound, _, port = rest.rpartition(":")
    if sep and bound in ("*", "0.0.0.0", "[::]", "::"):
        return f"{scheme}://{host}:{port}"
    return endpoint


async def discover_sources(
    session: aiohttp.ClientSession, url: str, timeout_s: float
) -> list[EventSource]:
    """The replica's event publishers, from vLLM's `GET /kv_event_sources` (one per rank);
    empty when the engine publishes none."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(f"{url}/kv_event_sources", timeout=timeout) as resp:
        resp.raise_for_status()
        body: Mapping[str, Any] = await resp.json()
    host = urlsplit(url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    sources = []
    for _, cfg in sorted(body.items()):
        if not cfg.get("enable_kv_cache_events") or cfg.get("publisher") != "zmq":
            continue
        replay = cfg.get("replay_endpoint")
        sources.append(EventSource(_reachable(str(cfg["endpoint"]), host),
                                   _reachable(str(replay), host) if replay else None,
                                   str(cfg.get("topic") or "")))
    return sources


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """The events of one published batch (`[ts, [event, ...], dp_rank]`, each event a map
    tagged by `type`); ValueError when it is not one."""
    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"undecodable event batch: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("event batch is not [ts, events, ...]")
    events = batch[1]
    if not all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in events):
        raise ValueError("event without a type")
    return events


@dataclass(eq=False)
class ReplicaBlocks:
    """The blocks one engine holds, as its events told them, bounded to `max_blocks` (the
    oldest stored are forgotten first: a forgotten block only costs a missed match)."""

    max_blocks: int
    block_size: int | None = None
    # (medium, engine hash) -> our chain hash; the same tokens may sit in two tiers.
    _engine: OrderedDict[tuple[str | None, int | bytes], int] = field(
        default_factory=OrderedDict)
    _held: dict[int, int] = field(default_factory=dict)  # our hash -> copies held

    def __len__(self) -> int:
        return len(self._engine)

    def holds(self, block: int) -> bool:
        return block in self._held

    def clear(self) -> None:
        self._engine.clear()
        self._held.clear()

    def apply(self, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            kind = event["type"]
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                for engine_hash in event.get("block_hashes") or ():
                    self._forget((event.get("medium"), _key(engine_hash)))
            elif kind == "AllBlocksCleared":
                self.clear()

    def _stored(self, event: Mapping[str, Any]) -> None:
        hashes = [_key(h) for h in event.get("block_hashes") or ()]
        tokens: list[int] = event.get("token_ids") or []
        size = int(event.get("block_size") or 0)
        if not hashes or size <= 0 or len(tokens) != size * len(hashes):
            return  # not whole blocks: nothing a prompt can be matched against
        if self.block_size is None:
            self.block_size = size
        elif size != self.block_size:
            log.warning("KV event with block size %d, expected %d: ignored", size,
                        self.block_size)
            return
        medium = event.get("medium")
        parent = 0
        if event.get("parent_block_hash") is not None:
            known = self._engine.get((medium, _key(event["parent_block_hash"])))
            if known is None:
                return  # its prefix is unknown to us, so are the hashes that chain from it
            parent = known
        ours = chain_hashes(tokens, size, parent=parent, salt=event.get("lora_name"))
        for engine_hash, block in zip(hashes, ours, strict=True):
            key = (medium, engine_hash)
            if key in self._engine:
                self._engine.move_to_end(key)
                continue
            self._engine[key] = block
            self._held[block] = self._held.get(block, 0) + 1
        while len(self._engine) > self.max_blocks:
            self._forget(next(iter(self._engine)))

    def _forget(self, key: tuple[str | None, int | bytes]) -> None:
        block = self._engine.pop(key, None)
        if block is None:
            return
        left = self._held[block] - 1
        if left:
            self._held[block] = left
        else:
            del self._held[block]


def _apply(blocks: ReplicaBlocks, payload: bytes) -> None:
    """One batch; one we cannot read leaves us not knowing what the engine holds."""
    try:
        blocks.apply(decode_batch(payload))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable KV event batch (%s): forgetting that engine's blocks", exc)
        blocks.clear()


def _key(engine_hash: Any) -> int | bytes:
    # vLLM sends 64-bit ints by default and raw digests with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0
    if isinstance(engine_hash, int | bytes):
        return engine_hash
    raise ValueError(f"unexpected block hash {engine_hash!r}")


class KVEventIndex:
    """Which leading blocks of a prompt each replica of one model holds, kept current by one
    subscriber per replica (and per data-parallel rank) to the engine's KV-cache events.

    A subscriber that misses batches asks the engine's replay socket for them; when it cannot
    get them (no replay socket, too old, engine restarted) it forgets what it knew of that
    engine rather than route on blocks that may be gone."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        session: aiohttp.ClientSession,
        *,
        tokenizer: PromptTokenizer | None = None,
        max_blocks: int,
        timeout_s: float,
        retry_s: float = 5.0,
        receive_hwm: int = 10_000,
    ) -> None:
        self.replicas = list(replicas)
        self.session = session
        self.tokenizer = tokenizer
        self.max_blocks = max_blocks
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.receive_hwm = receive_hwm  # batches ZMQ queues for us; beyond it, a gap to replay
        self._blocks: dict[Replica, list[ReplicaBlocks]] = {r: [] for r in self.replicas}
        self._ctx: zmq.asyncio.Context | None = None  # from start to stop
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def block_size(self) -> int | None:
        """The engines' block size, once one of them has reported a block."""
        for engines in self._blocks.values():
            for blocks in engines:
                if blocks.block_size is not None:
                    return blocks.block_size
        return None

    def blocks_of(self, tokens: Sequence[int], adapter: str | None = None) -> list[int]:
        """A prompt's blocks, named as `matched` expects them (none before the block size is
        known: nothing can match then anyway)."""
        size = self.block_size
        return [] if size is None else chain_hashes(tokens, size, salt=adapter)

    def request_blocks(self, request: OpenAIRequest, adapter: str | None = None) -> list[int]:
        """The blocks of a request's prompt, as the engine will cache them."""
        tokens = self.tokenizer.tokens(request) if self.tokenizer is not None else None
        return [] if tokens is None else self.blocks_of(tokens, adapter)

    def blocks(self, request: OpenAIRequest | None, adapter: str | None) -> tuple[int, ...]:
        return () if request is None else tuple(self.request_blocks(request, adapter))

    def record(self, replica: str, blocks: Sequence[int]) -> None:
        """Nothing: what a replica holds is what its engine reports."""

    def matched(self, blocks: Sequence[int]) -> dict[str, int]:
        """Replica URL -> how many of `blocks`, counted from the first, it holds (replicas
        holding none are left out)."""
        out: dict[str, int] = {}
        for replica, engines in self._blocks.items():
            best = 0
            for held in engines:
                n = 0
                for block in blocks:
                    if not held.holds(block):
                        break
                    n += 1
                best = max(best, n)
            if best:
                out[replica.url] = best
        return out

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._tasks = [asyncio.create_task(self._follow_replica(r)) for r in self.replicas]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def _follow_replica(self, replica: Replica) -> None:
        """Find the replica's publishers, then follow each; start over when that fails."""
        while True:
            try:
                sources = await discover_sources(self.session, replica.url, self.timeout_s)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, AttributeError):
                sources = []
            if not sources:
                await asyncio.sleep(self.retry_s)
                continue
            engines = [ReplicaBlocks(self.max_blocks) for _ in sources]
            self._blocks[replica] = engines
            try:
                async with asyncio.TaskGroup() as group:  # one failing stops the others
                    for source, blocks in zip(sources, engines, strict=True):
                        group.create_task(self._follow(source, blocks))
            except* Exception as failed:  # keep following whatever one engine sent
                log.warning("KV events of %s: %r; starting over", replica.url,
                            failed.exceptions[0])
            finally:
                self._blocks[replica] = []
            await asyncio.sleep(self.retry_s)

    async def _follow(self, source: EventSource, blocks: ReplicaBlocks) -> None:
        assert self._ctx is not None
        sub = self._ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.RCVHWM, self.receive_hwm)
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(source.endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
            # What the engine cached before we listened: the replay buffer has its recent past.
            expected = await self._catch_up(source, blocks, 0)
            live = False  # a batch arrived after the last replay: older ones are not late copies
            while True:
                _topic, seq_bytes, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq < expected:
                    if not live:
                        continue  # already applied from the replay
                    # Numbering started over: the engine restarted, with an empty cache.
                    log.info("KV events of %s started over", source.endpoint)
                    blocks.clear()
                    expected, live = await self._catch_up(source, blocks, 0), False
                    if seq < expected:
                        continue
                if seq > expected:
                    expected = await self._catch_up(source, blocks, expected)
                    if seq < expected:
                        continue
                _apply(blocks, payload)
                expected, live = seq + 1, True
        finally:
            sub.close(linger=0)

    async def _catch_up(self, source: EventSource, blocks: ReplicaBlocks, start: int) -> int:
        """Apply the batches from `start` on from the replay socket; the next sequence number
        expected. Without a full replay what the engine holds is unknown, so it is forgotten."""
        if source.replay_endpoint is None:
            if start:
                blocks.clear()
            return start
        assert self._ctx is not None
        dealer = self._ctx.socket(zmq.DEALER)
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(source.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            expected = start
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self.timeout_s)
                if len(frames) != 4:
                    raise ValueError(f"replay frame of {len(frames)} parts")
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == _END_SEQ:
                    return expected
                if seq != expected:
                    # The buffer no longer reaches back to `start`: start from what it has.
                    blocks.clear()
                _apply(blocks, frames[3])
                expected = seq + 1
        finally:
            dealer.close(linger=0)


def build_kv_event_indexes(
    models: Sequence[ModelConfig],
    replicas: Mapping[str, Sequence[Replica]],
    session: aiohttp.ClientSession,
    config: RoutingConfig,
) -> dict[str, KVEventIndex]:
    """One index per chat model in precise mode (none otherwise), not yet started. Loads each
    model's tokenizer from its `weights`: blocking, so call it off the event loop."""
    if config.prefix_mode != "precise" or config.weight_prefix == 0:
        return {}
    return {
        m.name: KVEventIndex(replicas[m.name], session,
                             tokenizer=load_prompt_tokenizer(m.weights),
                             max_blocks=config.kv_events_max_blocks,
                             timeout_s=config.kv_events_timeout_s)
        for m in models if m.kind == "chat" and m.weights is not None
    }
