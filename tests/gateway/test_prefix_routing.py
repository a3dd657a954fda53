"""Prefix- and session-aware routing: the prompt's hash chain, the bounded prefix index,
consistent hashing with bounded loads, the scorers, and the reason given for each choice."""

from __future__ import annotations

import random
from typing import Any

from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest
from gateway.routing import (
    Circuit,
    Pool,
    PrefixIndex,
    Replica,
    Router,
    build_affinity,
    build_prefixes,
    build_scorers,
    prefix_blocks,
)
from gateway.routing.hashing import bounded_home
from gateway.routing.policy import RouteRequest
from llmops.settings import RoutingConfig

BLOCK = 32
SYSTEM = "You are a careful assistant for a travel agency. " * 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chat(*contents: str, tools: list[dict[str, Any]] | None = None) -> ChatCompletionRequest:
    """A system prompt, then user and assistant turns."""
    roles = ["system"] + ["user", "assistant"] * len(contents)
    return ChatCompletionRequest(model="m", tools=tools, messages=[
        {"role": role, "content": c} for role, c in zip(roles, contents, strict=False)])


def replica(url: str, **state: object) -> Replica:
    r = Replica(url, "cpu", max_concurrency=64, max_waiting=16,
                circuit=Circuit(threshold=2, cooldown_s=10, clock=Clock()))
    for k, v in state.items():
        setattr(r, k, v)
    return r


def make_router(replicas: list[Replica], seed: int = 0, **config: Any) -> Router:
    routing = RoutingConfig(prefix_block_chars=BLOCK, **config)
    return Router([Pool("cpu", 0, replicas)], build_scorers(routing), rng=random.Random(seed),
                  affinity=build_affinity(routing), prefixes=build_prefixes(routing))


def route(r: Router, body: ChatCompletionRequest | None = None, session: str | None = None,
          adapter: str | None = None) -> tuple[Replica, str]:
    blocks = prefix_blocks(body, BLOCK) if body is not None else ()
    decision = r.decide(RouteRequest(adapter, request=body, session=session, blocks=blocks))
    assert decision is not None
    return decision.replica, decision.reason


# The hash chain


def test_equal_prefixes_hash_alike_and_diverge_from_the_first_differing_block() -> None:
    first = prefix_blocks(chat(SYSTEM, "Book me a flight to Lisbon."), BLOCK)
    grown = prefix_blocks(chat(SYSTEM, "Book me a flight to Lisbon.", "Done: TP 123.",
                               "And a hotel?"), BLOCK)
    assert len(first) == len(SYSTEM) // BLOCK + 1 and len(grown) > len(first)
    assert grown[:len(first)] == first  # the resent history is a cached prefix
    other = prefix_blocks(chat(SYSTEM[:100] + "X" + SYSTEM[101:], "Book me a flight."), BLOCK)
    differs = 100 // BLOCK  # the block holding the changed character, and all after it
    assert other[:differs] == first[:differs]
    assert all(a != b for a, b in zip(other[differs:], first[differs:], strict=False))


def test_the_rendering_is_canonical_and_covers_roles_tools_and_whole_blocks_only() -> None:
    spaced = ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [ {"content": "' + SYSTEM + '", "role": "system"} ]}')
    assert prefix_blocks(spaced, BLOCK) == prefix_blocks(chat(SYSTEM), BLOCK)
    as_user = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": SYSTEM}])
    assert prefix_blocks(as_user, BLOCK)[0] != prefix_blocks(chat(SYSTEM), BLOCK)[0]
    tool = {"type": "function", "function": {"name": "book", "parameters": {}}}
    assert prefix_blocks(chat(SYSTEM, tools=[tool]), BLOCK)[0] \
        != prefix_blocks(chat(SYSTEM), BLOCK)[0]
    assert prefix_blocks(chat("short"), BLOCK) == ()  # no whole block: nothing to route by
    prompt = CompletionRequest(model="m", prompt=SYSTEM)
    assert len(prefix_blocks(prompt, BLOCK)) == len(SYSTEM) // BLOCK
    assert prefix_blocks(None, BLOCK) == ()


# The prefix index


def test_the_index_matches_leading_blocks_per_replica() -> None:
    index = PrefixIndex(max_blocks=100, ttl_s=60, clock=Clock())
    index.record("a", [1, 2, 3, 4])
    index.record("b", [1, 2, 9])
    assert index.matched([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert index.matched([1, 2, 9]) == {"a": 2, "b": 3}
    assert index.matched([7, 2, 3]) == {}  # a chain: no later block counts without the first


def test_the_index_forgets_the_least_recently_sent_blocks_beyond_its_bound() -> None:
    index = PrefixIndex(max_blocks=4, ttl_s=60, clock=Clock())
    index.record("a", [1, 2])
    index.record("b", [3, 4])
    index.record("a", [1, 2])  # sent again: the most recent now
    index.record("c", [5, 6])
    assert len(index) == 4
    assert index.matched([3, 4]) == {}
    assert index.matched([1, 2]) == {"a": 2} and index.matched([5, 6]) == {"c": 2}


def test_a_claim_lapses_after_the_ttl_unless_sent_again() -> None:
    clock = Clock()
    index = PrefixIndex(max_blocks=100, ttl_s=60, clock=clock)
    index.record("a", [1, 2])
    index.record("b", [1])
    clock.now = 50
    index.record("b", [1, 2])
    clock.now = 61
    assert index.matched([1, 2]) == {"b": 2}
    clock.now = 111
    assert index.matched([1, 2]) == {}


# Consistent hashing with bounded loads


def test_a_key_has_a_stable_home_that_spreads_keys_and_moves_off_an_overloaded_replica() -> None:
    replicas = [replica(f"http://r{i}:8000") for i in range(4)]
    homes = {key: bounded_home(key.encode(), replicas, 1.25, 0) for key in map(str, range(200))}
    assert homes == {key: bounded_home(key.encode(), list(reversed(replicas)), 1.25, 0)
                     for key in homes}  # the order of the replicas does not matter
    counts = [sum(h is r for h in homes.values()) for r in replicas]
    assert min(counts) > 30, counts
    key = "7"
    home = homes[key]
    assert home is not None
    home.outstanding = 3  # bound: ceil(1.25 * 4 / 4) = 2 < 3 + 1
    assert bounded_home(key.encode(), replicas, 1.25, 0) is not home
    assert bounded_home(key.encode(), replicas, 1.25, 4) is home  # a floor of 4 in flight
    home.outstanding = 1  # bound: ceil(1.25 * 2 / 4) = 1 < 1 + 1
    assert bounded_home(key.encode(), replicas, 1.25, 0) is not home
    assert bounded_home(key.encode(), replicas, 1.25, 2) is home


def test_removing_a_replica_moves_only_its_keys() -> None:
    replicas = [replica(f"http://r{i}:8000") for i in range(4)]
    before = {k: bounded_home(k.encode(), replicas, 1.25, 0) for k in map(str, range(200))}
    after = {k: bounded_home(k.encode(), replicas[:3], 1.25, 0) for k in before}
    assert all(after[k] is before[k] for k in before if before[k] is not replicas[3])


# Scorers and decisions


def test_a_session_stays_on_its_home_and_two_routers_agree_on_it() -> None:
    urls = ["http://a:8000", "http://b:8000", "http://c:8000"]
    one = make_router([replica(u) for u in urls], seed=1)
    two = make_router([replica(u) for u in reversed(urls)], seed=2)
    for session in ("alice", "bob", "carol", "dave"):
        chosen = {route(one, session=session)[0].url for _ in range(5)}
        assert chosen == {route(two, session=session)[0].url}
        assert route(one, session=session)[1] == "session"


def test_a_session_leaves_its_home_while_it_is_overloaded() -> None:
    replicas = [replica("http://a:8000"), replica("http://b:8000")]
    r = make_router(replicas)
    home, _ = route(r, session="alice")
    home.outstanding = 6  # bound: ceil(1.25 * 7 / 2) = 5, over the floor of 4
    assert route(r, session="alice")[0] is not home
    home.outstanding = 0
    assert route(r, session="alice")[0] is home


def test_a_growing_conversation_stays_where_its_prefix_was_sent() -> None:
    replicas = [replica("http://a:8000"), replica("http://b:8000")]
    r = make_router(replicas)
    history = [SYSTEM, "Book me a flight to Lisbon."]
    first, reason = route(r, chat(*history))
    assert reason == "prefix"  # its first block's home: no gateway has seen it yet
    for turn in range(4):
        history += [f"Answer {turn}.", f"Question {turn}?"]
        assert route(r, chat(*history)) == (first, "prefix")


def test_two_routers_that_never_saw_a_prefix_send_it_to_the_same_replica() -> None:
    urls = ["http://a:8000", "http://b:8000", "http://c:8000"]
    one = make_router([replica(u) for u in urls], seed=1)
    two = make_router([replica(u) for u in urls], seed=2)
    for tenant in range(6):
        body = chat(f"Tenant {tenant}: " + SYSTEM, "Hello.")
        assert route(one, body)[0].url == route(two, body)[0].url


def test_different_prefixes_spread_over_the_replicas() -> None:
    replicas = [replica(f"http://r{i}:8000") for i in range(3)]
    r = make_router(replicas)
    served = {route(r, chat(f"Tenant {t}: " + SYSTEM, "Hello."))[0].url for t in range(12)}
    assert served == {x.url for x in replicas}


def test_a_busy_replica_loses_its_hot_prefix_to_an_idle_one() -> None:
    replicas = [replica("http://a:8000"), replica("http://b:8000")]
    r = make_router(replicas)
    body = chat(SYSTEM, "Book me a flight to Lisbon.")
    home, _ = route(r, body)
    home.outstanding = 4  # bound: max(ceil(1.25 * 5 / 2), 4) = 4 < 4 + 1
    other, _ = route(r, body)
    assert other is not home
    grown = chat(SYSTEM, "Book me a flight to Lisbon.", "Done.", "Thanks!")
    assert route(r, grown) == (other, "prefix")  # while its home is busy, a hit there


def test_the_prefix_weight_trades_cache_hits_against_load() -> None:
    a, b = replica("http://a:8000"), replica("http://b:8000")
    body = chat(SYSTEM, "Book me a flight to Lisbon.")
    strong = make_router([a, b], weight_prefix=2.0, load_factor=100.0)
    home, _ = route(strong, body)
    home.outstanding = 20  # within the (loose) bound; the outstanding scorer: 1 - 20/64
    assert route(strong, body)[0] is home  # 2 x prefix share outweighs the load difference
    weak = make_router([a, b], weight_prefix=0.2, load_factor=100.0)
    weak.prefixes.record(home.url, prefix_blocks(body, BLOCK))  # type: ignore[union-attr]
    assert route(weak, body)[0] is not home


def test_without_a_session_or_a_long_prompt_the_reason_is_load() -> None:
    idle, busy = replica("http://a:8000"), replica("http://b:8000", outstanding=3)
    r = make_router([idle, busy])
    assert route(r, chat("short")) == (idle, "load")


def test_adapter_and_fallback_reasons() -> None:
    routing = RoutingConfig(prefix_block_chars=BLOCK)
    gpu = Pool("gpu", 10, [replica("http://g:8000", healthy=False)])
    cpu = Pool("cpu", 0, [replica("http://c:8000", adapters=frozenset({"ft"}))])
    r = Router([gpu, cpu], build_scorers(routing), affinity=build_affinity(routing),
               prefixes=build_prefixes(routing))
    assert route(r, chat(SYSTEM))[1] == "fallback"
    a, b = (replica(u, adapters=frozenset({"ft"})) for u in ("http://a:8000", "http://b:8000"))
    r = make_router([a, b])
    first, _ = route(r, adapter="ft")
    assert route(r, adapter="ft") == (first, "adapter")


def test_the_prefix_scorer_is_off_with_a_zero_weight() -> None:
    r = make_router([replica("http://a:8000")], weight_prefix=0.0)
    assert r.prefixes is None
    assert [s.name for s in r.scorers] == ["outstanding", "queue", "kv_cache", "session"]
