"""What the Responses API costs over Chat Completions through the same gateway, against the
fake upstream (bench/fake_upstream.py, a stand-in that measures only the gateway's own cost).
A response is translated into the chat pipeline, its answer into a Response object (or the
Responses events) and stored after it has gone out; this measures that difference side by
side, in every round: the upstream alone, chat completions through the gateway, and a stored,
tool-less response through it, whole and streamed.

    .venv/bin/python -m bench.responses_overhead [--requests 2000] [--rounds 3]

Prints the added p50/p99 at one connection and the added time to the first byte of a stream,
for each API, and the difference (responses minus chat)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import aiohttp
import orjson

from bench.proxy_load import BODY, STREAM_BODY, gateway, latencies, ledger_writer, start
from bench.report import pct
from llmops.cli.stack import Service, free_port, stop_process_group

RESPONSE = orjson.dumps({"model": "fake", "input": "What is the capital of France?"})
RESPONSE_STREAM = orjson.dumps({"model": "fake", "input": "What is the capital of France?",
                                "stream": True})


async def measure(upstream: str, gw: str, args: argparse.Namespace) -> None:
    bodies = {"chat": (f"{gw}/v1/chat/completions", BODY, STREAM_BODY),
              "responses": (f"{gw}/v1/responses", RESPONSE, RESPONSE_STREAM)}
    rows: dict[str, list[float]] = defaultdict(list)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        direct = f"{upstream}/v1/chat/completions"
        for url, body, _ in (*bodies.values(), (direct, BODY, None)):  # warm up
            await latencies(s, url, body, 200)
        for _ in range(args.rounds):
            d = await latencies(s, direct, BODY, args.requests)
            ds = await latencies(s, direct, STREAM_BODY, args.requests // 10, first_byte=True)
            for api, (url, body, stream) in bodies.items():
                p = await latencies(s, url, body, args.requests)
                ps = await latencies(s, url, stream, args.requests // 10, first_byte=True)
                rows[f"{api} p50"].append(pct(p, 0.5) - pct(d, 0.5))
                rows[f"{api} p99"].append(pct(p, 0.99) - pct(d, 0.99))
                rows[f"{api} ttfb"].append(pct(ps, 0.5) - pct(ds, 0.5))
    med = {k: statistics.median(v) * 1000 for k, v in rows.items()}
    print(f"one connection, {args.requests} requests x {args.rounds} rounds (medians of rounds), "
          "against the fake upstream")
    for api in bodies:
        print(f"  added by the gateway, {api:9} p50 {med[f'{api} p50']:.3f} ms   p99 "
              f"{med[f'{api} p99']:.3f} ms   stream first byte {med[f'{api} ttfb']:.3f} ms")
    print(f"  responses minus chat: p50 {med['responses p50'] - med['chat p50']:+.3f} ms   "
          f"stream first byte {med['responses ttfb'] - med['chat ttfb']:+.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    up_port = free_port()
    upstream = Service("fake-upstream", [sys.executable, "-m", "bench.fake_upstream",
                                         str(up_port)], up_port, "/health")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [start(upstream, "1")]
        gw = gateway(Path(tmp), f"http://127.0.0.1:{up_port}", free_port())
        procs += [start(gw, "0"), ledger_writer(gw, "1")]
        try:
            asyncio.run(measure(f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw.port}",
                                args))
        finally:
            for proc in procs:
                stop_process_group(proc.pid, grace_s=5)


if __name__ == "__main__":
    main()
