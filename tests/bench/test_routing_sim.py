"""The routing simulator's basics: step costs, KV and LoRA limits, conservation, and the real
gateway picker driven as one of its policies."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.routing_sim import (
    POLICIES,
    BoundedHash,
    EngineProfile,
    GatewayAffine,
    GatewayPicker,
    LeastLoaded,
    Request,
    RoundRobin,
    Workload,
    simulate,
)

PROFILE = EngineProfile(step_s=0.010, seq_s=0.001, prefill_token_s=0.0001, adapter_load_s=0.05,
                        overhead_s=0.002, kv_tokens=4096, max_loras=2, max_cpu_loras=2)


def test_a_lone_request_waits_only_for_its_prefill() -> None:
    [r] = simulate([Request(0, 1.0, 500, 10, None)], PROFILE, 1, LeastLoaded(1, 0)).requests
    assert r.ttft == pytest.approx(0.010 + 0.001 + 500 * 0.0001 + 0.002)
    # then one decode step per further token, with one sequence in the batch
    assert r.finished - r.first_token + 0.002 == pytest.approx(9 * 0.011)


def test_a_cold_adapter_pays_its_load_once() -> None:
    trace = [Request(0, 0.0, 100, 1, "a"), Request(1, 1.0, 100, 1, "a")]
    cold, warm = simulate(trace, PROFILE, 1, LeastLoaded(1, 0)).requests
    assert cold.loaded and not warm.loaded
    assert cold.ttft - warm.ttft == pytest.approx(0.05)


def test_full_kv_cache_makes_requests_wait() -> None:
    trace = [Request(0, 0.0, 2000, 50, None), Request(1, 0.0, 2000, 50, None)]
    first, second = simulate(trace, PROFILE, 1, LeastLoaded(1, 0)).requests
    assert second.first_token > first.finished  # 2 x 2,050 tokens do not fit in 4,096


def test_a_batch_holds_at_most_max_loras_adapters() -> None:
    trace = [Request(i, 0.0, 10, 20, f"a{i}") for i in range(3)]
    a0, a1, a2 = simulate(trace, PROFILE, 1, LeastLoaded(1, 0)).requests
    assert a1.first_token < a0.finished  # two adapters share the batch
    assert a2.first_token > a0.finished  # the third waits for a slot


def test_every_request_finishes_under_every_policy() -> None:
    w = Workload(rate=40.0, requests=600, adapters=300)
    names = frozenset(w.adapter_names())
    for name, factory in POLICIES.items():
        result = simulate(w.trace(), PROFILE, 8, factory(8, 0, names))
        assert all(r.generated == r.output and r.finished >= r.first_token
                   for r in result.requests), name
        assert len({r.rid for r in result.requests}) == 600


def test_affinity_loads_fewer_adapters_than_round_robin() -> None:
    w = Workload(rate=40.0, requests=1500, adapters=400)
    trace = w.trace()
    affine = simulate(trace, PROFILE, 8, BoundedHash(8, 0)).loads
    spread = simulate(trace, PROFILE, 8, RoundRobin(8, 0)).loads
    assert affine < 0.8 * spread


def test_the_gateway_picker_is_the_real_router() -> None:
    w = Workload(rate=40.0, requests=400, adapters=50)
    picker = GatewayPicker(4, 0, frozenset(w.adapter_names()))
    result = simulate(w.trace(), PROFILE, 4, picker)
    assert {r.replica for r in result.requests} == {0, 1, 2, 3}
    assert all(r.outstanding == 0 for r in picker.replicas)  # every acquire was released


def test_an_affinity_filter_in_the_real_router_cuts_adapter_loads() -> None:
    w = Workload(rate=20.0, requests=1000, adapters=200)
    names = frozenset(w.adapter_names())
    profile = replace(PROFILE, max_cpu_loras=16)
    plain = simulate(w.trace(), profile, 8, GatewayPicker(8, 0, names)).loads
    affine = simulate(w.trace(), profile, 8, GatewayAffine(8, 0, names, cache=16)).loads
    assert affine < 0.7 * plain
