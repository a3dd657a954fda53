"""Prefix-aware routing in the routing simulator (`bench.routing_sim` with its `PrefixCache`):
validated against the real two-replica run of `bench.prefix_routing`, then from 2 to 64
replicas with GPU-class costs.

    .venv/bin/python -m bench.prefix_sim [--requests-per-replica 200] [--load 0.8]

Validation: the trace of the last `bench.prefix_routing` run (docs/prefix_routing.json) is
replayed through two simulated replicas with the costs calibrated there and the same KV cache
and block size, once per policy, and the simulator's TTFT and cache hits are set against what
the engines measured.

Scaling: `GPU_CLASS` costs (assumed, not measured: see `bench.routing_sim`) with prefix caching
in 16-token blocks, on a workload shaped like llm-d's published prefix-routing benchmark: 150
tenants with 5,000-7,000-token system prompts, so no replica can hold every tenant's prefix,
and the same multi-turn conversations as the real run; the offered load per replica is `--load`
of what one replica serves with no cache hits. Policies: round-robin, least-loaded, and the
gateway's `Router` with its default scorers (the prefix scorer among them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.chat_trace import ChatWorkload, Turn
from bench.prefix_policy import SimGatewayPrefix, text_route, token_route
from bench.report import DOCS, machine, table, write_section
from bench.routing_sim import (
    GPU_CLASS,
    EngineProfile,
    LeastLoaded,
    Policy,
    Request,
    Result,
    RoundRobin,
    replace_arrival,
    simulate,
)

GPU_BLOCK_SIZE = 16
GPU_WORKLOAD = ChatWorkload(rate=1.0, conversations=1, tenants=150, system_tokens=(5000, 7000))
Route = Callable[[Turn], Any]  # what the gateway's policy is told of a request
SimFactory = Callable[[int, int], Policy]


def cpu_profile(costs: dict[str, float]) -> EngineProfile:
    """A replica of `bench.prefix_routing`: calibrated costs, its KV cache and batch limits."""
    from bench.prefix_routing import BLOCK_SIZE, KV_TOKENS, MAX_BATCHED_TOKENS, MAX_NUM_SEQS

    return EngineProfile(step_s=costs["step_s"], seq_s=costs["seq_s"],
                         prefill_token_s=costs["prefill_token_s"], adapter_load_s=0.0,
                         overhead_s=costs["overhead_s"], max_batch=MAX_NUM_SEQS,
                         max_batched_tokens=MAX_BATCHED_TOKENS, kv_tokens=KV_TOKENS,
                         prefix_caching=True, block_size=BLOCK_SIZE)


def gpu_profile() -> EngineProfile:
    return dataclasses.replace(GPU_CLASS, prefix_caching=True, block_size=GPU_BLOCK_SIZE)


def requests(trace: Sequence[Turn], block_size: int, route: Route | None = None) -> list[Request]:
    """The simulator's requests for a chat trace; prompts' blocks hashed as the engine would."""
    return [Request(t.rid, t.arrival, len(t.prompt_ids()), t.output, None, t.blocks(block_size),
                    route(t) if route else None) for t in trace]


def cold_capacity(profile: EngineProfile, workload: ChatWorkload) -> float:
    """Requests per second one replica sustains on this workload with no cache hits: a burst
    of it through one simulated replica with prefix caching off."""
    burst = dataclasses.replace(workload, rate=1.0, conversations=200).trace(range(1000, 40000))
    reqs = [replace_arrival(r, 0.0) for r in requests(burst, profile.block_size)]
    cold = dataclasses.replace(profile, prefix_caching=False)
    return len(reqs) / simulate(reqs, cold, 1, LeastLoaded(1, 0)).makespan


SIM_POLICIES: dict[str, SimFactory] = {
    RoundRobin.name: lambda n, seed: RoundRobin(n, seed),
    LeastLoaded.name: lambda n, seed: LeastLoaded(n, seed),
    SimGatewayPrefix.name: lambda n, seed: SimGatewayPrefix(n, seed),
}


def hit_ratio(result: Result) -> float:
    return sum(r.cached for r in result.requests) / sum(r.prompt for r in result.requests)


def validate() -> list[str]:
    """Replay the real run's trace in the simulator, policy by policy."""
    from bench.prefix_routing import RESULTS, runs_of, vocabulary, workload_of
    from llmops.cli import models_home
    from llmops.cli.models import prepare_models

    data = json.loads(RESULTS.read_text())
    workload = workload_of(data)
    vocab, render = vocabulary(prepare_models(models_home())["chat"])
    trace = workload.trace(vocab)
    profile = cpu_profile(data["costs"])
    reqs = requests(trace, profile.block_size, text_route(render))
    measured = {r.name: r for r in runs_of(data)}
    host_load = dict(zip(measured, data["host_load"], strict=True))
    rows = []
    errors: dict[str, float] = {}
    for name, real in measured.items():
        factory = SIM_POLICIES[name]
        sim = simulate(reqs, profile, 2, factory(2, 0))
        for label, q in (("p50", 0.5), ("p90", 0.9)):
            m = real.ttft(q)
            s = sim.ttft(q)
            errors[f"{name} {label}"] = (s - m) / m
        rows.append([name, f"{real.ttft(0.5):.2f}", f"{sim.ttft(0.5):.2f}",
                     f"{errors[f'{name} p50']:+.0%}", f"{real.ttft(0.9):.2f}",
                     f"{sim.ttft(0.9):.2f}", f"{errors[f'{name} p90']:+.0%}",
                     f"{real.hit_ratio:.0%}", f"{hit_ratio(sim):.0%}", host_load[name]])
        print(f"  {name:<22} p50 {real.ttft(0.5):.2f} vs {sim.ttft(0.5):.2f} s, p90 "
              f"{real.ttft(0.9):.2f} vs {sim.ttft(0.9):.2f} s, hits {real.hit_ratio:.0%} vs "
              f"{hit_ratio(sim):.0%}")
    worst = max(abs(v) for k, v in errors.items() if k.endswith("p50"))
    return [
        f"The trace of the run above ({len(trace)} requests) through two simulated replicas "
        f"with its calibrated costs, {profile.kv_tokens:,} KV tokens in {profile.block_size}-"
        f"token blocks, one policy at a time (the costs were measured once, at the start of "
        f"that run; the host's load average while each policy ran is in the last column):",
        "",
        table(["policy", "TTFT p50 vLLM (s)", "simulator", "error", "p90 vLLM (s)",
               "simulator", "error", "cached tokens vLLM", "simulator", "host load"], rows),
        "",
        f"Largest TTFT p50 error: {worst:.0%} (target: within 25 %).",
        "",
    ]


def study(sizes: Sequence[int], per_replica: int, load: float) -> tuple[
        list[str], dict[str, list[Result]]]:
    profile = gpu_profile()
    cap = cold_capacity(profile, GPU_WORKLOAD)
    by_size: dict[str, list[Result]] = {name: [] for name in SIM_POLICIES}
    detail: list[list[str]] = []
    for n in sizes:
        rate = load * cap * n / GPU_WORKLOAD.mean_turns
        workload = dataclasses.replace(GPU_WORKLOAD, rate=rate, seed=n,
                                       conversations=round(per_replica * n
                                                           / GPU_WORKLOAD.mean_turns))
        started = time.perf_counter()
        reqs = requests(workload.trace(range(1000, 40000)), profile.block_size,
                        token_route())
        made = time.perf_counter() - started
        for name, factory in SIM_POLICIES.items():
            res = simulate(reqs, profile, n, factory(n, n))
            by_size[name].append(res)
            print(f"  {n:>2} replicas  {name:<22} p50 {res.ttft(0.5) * 1000:7.0f} ms  p90 "
                  f"{res.ttft(0.9) * 1000:7.0f} ms  hits {hit_ratio(res):.0%}  "
                  f"(trace {made:.1f} s, simulated in {res.wall_s:.1f} s)")
            if n == sizes[-1]:
                detail.append(_row(res))
    lines = [
        f"Engine: GPU-class costs, assumed (not measured: `GPU_CLASS`), prefix caching in "
        f"{profile.block_size}-token blocks, {profile.kv_tokens:,} KV tokens, max_num_seqs "
        f"{profile.max_batch}. Workload: {GPU_WORKLOAD.tenants} tenants with "
        f"{GPU_WORKLOAD.system_tokens[0]:,}-{GPU_WORKLOAD.system_tokens[1]:,}-token system "
        f"prompts (about {GPU_WORKLOAD.tenants * sum(GPU_WORKLOAD.system_tokens) // 2:,} "
        f"tokens of prefixes in all), conversations as in the real run; {per_replica} requests "
        f"per replica, offered at {load:.0%} of the {cap:.1f} requests/s one replica serves "
        f"with no cache hits.",
        "",
        "**TTFT p50 / p90 (s) by replicas**",
        "",
        table(["policy", *(str(n) for n in sizes)],
              [[name, *(f"{r.ttft(0.5):.2f} / {r.ttft(0.9):.2f}" for r in results)]
               for name, results in by_size.items()]),
        "",
        "**Cached share of prompt tokens by replicas**",
        "",
        table(["policy", *(str(n) for n in sizes)],
              [[name, *(f"{hit_ratio(r):.0%}" for r in results)]
               for name, results in by_size.items()]),
        "",
        f"**{sizes[-1]} replicas**",
        "",
        table(["policy", "TTFT p50 (ms)", "p90", "p99", "throughput (req/s)",
               "cached prompt tokens"], detail),
        "",
    ]
    return lines, by_size


def _row(res: Result) -> list[str]:
    return [res.policy, f"{res.ttft(0.5) * 1000:.0f}", f"{res.ttft(0.9) * 1000:.0f}",
            f"{res.ttft(0.99) * 1000:.0f}", f"{res.throughput:.1f}", f"{hit_ratio(res):.0%}"]


def chart(sizes: Sequence[int], by_size: dict[str, list[Result]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, results in by_size.items():
        ax.plot(sizes, [r.ttft(0.9) for r in results], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sizes), [str(x) for x in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("replicas")
    ax.set_ylabel("TTFT p90 (s)")
    ax.set_title("Simulated TTFT p90, 150 tenants with long system prompts\n"
                 "GPU-class costs (assumed), prefix caching", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = DOCS / "prefix_sim_gpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-replica", type=int, default=200)
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the replay of the real run's trace")
    args = parser.parse_args()
    host = machine()
    body: list[str] = []
    if not args.no_validate:
        print("validating against the last bench.prefix_routing run")
        body += ["### Validation against the two vLLM-CPU replicas", "", *validate()]
    sizes = (2, 4, 8, 16, 32, 64)
    started = time.perf_counter()
    lines, by_size = study(sizes, args.requests_per_replica, args.load)
    path = chart(sizes, by_size)
    body += ["### From 2 to 64 replicas: GPU-class costs, assumed (not measured)", "", *lines,
             f"Simulated in {time.perf_counter() - started:.0f} s. Chart: "
             f"![{path.stem}]({path.name}).", ""]
    command = ".venv/bin/python -m bench.prefix_sim"
    write_section("Prefix-aware routing (simulated)", command, host, "\n".join(body))
    print(f"written to {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
