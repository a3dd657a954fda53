"""llmops against its peers: the same load, in one run, against the upstream directly, the
llmops gateway (auth, limits and ledger on) and the LiteLLM proxy (master key auth, no database),
each gateway one process pinned to core 0 with taskset, interleaved in rounds.

    make bench-peers-setup   # LiteLLM in .bench-venvs/litellm (the script runs it when missing)
    .venv/bin/python -m bench.peers [--requests 2000] [--rounds 3] [--seconds 5]

Two phases:

1. Overhead, against the FAKE upstream (`bench/fake_upstream.py`, canned answers; pinned to
   core 1 with the ledger writer), so only the gateways' own cost shows: added latency p50/p99
   of non-streaming requests at one connection, added time to the first content token of a
   stream (the fake upstream sends a token every 5 ms), and requests/s on a ramp of
   concurrencies with the CPU each gateway used per request; a gateway's best rate is the
   highest median rate of a concurrency at which no request failed in any round.
2. End to end, against the REAL vLLM-CPU engine (SmolLM2-135M-Instruct, pinned to core 1 with
   its OpenMP threads, `--engine-cores`, so that it does not share core 0 with the gateways;
   the ledger writer shares core 1 with it): throughput at saturation (`--engine-requests`
   chat requests, `--max-tokens` tokens each, `--engine-concurrency` at a time) through each
   gateway as a fraction of vLLM's own, and latency and time to first token at one connection.

Figures are printed, written to `docs/benchmarks.md` (section "Gateway overhead against peers")
and charted in `docs/peers_overhead.png` and `docs/peers_engine.png`; `--no-write` skips both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import yaml

from bench.proxy_load import (
    KEY,
    chat_body,
    cpu_seconds,
    gateway,
    latencies,
    ledger_writer,
    rate,
    start,
    ttft,
)
from bench.report import DOCS, machine, pct, table, write_section
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.cli.stack import CHAT_MODEL, Service, free_port, stop_process_group, vllm_service

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / ".bench-venvs" / "litellm"
TITLE = "Gateway overhead against peers"
TARGETS = {"p50": 1.0, "p99": 2.0, "rate": 1000.0, "fraction": 0.98}
PROMPT = "Name three rivers in Europe and say one thing about each."


@dataclass
class Peer:
    name: str  # "upstream" for the thing every gateway sits in front of
    label: str
    base: str  # base URL, without /v1
    pgid: int

    @property
    def url(self) -> str:
        return f"{self.base}/v1/chat/completions"


@dataclass
class Overhead:
    """Per peer, one value per round (seconds), and per (peer, concurrency) the ramp's loads."""
    p50: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    p99: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ttft: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rates: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    cpu_ms: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class Engine:
    rate: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    p50: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    p99: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ttft: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def check_auth(peers: list[Peer], body: bytes) -> None:
    """Every gateway refuses a request without the key: auth is on in what is measured."""
    async with aiohttp.ClientSession() as s:
        for p in peers[1:]:
            async with s.post(p.url, data=body, headers={"content-type": "application/json",
                                                         "Authorization": "Bearer sk-wrong"}) as r:
                # llmops answers 401; LiteLLM without a database 400 ("No connected db."):
                # it looks up any key but the master key there.
                if not 400 <= r.status < 500:
                    raise RuntimeError(f"{p.label} answered {r.status} to a wrong key: "
                                       f"{await r.text()}")


def rotated(peers: Sequence[Peer], i: int) -> list[Peer]:
    """Round `i`'s order: each peer goes first in turn, so drift in the machine's load is
    spread over all of them."""
    return [peers[(i + k) % len(peers)] for k in range(len(peers))]


# --- the LiteLLM proxy ---------------------------------------------------------------------

def ensure_litellm() -> Path:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not any(LITELLM_VENV.glob(".installed-*")):  # the Makefile's stamp: a complete install
        print("installing LiteLLM into .bench-venvs/litellm (make bench-peers-setup)")
        subprocess.run(["make", "-C", str(ROOT), "bench-peers-setup"], check=True)
    return binary


def litellm_version() -> str:
    out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def litellm(tmp: Path, upstream: str, port: int, model: str) -> Service:
    """The LiteLLM proxy with one model pointing at `upstream` (an OpenAI-compatible server),
    master key auth on, no database, no callbacks, one worker."""
    config = tmp / f"litellm-{port}.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"{upstream}/v1", "api_key": "none"}}],
        "general_settings": {"master_key": KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }))
    argv = [str(ensure_litellm()), "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]
    # The cost map ships with the package: no fetch from GitHub (nothing outside is reachable).
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True"}
    return Service("litellm", argv, port, "/health/liveliness", env)


# --- phase 1: overhead against the fake upstream -------------------------------------------

async def measure_overhead(peers: list[Peer], args: argparse.Namespace) -> Overhead:
    body, stream = chat_body("fake"), chat_body("fake", stream=True)
    out = Overhead()
    await check_auth(peers, body)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for p in peers:  # warm up connections and caches; proves each path answers
            await latencies(s, p.url, body, max(20, args.requests // 10))
            await ttft(s, p.url, stream)
        for r in range(args.rounds):
            for p in rotated(peers, r):
                lat = await latencies(s, p.url, body, args.requests)
                out.p50[p.name].append(pct(lat, 0.5))
                out.p99[p.name].append(pct(lat, 0.99))
                firsts = [(await ttft(s, p.url, stream))[0]
                          for _ in range(max(10, args.requests // 10))]
                out.ttft[p.name].append(pct(firsts, 0.5))
            log(f"round {r + 1}: one connection done")
    for r in range(args.rounds):
        for c in args.concurrency:
            for p in rotated(peers, r):
                cpu = cpu_seconds(p.pgid)
                load = await rate(p.url, c, args.seconds, body=body)
                out.rates[p.name, c].append(load.rate)
                out.errors[p.name, c] += load.errors
                if load.ok:
                    out.cpu_ms[p.name, c].append((cpu_seconds(p.pgid) - cpu) / load.ok * 1000)
        log(f"round {r + 1}: ramp done")
    return out


def best_rate(o: Overhead, name: str, concurrency: Sequence[int]) -> tuple[float, int | None]:
    clean = [(med(o.rates[name, c]), c) for c in concurrency if not o.errors[name, c]]
    return max(clean) if clean else (float("nan"), None)


def overhead_tables(o: Overhead, peers: list[Peer], args: argparse.Namespace) -> str:
    up = peers[0].name
    rows = []
    for p in peers:
        def added(d: dict[str, list[float]], name: str = p.name) -> str:
            if name == up:
                return f"{med(d[up]) * 1000:.3f} (itself)"
            return f"{med([a - b for a, b in zip(d[name], d[up], strict=True)]) * 1000:.3f}"
        best, at = best_rate(o, p.name, args.concurrency)
        cpu = med(o.cpu_ms[p.name, at]) if at else float("nan")
        rows.append([p.label, added(o.p50), added(o.p99), added(o.ttft),
                     f"{best:,.0f}" + (f" (at {at})" if at else ""),
                     "-" if p.name == up else f"{cpu:.2f}"])
    first = table(["", "added p50 ms", "added p99 ms", "added TTFT p50 ms", "best req/s",
                   "CPU ms / request"], rows)
    ramp = table(["concurrency", *[p.label for p in peers]],
                 [[str(c), *[f"{med(o.rates[p.name, c]):,.0f}"
                             + (f" ({o.errors[p.name, c]} failed)" if o.errors[p.name, c]
                                else "") for p in peers]] for c in args.concurrency])
    return f"{first}\n\nRequests/s by concurrency (medians of rounds):\n\n{ramp}"


# --- phase 2: end to end against vLLM-CPU --------------------------------------------------

async def measure_engine(peers: list[Peer], args: argparse.Namespace) -> Engine:
    body = chat_body(CHAT_MODEL, max_tokens=args.max_tokens, content=PROMPT)
    stream = chat_body(CHAT_MODEL, max_tokens=args.max_tokens, content=PROMPT, stream=True)
    out = Engine()
    await check_auth(peers, body)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=aiohttp.ClientTimeout(total=300)) as s:
        for p in peers:
            await latencies(s, p.url, body, 3)
            await ttft(s, p.url, stream)
        for r in range(args.rounds):
            for p in rotated(peers, r):
                load = await rate(p.url, args.engine_concurrency, body=body,
                                  requests=args.engine_requests, count_tokens=True,
                                  timeout_s=300)
                out.rate[p.name].append(load.rate)
                out.tokens[p.name].append(load.tokens / load.seconds)
                out.errors[p.name] += load.errors
                lat = await latencies(s, p.url, body, args.engine_latency_requests)
                out.p50[p.name].append(pct(lat, 0.5))
                out.p99[p.name].append(pct(lat, 0.99))
                firsts = [(await ttft(s, p.url, stream))[0]
                          for _ in range(args.engine_latency_requests)]
                out.ttft[p.name].append(pct(firsts, 0.5))
            log(f"round {r + 1}: engine done")
    return out


def engine_table(e: Engine, peers: list[Peer]) -> str:
    up = peers[0].name
    rows = []
    for p in peers:
        fraction = med([a / b for a, b in zip(e.rate[p.name], e.rate[up], strict=True)])
        rows.append([p.label, f"{med(e.rate[p.name]):.2f}", f"{med(e.tokens[p.name]):.0f}",
                     f"{fraction:.3f}", str(e.errors[p.name]), f"{med(e.p50[p.name]) * 1000:.1f}",
                     f"{med(e.p99[p.name]) * 1000:.1f}", f"{med(e.ttft[p.name]) * 1000:.1f}"])
    return table(["", "req/s at saturation", "tokens/s", "fraction of vLLM", "failed",
                  "latency p50 ms", "latency p99 ms", "TTFT p50 ms"], rows)


# --- charts --------------------------------------------------------------------------------

def charts(o: Overhead | None, e: Engine | None, peers_o: list[Peer], peers_e: list[Peer],
           args: argparse.Namespace, docs: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if o is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        gws = peers_o[1:]
        up = peers_o[0].name
        for i, (key, d) in enumerate((("p50", o.p50), ("p99", o.p99), ("TTFT p50", o.ttft))):
            vals = [max(1e-3, med([a - b for a, b in zip(d[p.name], d[up], strict=True)])
                        * 1000) for p in gws]
            ax1.bar([j + i * 0.27 for j in range(len(gws))], vals, width=0.27, label=key)
        ax1.set_xticks([j + 0.27 for j in range(len(gws))], [p.label for p in gws])
        ax1.set_yscale("log")
        ax1.axhline(TARGETS["p50"], ls="--", c="grey", lw=0.8)
        ax1.axhline(TARGETS["p99"], ls=":", c="grey", lw=0.8)
        ax1.set_ylabel("added ms (log)")
        ax1.set_title("added latency, one connection (fake upstream)")
        ax1.legend()
        for p in peers_o:
            ax2.plot(args.concurrency, [med(o.rates[p.name, c]) for c in args.concurrency],
                     marker="o", label=p.label)
        ax2.axhline(TARGETS["rate"], ls="--", c="grey", lw=0.8)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("concurrent connections")
        ax2.set_ylabel("requests/s (log)")
        ax2.set_title("requests/s, gateway on one core")
        ax2.legend()
        fig.tight_layout()
        written.append(docs / "peers_overhead.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if e is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        up = peers_e[0].name
        fractions = [med([a / b for a, b in zip(e.rate[p.name], e.rate[up], strict=True)])
                     for p in peers_e]
        bars = ax1.bar([p.label for p in peers_e], fractions)
        ax1.bar_label(bars, fmt="%.3f")
        ax1.axhline(TARGETS["fraction"], ls="--", c="grey", lw=0.8)
        ax1.set_ylim(0, max(1.1, *fractions) * 1.08)
        ax1.set_title(f"throughput as a fraction of vLLM's ({args.engine_concurrency} at a time)")
        for i, (key, d) in enumerate((("p50", e.p50), ("p99", e.p99), ("TTFT p50", e.ttft))):
            ax2.bar([j + i * 0.27 for j in range(len(peers_e))],
                    [med(d[p.name]) * 1000 for p in peers_e], width=0.27, label=key)
        ax2.set_xticks([j + 0.27 for j in range(len(peers_e))], [p.label for p in peers_e])
        ax2.set_ylabel("ms")
        ax2.set_title(f"end to end, one connection, max_tokens {args.max_tokens}")
        ax2.legend()
        fig.tight_layout()
        written.append(docs / "peers_engine.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# --- running it ----------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_phase(tmp: Path, upstream: Peer, args: argparse.Namespace, model: str,
              measure: Callable[[list[Peer], argparse.Namespace], object],
              pool: dict[str, object] | None = None) -> tuple[object, list[Peer]]:
    """Start llmops (+ its ledger writer) and LiteLLM in front of `upstream`, measure, stop."""
    procs: list[subprocess.Popen[bytes]] = []
    tmp.mkdir(exist_ok=True)
    try:
        gw = gateway(tmp, upstream.base, free_port(), model=model, pool=pool)
        procs.append(start(gw, "0", log=tmp / "llmops.log"))
        procs.append(ledger_writer(gw, "1"))
        peers = [upstream, Peer("llmops", "llmops", f"http://127.0.0.1:{gw.port}", procs[0].pid)]
        if not args.skip_litellm:
            lt = litellm(tmp, upstream.base, free_port(), model)
            procs.append(start(lt, "0", timeout_s=180, log=tmp / "litellm.log"))
            peers.append(Peer("litellm", f"LiteLLM {litellm_version()}",
                              f"http://127.0.0.1:{lt.port}", procs[-1].pid))
        log(f"measuring {', '.join(p.label for p in peers)}")
        return asyncio.run(measure(peers, args)), peers  # type: ignore[arg-type]
    finally:
        for proc in procs:
            stop_process_group(proc.pid, grace_s=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per peer and round at one connection (fake upstream)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each ramp step")
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")],
                        default=[1, 4, 16, 64], help="the ramp, comma-separated")
    parser.add_argument("--engine-requests", type=int, default=512)
    parser.add_argument("--engine-concurrency", type=int, default=64)
    parser.add_argument("--engine-latency-requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--engine-cores", default="1",
                        help="cores for vLLM-CPU (taskset and its OpenMP binding), or 'all' to "
                             "let it share core 0 with the gateways")
    parser.add_argument("--skip-engine", action="store_true", help="fake upstream only")
    parser.add_argument("--skip-overhead", action="store_true", help="real engine only")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--no-write", action="store_true",
                        help="print only: leave docs/ alone")
    parser.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    host = machine()
    if not args.skip_litellm:
        ensure_litellm()
    sections: list[str] = []
    overhead: Overhead | None = None
    engine: Engine | None = None
    peers_o: list[Peer] = []
    peers_e: list[Peer] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_overhead:
            port = free_port()
            fake = start(Service("fake-upstream", [sys.executable, "-m", "bench.fake_upstream",
                                                   str(port)], port, "/health"), "1")
            try:
                up = Peer("upstream", "fake upstream alone", f"http://127.0.0.1:{port}",
                          fake.pid)
                result, peers_o = run_phase(tmp / "fake", up, args, "fake", measure_overhead)
            finally:
                stop_process_group(fake.pid, grace_s=5)
            assert isinstance(result, Overhead)
            overhead = result
            sections.append(
                f"Overhead against the FAKE upstream (`bench/fake_upstream.py`, canned answers, "
                f"a token every 5 ms in streams), {args.requests} requests per peer and round at "
                f"one connection, {args.rounds} rounds, medians of rounds; added = the peer's "
                f"percentile minus the upstream's in the same round. Ramp steps of "
                f"{args.seconds:g} s; best req/s = the highest rate at which no request failed; "
                f"CPU per request is the gateway's own (all its processes) at that rate.\n\n"
                + overhead_tables(overhead, peers_o, args))
            print("\n" + sections[-1] + "\n", flush=True)
        if not args.skip_engine:
            (tmp / "engine").mkdir()  # vLLM's log goes there before the gateways start
            dirs = prepare_models(models_home())
            service = vllm_service("vllm-peers", dirs["chat"], CHAT_MODEL, free_port())
            cores = None if args.engine_cores == "all" else args.engine_cores
            if cores:  # vLLM binds its OpenMP threads itself: tell it the same cores
                service = replace(service, env={**service.env,
                                                "VLLM_CPU_OMP_THREADS_BIND": cores})
            log("starting vLLM-CPU (minutes on a loaded machine)")
            vllm = start(service, cores, timeout_s=900, log=tmp / "engine" / "vllm.log")
            try:
                up = Peer("upstream", "vLLM-CPU alone", f"http://127.0.0.1:{service.port}",
                          vllm.pid)
                # The gateway must not be what refuses work at saturation: room for every
                # request the load holds open, in flight and queued in vLLM.
                room = {"max_concurrency": 4 * args.engine_concurrency,
                        "max_waiting": 4 * args.engine_concurrency}
                result, peers_e = run_phase(tmp / "engine", up, args, CHAT_MODEL,
                                            measure_engine, room)
            finally:
                stop_process_group(vllm.pid)
            assert isinstance(result, Engine)
            engine = result
            sections.append(
                f"End to end against the REAL vLLM-CPU engine ({CHAT_MODEL}, one replica on "
                f"{'all cores' if cores is None else 'core ' + cores}, the gateways on core 0): "
                f"{args.engine_requests} chat requests "
                f"of max_tokens {args.max_tokens} (temperature 0), {args.engine_concurrency} at "
                f"a time, per peer and round; then {args.engine_latency_requests} requests and "
                f"as many streams at one connection. Medians of {args.rounds} rounds.\n\n"
                + engine_table(engine, peers_e))
            print("\n" + sections[-1] + "\n", flush=True)
    verdict = targets(overhead, engine, peers_o, peers_e, args)
    print(verdict)
    if args.no_write:
        return
    pngs = charts(overhead, engine, peers_o, peers_e, args, args.docs)
    command = "make bench-peers-setup && .venv/bin/python -m bench.peers " + " ".join(
        _rerun_args(sys.argv[1:]))
    body = ("Each gateway is one process pinned to core 0 with taskset; the llmops gateway "
            "has auth (the bootstrap admin key), limits (local Redis) and the ledger (SQLite, "
            "spooled, writer on core 1) on; LiteLLM has master key auth, no database and no "
            "callbacks.\n\n" + "\n\n".join(sections) + "\n\n" + verdict + "\n\n"
            + "\n".join(f"![{p.stem}]({p.name})" for p in pngs))
    path = write_section(TITLE, command.strip(), host, body, args.docs)
    log(f"wrote {path} and {', '.join(str(p) for p in pngs)}")


def _rerun_args(argv: list[str]) -> list[str]:
    """`argv` without `--docs DIR` (a place for trial runs, not part of how to run it again)."""
    out, skip = [], False
    for arg in argv:
        if not skip and arg != "--docs" and not arg.startswith("--docs="):
            out.append(arg)
        skip = arg == "--docs"
    return out


def targets(o: Overhead | None, e: Engine | None, peers_o: list[Peer], peers_e: list[Peer],
            args: argparse.Namespace) -> str:
    lines = []
    if o is not None:
        up = peers_o[0].name
        p50 = med([a - b for a, b in zip(o.p50["llmops"], o.p50[up], strict=True)]) * 1000
        p99 = med([a - b for a, b in zip(o.p99["llmops"], o.p99[up], strict=True)]) * 1000
        best, _ = best_rate(o, "llmops", args.concurrency)
        lines += [_target("llmops added p50", p50, "<=", TARGETS["p50"], "ms"),
                  _target("llmops added p99", p99, "<=", TARGETS["p99"], "ms"),
                  _target("llmops req/s on one core", best, ">=", TARGETS["rate"], "")]
    if e is not None:
        up = peers_e[0].name
        frac = med([a / b for a, b in zip(e.rate["llmops"], e.rate[up], strict=True)])
        lines.append(_target("llmops throughput / vLLM's", frac, ">=", TARGETS["fraction"], ""))
    return "Targets:\n\n" + "\n".join(f"- {line}" for line in lines)


def _target(what: str, value: float, op: str, bound: float, unit: str) -> str:
    met = value <= bound if op == "<=" else value >= bound
    return (f"{what}: {value:,.3f}{' ' + unit if unit else ''} (target {op} {bound:g}"
            f"{' ' + unit if unit else ''}): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
