"""Precise prefix routing from vLLM's KV-cache events: block naming, the per-engine block set
(from event batches a real vLLM-CPU engine published), and the subscriber's sequence handling
against a ZMQ publisher speaking vLLM's wire format."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from aiohttp import web

from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest
from gateway.routing import Circuit, Replica
from gateway.routing.kv_events import (
    KVEventIndex,
    ReplicaBlocks,
    build_kv_event_indexes,
    chain_hashes,
    decode_batch,
    discover_sources,
)
from gateway.routing.prompt_tokens import PromptTokenizer
from llmops.settings import ModelConfig, PoolConfig, RoutingConfig, Settings

CAPTURE = json.loads((Path(__file__).parents[1] / "data" / "kv_events" / "smollm2-cpu.json")
                     .read_text())
PAYLOADS = [base64.b64decode(f["payload"]) for f in CAPTURE["frames"]]
TENANT0 = CAPTURE["tenant0_prompt_token_ids"]  # 526 tokens: 4 full blocks of 128
BS = 128


def events(i: int) -> list[dict[str, Any]]:
    return decode_batch(PAYLOADS[i])


def stored_tokens(i: int) -> list[int]:
    return next(e["token_ids"] for e in events(i) if e["type"] == "BlockStored")


def leading(held: ReplicaBlocks, tokens: list[int]) -> int:
    n = 0
    for block in chain_hashes(tokens, BS):
        if not held.holds(block):
            break
        n += 1
    return n


def test_chain_hashes_name_full_blocks_by_their_whole_prefix() -> None:
    blocks = chain_hashes(TENANT0, BS)
    assert len(blocks) == 4 == len(set(blocks))  # the last 14 tokens make no full block
    assert chain_hashes(TENANT0[:300], BS) == blocks[:2]
    assert chain_hashes(TENANT0[BS:], BS, parent=blocks[0]) == blocks[1:]
    other = [7, *TENANT0[1:]]  # one token differs in the first block: every block differs
    assert not set(chain_hashes(other, BS)) & set(blocks)
    assert not set(chain_hashes(TENANT0, BS, salt="adapter-a")) & set(blocks)
    assert chain_hashes(TENANT0[:100], BS) == []


def test_captured_batches_decode_as_vllm_publishes_them() -> None:
    assert [f["seq"] for f in CAPTURE["frames"]] == list(range(9))
    first = events(0)
    assert [e["type"] for e in first] == ["BlockStored"]
    assert first[0]["block_size"] == BS and len(first[0]["block_hashes"]) == 4
    assert first[0]["parent_block_hash"] is None and first[0]["medium"] == "GPU"
    assert [e["type"] for e in events(5)] == ["BlockRemoved"] * 4 + ["BlockStored"]
    assert events(8)[0] == {"type": "AllBlocksCleared"}
    for bad in (b"\xc1", msgspec.msgpack.encode({"ts": 1}), msgspec.msgpack.encode([1, [{}]])):
        with pytest.raises(ValueError):
            decode_batch(bad)


def test_the_gateway_tokenizes_a_chat_as_the_engine_did() -> None:
    """The recorded prompt tokens (the model's tokenizer and chat template in the gateway)
    begin with the token ids the engine reported for the blocks it cached."""
    assert TENANT0[:4 * BS] == stored_tokens(0)


def test_engine_blocks_follow_stores_evictions_and_clears() -> None:
    held = ReplicaBlocks(max_blocks=1000)
    tenants = [stored_tokens(i) for i in range(5)]  # tenants 0..4, one batch each
    for i in range(5):
        held.apply(events(i))
    assert held.block_size == BS and len(held) == 20
    assert [leading(held, t) for t in tenants] == [4] * 5
    assert leading(held, TENANT0) == 4

    held.apply(events(5))  # the cache is full: tenant 0's blocks make room for tenant 5's
    assert leading(held, TENANT0) == 0 and leading(held, stored_tokens(5)) == 4
    held.apply(events(6))
    held.apply(events(7))  # tenant 0 again: stored once more, tenants 1 and 2 evicted
    assert [leading(held, t) for t in tenants] == [4, 0, 0, 4, 4]
    held.apply(events(8))  # reset_prefix_cache, then tenant 0 once more
    assert leading(held, TENANT0) == 4 and len(held) == 4
    assert leading(held, tenants[3]) == 0


def test_blocks_chain_from_a_parent_the_engine_reported_before() -> None:
    tokens = stored_tokens(0)
    whole = events(0)[0]
    hashes = whole["block_hashes"]
    head = {**whole, "block_hashes": hashes[:2], "token_ids": tokens[:2 * BS]}
    tail = {**whole, "block_hashes": hashes[2:], "token_ids": tokens[2 * BS:],
            "parent_block_hash": hashes[1]}

    orphan = ReplicaBlocks(max_blocks=100)
    orphan.apply([tail])  # its parent is unknown: its blocks cannot be named
    assert len(orphan) == 0

    held = ReplicaBlocks(max_blocks=100)
    held.apply([head, tail])
    assert leading(held, TENANT0) == 4
    held.apply([{"type": "BlockRemoved", "block_hashes": [hashes[1]], "medium": "GPU"}])
    assert leading(held, TENANT0) == 1


def test_an_adapters_blocks_are_its_own() -> None:
    event = {**events(0)[0], "lora_name": "support-v2"}
    held = ReplicaBlocks(max_blocks=100)
    held.apply([event])
    assert leading(held, TENANT0) == 0
    assert all(held.holds(b) for b in chain_hashes(TENANT0, BS, salt="support-v2"))


def test_memory_is_bounded_oldest_blocks_first() -> None:
    held = ReplicaBlocks(max_blocks=6)
    held.apply(events(0))
    held.apply(events(1))
    assert len(held) == 6
    assert leading(held, TENANT0) == 0  # its first two blocks were forgotten
    assert leading(held, stored_tokens(1)) == 4


class Tokenizer:
    """Characters as tokens; a chat is its messages' contents."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append(text)
        return [ord(c) for c in text]

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
        assert kwargs["add_generation_prompt"] and kwargs["tokenize"] is False
        return "".join(m["content"] for m in conversation)


def test_prompt_tokens_of_requests() -> None:
    tokens = PromptTokenizer(Tokenizer()).tokens
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert tokens(chat) == [ord("a"), ord("\n"), ord("b")]
    image = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert tokens(image) is None
    assert tokens(CompletionRequest(model="m", prompt="hi")) == [104, 105]
    assert tokens(CompletionRequest(model="m", prompt=[5, 6])) == [5, 6]
    assert tokens(CompletionRequest(model="m", prompt=["a", "b"])) is None


def test_pieces_between_added_tokens_are_tokenized_once() -> None:
    fake = Tokenizer()
    prompt = PromptTokenizer(fake, {"<s>": 1, "<s>x": 2}, cache_pieces=2)
    assert prompt.encode("<s>ab<s>xab<s>") == [1, 97, 98, 2, 97, 98, 1]
    assert fake.encoded == ["ab"]
    assert prompt.encode("cd<s>ab") == [99, 100, 1, 97, 98]
    prompt.encode("ef")  # three pieces seen, two kept: "ab" was used last but one
    prompt.encode("ab")
    assert fake.encoded == ["ab", "cd", "ef"]
    prompt.encode("cd")
    assert fake.encoded == ["ab", "cd", "ef", "cd"]


async def test_request_blocks_and_indexes_per_model() -> None:
    held = ReplicaBlocks(max_blocks=100)
    held.apply(events(0))
    replica = Replica("http://127.0.0.1:1", "cpu", 4, 4, Circuit(2, 10))
    text = "".join(map(chr, TENANT0))  # with `Tokenizer`, these characters are TENANT0
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": text}]})
    async with aiohttp.ClientSession() as session:
        index = KVEventIndex([replica], session, tokenizer=PromptTokenizer(Tokenizer()),
                             max_blocks=100, timeout_s=1)
        assert index.request_blocks(chat) == []  # no block size before the first event
        index._blocks[replica] = [held]
        assert index.matched(index.request_blocks(chat)) == {replica.url: 4}
        assert index.matched(index.request_blocks(chat, adapter="support-v2")) == {}

        pool = PoolConfig(device="cpu", urls=["http://127.0.0.1:1"])
        models = [ModelConfig(name="chat", kind="chat", pools=[pool])]
        assert build_kv_event_indexes(models, {"chat": [replica]}, session,
                                      RoutingConfig()) == {}


def test_precise_mode_needs_the_weights_to_tokenize_with() -> None:
    pool = PoolConfig(device="cpu", urls=["http://127.0.0.1:1"])
    chat = ModelConfig(name="chat", kind="chat", pools=[pool])
    precise = RoutingConfig(prefix_mode="precise")
    with pytest.raises(ValueError, match="weights"):
        Settings(models=[chat], routing=precise)
    Settings(models=[chat.model_copy(update={"weights": "/models/chat"})], routing=precise)


# The subscriber, against a publisher with vLLM's sockets: PUB frames (topic, seq, payload)
# and a ROUTER answering (start seq) with buffered frames and an end marker.


class Publisher:
    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes = b"kv") -> None:
        self.pub = ctx.socket(zmq.XPUB)  # a PUB that tells when a subscriber joined
        self.replay = ctx.socket(zmq.ROUTER)
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.replay_port = self.replay.bind_to_random_port("tcp://127.0.0.1")
        self.topic = topic
        self.buffer: list[tuple[int, bytes]] = []
        self.replays = 0
        self._task = asyncio.create_task(self._serve_replays())

    async def subscribed(self) -> None:
        assert (await self.pub.recv()) == b"\x01" + self.topic

    async def publish(self, seq: int, payload: bytes, *, send: bool = True) -> None:
        self.buffer.append((seq, payload))
        if send:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])

    async def _serve_replays(self) -> None:
        while True:
            client, _, start = await self.replay.recv_multipart()
            self.replays += 1
            for seq, payload in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    await self.replay.send_multipart(
                        [client, b"", self.topic, seq.to_bytes(8, "big"), payload])
            await self.replay.send_multipart(
                [client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    async def close(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task
        self.pub.close(linger=0)
        self.replay.close(linger=0)


async def wait_until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def publisher() -> AsyncIterator[Publisher]:
    ctx = zmq.asyncio.Context()
    pub = Publisher(ctx)
    yield pub
    await pub.close()
    ctx.destroy(linger=0)


@pytest.fixture
async def engine_url(publisher: Publisher) -> AsyncIterator[str]:
    """vLLM's /kv_event_sources, as the engine answers it: the addresses it bound."""
    async def sources(_: web.Request) -> web.Response:
        return web.json_response({"0": {
            "enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
            "endpoint": f"tcp://*:{publisher.port}",
            "replay_endpoint": f"tcp://*:{publisher.replay_port}"}})

    app = web.Application()
    app.router.add_get("/kv_event_sources", sources)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_discovery_points_at_the_replicas_host(engine_url: str,
                                                     publisher: Publisher) -> None:
    async with aiohttp.ClientSession() as session:
        [source] = await discover_sources(session, engine_url, timeout_s=2)
    assert source.endpoint == f"tcp://127.0.0.1:{publisher.port}"
    assert source.replay_endpoint == f"tcp://127.0.0.1:{publisher.replay_port}"
    assert source.topic == "kv"


async def test_subscriber_catches_up_fills_gaps_and_sees_restarts(
    engine_url: str, publisher: Publisher
) -> None:
    replica = Replica(engine_url, "cpu", 4, 4, Circuit(2, 10))
    for seq in range(3):  # cached before the gateway listened: only the replay has them
        await publisher.publish(seq, PAYLOADS[seq], send=False)
    async with aiohttp.ClientSession() as session:
        index = KVEventIndex([replica], session, max_blocks=1000, timeout_s=2, retry_s=0.1)
        await index.start()
        try:
            def held(i: int) -> int:
                return index.matched(index.blocks_of(stored_tokens(i))).get(replica.url, 0)

            await wait_until(lambda: held(2) == 4)
            assert held(0) == held(1) == 4 and index.block_size == BS
            assert index.matched(index.blocks_of(TENANT0)) == {replica.url: 4}

            await asyncio.wait_for(publisher.subscribed(), 10)
            await publisher.publish(3, PAYLOADS[3])
            await wait_until(lambda: held(3) == 4)
            assert publisher.replays == 1

            replays = publisher.replays
            await publisher.publish(4, PAYLOADS[4], send=False)  # lost on the way
            await publisher.publish(5, PAYLOADS[5])  # the gap is noticed and replayed
            await wait_until(lambda: held(5) == 4)
            assert held(4) == 4 and held(0) == 0 and publisher.replays == replays + 1

            await publisher.publish(6, b"\xc1")  # unreadable: what it said is unknown
            await publisher.publish(7, PAYLOADS[6])
            await wait_until(lambda: held(6) == 4)
            assert held(5) == 0

            # The engine restarts: an empty cache, sequence numbers from 0 again.
            publisher.buffer = []
            await publisher.publish(0, PAYLOADS[1])
            await wait_until(lambda: held(6) == 0)
            assert held(1) == 4 and held(3) == 0
        finally:
            await index.stop()
