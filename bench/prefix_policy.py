"""The gateway's prefix-aware `Router` as the prefix benchmarks drive it: live in front of real
engines (`bench.prefix_routing`) and in the simulator (`bench.prefix_sim`). Both build it as
the gateway does for one model: `build_scorers(RoutingConfig())` (the prefix and session
scorers among the load scorers) and a `PrefixIndex`, and tell it what the gateway would know:
its own outstanding counts, vLLM's waiting queue and KV use as scraped, and each prompt."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from bench.chat_trace import Render, Turn
from bench.routing_sim import GatewayPicker, Request, SimReplica
from gateway.inference.protocol import ChatCompletionRequest
from gateway.routing import Pool, Router, build_affinity, build_scorers
from gateway.routing.circuit import Circuit
from gateway.routing.health import parse_vllm_metrics
from gateway.routing.policy import RouteRequest
from gateway.routing.prefix import PrefixIndex, prefix_blocks
from llmops.cli.stack import CHAT_MODEL
from llmops.settings import PoolConfig, RoutingConfig

__all__ = ["GatewayPrefix", "SimGatewayPrefix", "text_route", "token_route"]

NAME = "llmops prefix-aware"


def _urls(n: int) -> list[str]:
    """The replicas' names as the router sees them (homes are hashed from them), the same live
    and simulated so that both send a prefix to the same replica."""
    return [f"http://replica-{i}" for i in range(n)]


def text_route(render: Render, config: RoutingConfig | None = None) -> Callable[
        [Turn], RouteRequest]:
    """What the gateway hashes of a turn: its chat request's prompt, in character blocks."""
    block_chars = (config or RoutingConfig()).prefix_block_chars

    def route(turn: Turn) -> RouteRequest:
        body = ChatCompletionRequest.model_validate(
            {"model": CHAT_MODEL, "messages": turn.chat(render), "max_tokens": turn.output})
        return RouteRequest(request=body, blocks=prefix_blocks(body, block_chars))

    return route


def token_route(block_tokens: int = 64) -> Callable[[Turn], RouteRequest]:
    """The same chain over token blocks, for traces without text: 64 tokens stand for the
    gateway's 256 characters of English."""
    return lambda turn: RouteRequest(blocks=turn.blocks(block_tokens))


def _router(urls: Sequence[str], rng: random.Random,
            clock: Callable[[], float] | None = None) -> tuple[Router, Pool]:
    config = RoutingConfig()
    pool = Pool.from_config(PoolConfig(device="cpu", urls=list(urls)), config)
    index = (PrefixIndex(config.prefix_index_blocks, config.prefix_ttl_s) if clock is None
             else PrefixIndex(config.prefix_index_blocks, config.prefix_ttl_s, clock=clock))
    router = Router([pool], build_scorers(config), rng=rng, affinity=build_affinity(config),
                    prefixes=index)
    return router, pool


class GatewayPrefix:
    """Live: routes each turn of the trace to one of `n` engines."""

    name = NAME

    def __init__(self, n: int, render: Render, seed: int = 0) -> None:
        self.router, pool = _router(_urls(n), random.Random(seed))
        self.replicas = pool.replicas
        self.route = text_route(render)

    def choose(self, turn: Turn) -> int:
        chosen = self.router.choose(self.route(turn))
        if chosen is None:
            raise RuntimeError("the gateway found no replica")
        chosen.acquire()
        return self.replicas.index(chosen)

    def finished(self, replica: int) -> None:
        self.replicas[replica].release(ok=True)

    def scraped(self, replica: int, metrics: str) -> None:
        r = self.replicas[replica]
        r.waiting, r.kv_cache_usage, _ = parse_vllm_metrics(metrics)


class SimGatewayPrefix(GatewayPicker):
    """Simulated: the same router on simulated time; each request carries its
    `RouteRequest` (`text_route` or `token_route`) in `Request.route`."""

    name = NAME

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed, frozenset())
        self.now = 0.0
        self.router, self.pool = _router(_urls(n), self.rng, clock=lambda: self.now)
        self.replicas = self.pool.replicas
        config = RoutingConfig()
        for r in self.replicas:
            r.circuit = Circuit(config.failure_threshold, config.cooldown_s, clock=lambda: 0.0)
        self.index = {id(r): i for i, r in enumerate(self.replicas)}

    def choose(self, request: Request, replicas: Sequence[SimReplica], now: float) -> int:
        self.now = now
        chosen = self.router.choose(request.route)
        if chosen is None:
            raise RuntimeError("the gateway found no replica")
        chosen.acquire()
        return self.index[id(chosen)]
