"""Live state of one vLLM replica and of a pool of them, as the router sees it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.routing.circuit import Circuit
from llmops.settings import PoolConfig, RoutingConfig

__all__ = ["Pool", "Replica"]


@dataclass(eq=False)
class Replica:
    url: str
    device: str
    max_concurrency: int
    max_waiting: int
    circuit: Circuit
    healthy: bool = True  # last active /health verdict
    probe_failures: int = 0
    outstanding: int = 0  # requests this gateway process has in flight here
    waiting: float = 0.0  # vllm:num_requests_waiting, scraped
    running: float = 0.0  # vllm:num_requests_running, scraped (all gateways' requests)
    kv_cache_usage: float = 0.0  # vllm:kv_cache_usage_perc (0..1), scraped
    adapters: frozenset[str] = field(default_factory=frozenset)  # LoRA names loaded here
    # Adapters this gateway sent here lately, most recent last: likely in vLLM's LoRA cache.
    recent_adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)
    config: PoolConfig | None = None  # the pool it belongs to (costs and throughput)
    index: int = 0  # its place among the pool's URLs: what clients may be shown of it
    # Called when it may have room again (a request ended, its engine's queue shortened):
    # flow control hands the room to a waiting request.
    on_room: Callable[[], None] | None = None

    @property
    def available(self) -> bool:
        return self.healthy and self.circuit.admits()

    @property
    def has_capacity(self) -> bool:
        return self.outstanding < self.max_concurrency and self.waiting < max(self.max_waiting, 1)

    def sent_adapter(self, adapter: str, keep: int) -> None:
        """Remember `adapter` as sent here, forgetting the oldest beyond `keep`."""
        self.recent_adapters[adapter] = None
        self.recent_adapters.move_to_end(adapter)
        while len(self.recent_adapters) > keep:
            self.recent_adapters.popitem(last=False)

    def acquire(self) -> None:
        self.outstanding += 1
        self.circuit.on_dispatch()

    def release(self, *, ok: bool) -> None:
        self.outstanding -= 1
        if ok:
            self.circuit.record_success()
        else:
            self.circuit.record_failure()
        if self.on_room is not None:
            self.on_room()


@dataclass(eq=False)
class Pool:
    device: str
    priority: int
    replicas: list[Replica]

    @classmethod
    def from_config(cls, config: PoolConfig, routing: RoutingConfig) -> Pool:
        return cls(
            device=config.device,
            priority=config.priority,
            replicas=[
                Replica(
                    url=url,
                    device=config.device,
                    max_concurrency=config.max_concurrency,
                    max_waiting=config.max_waiting,
                    circuit=Circuit(routing.failure_threshold, routing.cooldown_s),
                    config=config,
                    index=index,
                )
                for index, url in enumerate(config.urls)
            ],
        )
