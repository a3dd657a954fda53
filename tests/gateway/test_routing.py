"""Routing policy: pool order, least-loaded choice, adapter affinity, circuit breaking."""

from __future__ import annotations

import random

from gateway.inference.protocol import ChatCompletionRequest
from gateway.routing import (
    Circuit,
    CircuitState,
    Pool,
    Replica,
    Router,
    build_affinity,
    build_scorers,
)
from gateway.routing.health import EngineLoad, HealthMonitor, parse_vllm_metrics
from gateway.routing.policy import (
    RouteRequest,
    WeightedScorer,
    kv_cache_score,
    outstanding_score,
    per_replica,
    queue_score,
)
from llmops.catalog import Catalog
from llmops.settings import ModelConfig, PoolConfig, RoutingConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replica(url: str, device: str = "cpu", *, clock: Clock | None = None,
            max_concurrency: int = 4, **state: object) -> Replica:
    circuit = Circuit(threshold=2, cooldown_s=10, clock=clock or Clock())
    r = Replica(url, device, max_concurrency=max_concurrency, max_waiting=4, circuit=circuit)
    for k, v in state.items():
        setattr(r, k, v)
    return r


def router(*pools: Pool) -> Router:
    return Router(pools, build_scorers(RoutingConfig()), rng=random.Random(0))


ANY = RouteRequest()


def test_highest_priority_pool_wins() -> None:
    gpu = Pool("gpu", 10, [replica("g1", "gpu")])
    cpu = Pool("cpu", 0, [replica("c1")])
    assert router(cpu, gpu).choose(ANY) is gpu.replicas[0]


def test_falls_back_when_the_gpu_pool_is_down() -> None:
    gpu = Pool("gpu", 10, [replica("g1", "gpu", healthy=False), replica("g2", "gpu",
                                                                      healthy=False)])
    cpu = Pool("cpu", 0, [replica("c1")])
    assert router(gpu, cpu).choose(ANY) is cpu.replicas[0]


def test_falls_back_when_the_gpu_pool_is_saturated() -> None:
    gpu = Pool("gpu", 10, [replica("g1", "gpu", outstanding=4)])
    cpu = Pool("cpu", 0, [replica("c1")])
    assert router(gpu, cpu).choose(ANY) is cpu.replicas[0]
    # vLLM's own queue counts too: a replica with a long queue is full.
    gpu.replicas[0].outstanding, gpu.replicas[0].waiting = 0, 9
    assert router(gpu, cpu).choose(ANY) is cpu.replicas[0]


def test_everything_full_queues_at_the_highest_priority_pool() -> None:
    gpu = Pool("gpu", 10, [replica("g1", "gpu", outstanding=4)])
    cpu = Pool("cpu", 0, [replica("c1", outstanding=4)])
    assert router(gpu, cpu).choose(ANY) is gpu.replicas[0]


def test_nothing_available_returns_none() -> None:
    pool = Pool("cpu", 0, [replica("c1", healthy=False)])
    assert router(pool).choose(ANY) is None


def test_least_loaded_replica_is_picked() -> None:
    busy, idle = replica("busy", outstanding=3), replica("idle", outstanding=1)
    assert router(Pool("cpu", 0, [busy, idle])).choose(ANY) is idle


def test_vllm_queue_and_kv_cache_refine_the_choice() -> None:
    queued = replica("queued", waiting=3)
    full_cache = replica("full", kv_cache_usage=0.95)
    fresh = replica("fresh")
    assert router(Pool("cpu", 0, [queued, full_cache, fresh])).choose(ANY) is fresh
    # With equal local load, the shorter vLLM queue wins over a fuller cache.
    assert router(Pool("cpu", 0, [queued, full_cache])).choose(ANY) is full_cache


def test_ties_spread_over_equal_replicas() -> None:
    replicas = [replica(f"r{i}") for i in range(3)]
    r = router(Pool("cpu", 0, replicas))
    assert {r.choose(ANY).url for _ in range(50)} == {"r0", "r1", "r2"}  # type: ignore[union-attr]


def test_excluded_replicas_are_skipped() -> None:
    a, b = replica("a"), replica("b", outstanding=3)
    assert router(Pool("cpu", 0, [a, b])).choose(RouteRequest(exclude=frozenset({id(a)}))) is b


def test_adapter_requests_go_where_the_adapter_is_loaded() -> None:
    plain = replica("plain")
    loaded = replica("loaded", outstanding=3, adapters=frozenset({"ft:base:x:1"}))
    r = router(Pool("cpu", 0, [plain, loaded]))
    assert r.choose(RouteRequest(adapter="ft:base:x:1")) is loaded
    assert r.choose(RouteRequest(adapter="ft:base:other:2")) is None


def test_scorers_stay_in_unit_range() -> None:
    r = replica("r", outstanding=99, waiting=99, kv_cache_usage=1.7)
    for score in (outstanding_score, queue_score, kv_cache_score):
        assert 0.0 <= score(ANY, r) <= 1.0
    assert outstanding_score(ANY, replica("idle")) == 1.0


def test_a_scorer_sees_the_request_it_routes() -> None:
    a, b = replica("a"), replica("b")

    def by_user(request: RouteRequest, candidate: Replica) -> float:
        user = request.request.user if request.request is not None else None
        return 1.0 if (candidate is a) == (user == "alice") else 0.0

    r = Router([Pool("cpu", 0, [a, b])], [WeightedScorer("user", per_replica(by_user), 1.0)])
    for user, expected in (("alice", a), ("bob", b)):
        body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                     user=user)
        assert r.choose(RouteRequest(request=body)) is expected


def test_circuit_opens_after_consecutive_failures_and_closes_after_a_good_trial() -> None:
    clock = Clock()
    c = Circuit(threshold=2, cooldown_s=10, clock=clock)
    c.record_failure()
    assert c.state is CircuitState.CLOSED and c.admits()
    c.record_failure()
    assert c.state is CircuitState.OPEN and not c.admits()
    clock.now = 10.0
    assert c.state is CircuitState.HALF_OPEN and c.admits()
    c.on_dispatch()
    assert not c.admits()  # one trial at a time
    c.record_success()
    assert c.state is CircuitState.CLOSED and c.admits()


def test_failed_trial_reopens_the_circuit() -> None:
    clock = Clock()
    c = Circuit(threshold=3, cooldown_s=5, clock=clock)
    c.trip()
    assert c.state is CircuitState.OPEN
    clock.now = 5.0
    c.on_dispatch()
    c.record_failure()
    assert c.state is CircuitState.OPEN
    clock.now = 9.0
    assert not c.admits()
    clock.now = 10.0
    assert c.admits()


def test_success_resets_the_failure_count() -> None:
    c = Circuit(threshold=2, cooldown_s=5, clock=Clock())
    c.record_failure()
    c.record_success()
    c.record_failure()
    assert c.state is CircuitState.CLOSED


def test_open_circuit_takes_a_replica_out_of_rotation() -> None:
    clock = Clock()
    bad, good = replica("bad", clock=clock), replica("good", clock=clock, outstanding=3)
    r = router(Pool("cpu", 0, [bad, good]))
    bad.acquire()
    bad.release(ok=False)
    bad.acquire()
    bad.release(ok=False)
    assert r.choose(ANY) is good
    clock.now = 11.0
    assert r.choose(ANY) is bad  # half-open: the idle replica gets its trial
    assert bad.outstanding == 0


def test_parse_vllm_metrics() -> None:
    text = """# HELP vllm:num_requests_waiting Number of requests waiting.
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:num_requests_running{engine="0",model_name="m"} 4.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
"""
    assert parse_vllm_metrics(text) == EngineLoad(waiting=5.0, kv_cache_usage=0.5, running=5.0)


def affine_router(pool: Pool, keep: int = 2, slack: int = 2) -> Router:
    config = RoutingConfig(adapter_affinity=keep, affinity_slack=slack)
    return Router([pool], build_scorers(config), rng=random.Random(0),
                  affinity=build_affinity(config))


def test_an_adapters_requests_go_where_it_was_sent_lately() -> None:
    pool = Pool("gpu", 0, [replica(f"g{i}", "gpu", max_concurrency=64,
                                   adapters=frozenset({"a", "b"})) for i in range(4)])
    r = affine_router(pool)
    first = r.choose(RouteRequest("a"))
    assert first is not None
    first.acquire()  # now the busiest: least-loaded alone would go elsewhere
    assert r.choose(RouteRequest("a")) is first
    assert r.choose(RouteRequest("b")) is not first  # another adapter spreads out


def test_affinity_yields_to_load_beyond_the_slack_and_forgets_old_adapters() -> None:
    pool = Pool("gpu", 0, [replica(f"g{i}", "gpu", max_concurrency=64,
                                   adapters=frozenset("abc")) for i in range(2)])
    r = affine_router(pool, keep=2, slack=2)
    home = r.choose(RouteRequest("a"))
    assert home is not None
    home.outstanding = 3  # three more than the other replica: over the slack
    assert r.choose(RouteRequest("a")) is not home
    home.outstanding = 0
    for adapter in ("b", "c"):  # two newer adapters sent there push "a" out
        home.sent_adapter(adapter, keep=2)
    assert "a" not in home.recent_adapters and list(home.recent_adapters) == ["b", "c"]


def test_affinity_is_off_at_zero() -> None:
    assert build_affinity(RoutingConfig(adapter_affinity=0)) is None


async def test_an_adapter_loaded_during_discovery_is_not_forgotten() -> None:
    """The adapter loader adds an adapter while a `/v1/models` listing that predates it is
    on its way back: the stale listing must not take it away (requests would get 503)."""
    config = ModelConfig(name="m", kind="chat", pools=[PoolConfig(device="cpu", urls=["http://u"])])
    pool = Pool.from_config(config.pools[0], RoutingConfig())
    routers = {"m": Router([pool], build_scorers(RoutingConfig()))}
    catalog = Catalog([config])
    (served,) = pool.replicas
    served.adapters = frozenset({"old"})

    class Racing(HealthMonitor):
        async def _adapters_of(self, replica: Replica, parent: str) -> frozenset[str] | None:
            replica.adapters = replica.adapters | {"new"}  # the loader, meanwhile
            return frozenset({"old"})  # listed before "new" was loaded

    monitor = Racing(None, routers, catalog, RoutingConfig())  # type: ignore[arg-type]
    await monitor.discover_adapters()
    assert served.adapters == {"old", "new"}
    assert catalog.resolve("new") is not None
