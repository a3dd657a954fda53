"""What the gateway adds to a request, measured against a fake upstream (bench/fake_upstream.py)
so that only the gateway's own cost shows. The upstream, the gateway (pinned to one core) and
this client run side by side; each round measures direct and proxied requests interleaved.

    .venv/bin/python -m bench.gateway_overhead [--requests 2000] [--rounds 3]

Prints added latency p50/p99 at one connection (non-streaming), added time to first byte of a
stream, and requests/s through the gateway at several concurrencies. The gateway runs with its
auth, accounting and ledger on (the bootstrap admin key, a SQLite store, the local Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench.proxy_load import BODY, STREAM_BODY, gateway, latencies, ledger_writer, rate, start
from bench.report import pct
from llmops.cli.stack import Service, free_port, stop_process_group


async def measure(direct: str, proxied: str, args: argparse.Namespace) -> None:
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("direct_p50", "direct_p99", "added_p50", "added_p99",
                                     "ttfb_direct", "ttfb_added")}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        await latencies(s, proxied, BODY, 200)  # warm up connections and caches
        await latencies(s, direct, BODY, 200)
        for _ in range(args.rounds):
            d = await latencies(s, direct, BODY, args.requests)
            p = await latencies(s, proxied, BODY, args.requests)
            rows["direct_p50"].append(pct(d, 0.5))
            rows["direct_p99"].append(pct(d, 0.99))
            rows["added_p50"].append(pct(p, 0.5) - pct(d, 0.5))
            rows["added_p99"].append(pct(p, 0.99) - pct(d, 0.99))
            ds = await latencies(s, direct, STREAM_BODY, args.requests // 10, first_byte=True)
            ps = await latencies(s, proxied, STREAM_BODY, args.requests // 10, first_byte=True)
            rows["ttfb_direct"].append(pct(ds, 0.5))
            rows["ttfb_added"].append(pct(ps, 0.5) - pct(ds, 0.5))
    med = {k: statistics.median(v) * 1000 for k, v in rows.items()}
    print(f"one connection, {args.requests} requests x {args.rounds} rounds (medians of rounds)")
    print(f"  fake upstream alone      p50 {med['direct_p50']:.3f} ms   p99 "
          f"{med['direct_p99']:.3f} ms")
    print(f"  added by the gateway     p50 {med['added_p50']:.3f} ms   p99 "
          f"{med['added_p99']:.3f} ms")
    print(f"  stream first byte: upstream {med['ttfb_direct']:.3f} ms, added by the gateway "
          f"{med['ttfb_added']:.3f} ms (p50)")
    for c in (1, 16, 64):
        print(f"  requests/s through the gateway at {c:>2} connections: "
              f"{(await rate(proxied, c, args.seconds)).rate:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writer", choices=("separate", "in-process"), default="separate",
                        help="run the ledger writer as its own process (on the other core) "
                             "or inside the gateway")
    args = parser.parse_args()

    up_port, gw_port = free_port(), free_port()
    upstream = Service("fake-upstream", [sys.executable, "-m", "bench.fake_upstream",
                                         str(up_port)], up_port, "/health")
    with tempfile.TemporaryDirectory() as tmp:
        gw = gateway(Path(tmp), f"http://127.0.0.1:{up_port}", gw_port,
                     writer_in_process=args.writer == "in-process")
        procs = [start(upstream, "1"), start(gw, "0")]
        if args.writer == "separate":
            procs.append(ledger_writer(gw, "1"))
        print(f"ledger writer: {args.writer}")
        try:
            asyncio.run(measure(f"http://127.0.0.1:{up_port}/v1/chat/completions",
                                f"http://127.0.0.1:{gw_port}/v1/chat/completions", args))
        finally:
            for proc in procs:
                stop_process_group(proc.pid, grace_s=5)


if __name__ == "__main__":
    main()
