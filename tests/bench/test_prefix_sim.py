"""The simulator's prefix cache and the chat trace it replays: hits skip their prefill, the
cache is bounded and evicts what no request holds, turns share their history's blocks, and the
gateway's prefix-aware router keeps prefixes where they are cached."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.chat_trace import ChatWorkload
from bench.prefix_policy import SimGatewayPrefix, token_route
from bench.prefix_sim import hit_ratio, requests
from bench.routing_sim import (
    EngineProfile,
    LeastLoaded,
    PrefixCache,
    Request,
    RoundRobin,
    simulate,
)

PROFILE = EngineProfile(step_s=0.010, seq_s=0.001, prefill_token_s=0.0001, overhead_s=0.002,
                        kv_tokens=4096, prefix_caching=True, block_size=16)


def test_a_cached_prefix_skips_its_prefill() -> None:
    blocks = tuple(range(31))  # 500 tokens: 31 full blocks
    trace = [Request(0, 0.0, 500, 1, None, blocks), Request(1, 1.0, 500, 1, None, blocks)]
    cold, warm = simulate(trace, PROFILE, 1, LeastLoaded(1, 0)).requests
    assert cold.cached == 0
    assert warm.cached == 31 * 16
    assert cold.ttft - warm.ttft == pytest.approx(31 * 16 * 0.0001)


def test_the_last_prompt_token_is_always_computed() -> None:
    blocks = tuple(range(4))  # 64 tokens: all four blocks full
    trace = [Request(0, 0.0, 64, 1, None, blocks), Request(1, 1.0, 64, 1, None, blocks)]
    _, warm = simulate(trace, PROFILE, 1, LeastLoaded(1, 0)).requests
    assert warm.cached == 48  # as vLLM: a full hit would leave nothing to compute


def test_the_cache_evicts_blocks_no_request_holds_least_recently_freed_first() -> None:
    cache = PrefixCache(capacity=4)
    assert cache.admit((1, 2), 0, 2)
    cache.release((1, 2), 2)
    assert cache.hit((1, 2), 2) == 2
    assert cache.admit((3, 4), 0, 3)  # needs one of the two free blocks: the tail goes
    assert cache.hit((1, 2), 2) == 1
    assert not cache.admit((5, 6), 0, 2)  # three held, one free: two do not fit
    assert cache.used == 3


def test_turns_of_a_conversation_share_their_history() -> None:
    w = ChatWorkload(rate=1.0, conversations=3, tenants=2, turns=(3, 3), seed=1)
    trace = w.trace(range(1000, 2000))
    by_conversation = sorted(trace, key=lambda t: (t.conversation, t.arrival))
    first, second = by_conversation[0], by_conversation[1]
    assert second.prompt_ids()[:len(first.prompt_ids())] == first.prompt_ids()
    a, b = first.blocks(16), second.blocks(16)
    assert b[:len(a)] == a


def test_prefix_caching_cuts_ttft_on_a_chat_trace() -> None:
    w = ChatWorkload(rate=0.5, conversations=20, tenants=2, seed=2)
    reqs = requests(w.trace(range(1000, 40000)), 16)
    cold = EngineProfile(step_s=0.010, seq_s=0.001, prefill_token_s=0.0002, kv_tokens=65536)
    warm = simulate(reqs, replace(cold, prefix_caching=True, block_size=16), 1,
                    LeastLoaded(1, 0))
    plain = simulate(reqs, cold, 1, LeastLoaded(1, 0))
    assert hit_ratio(warm) > 0.5 and hit_ratio(plain) == 0
    assert warm.ttft(0.5) < plain.ttft(0.5) / 2


def test_the_gateways_prefix_routing_keeps_prefixes_where_they_are_cached() -> None:
    w = ChatWorkload(rate=0.3, conversations=40, tenants=8, seed=3)
    reqs = requests(w.trace(range(1000, 40000)), 16, token_route())
    small = EngineProfile(step_s=0.010, seq_s=0.001, prefill_token_s=0.0002, kv_tokens=8192,
                          prefix_caching=True, block_size=16)
    gateway = SimGatewayPrefix(2, 0)
    aware = simulate(reqs, small, 2, gateway)
    blind = simulate(reqs, small, 2, RoundRobin(2, 0))
    assert hit_ratio(aware) > hit_ratio(blind) + 0.1
    assert {r.replica for r in aware.requests} == {0, 1}  # tenants spread over both
    assert all(r.outstanding == 0 for r in gateway.replicas)
