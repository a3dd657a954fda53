"""What the gateway adds to a request, measured against a fake upstream (bench/fake_upstream.py)
so that only the gateway's own cost shows. The upstream, the gateway (pinned to one core) and
this client run side by side; each round measures direct and proxied requests interleaved.

    .venv/bin/python -m bench.gateway_overhead [--requests 2000] [--rounds 3] [--baseline DIR]
                                               [--routing]

Prints added latency p50/p99 at one connection (non-streaming), added time to first byte of a
stream, and requests/s through the gateway at several concurrencies. The gateway runs with its
auth, accounting and ledger on (the bootstrap admin key, a SQLite store, the local Redis).

`--baseline DIR` also runs the gateway of another checkout (say, `git worktree add DIR REV`)
on the same core, in front of the same upstream, and measures both in every round, one after
the other, so that a change is compared with what it changes under the same machine load.

`--routing` measures two gateways of this checkout side by side instead, in front of two
replicas (two URLs of the same upstream): prefix- and session-aware routing on (the defaults)
and off (`weight_prefix: 0`, `weight_session: 0`), with a chat request whose system prompt
is 4,000 characters long, so that every request hashes and looks up its prefix blocks.
"""

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

from bench.proxy_load import (
    BODY,
    STREAM_BODY,
    chat_body,
    gateway,
    latencies,
    ledger_writer,
    rate,
    start,
)
from bench.report import pct
from llmops.cli.stack import Service, free_port, stop_process_group

# A system prompt as long as a real assistant's (about 1,000 tokens): 15 prefix blocks.
LONG_BODY = orjson.loads(chat_body("fake"))
LONG_BODY["messages"].insert(0, {"role": "system", "content": "You are a helpful assistant. "
                                 "Answer briefly and cite your sources. " * 60})
LONG = orjson.dumps(LONG_BODY)
LONG_STREAM = orjson.dumps({**LONG_BODY, "stream": True})


async def measure(direct: str, gateways: dict[str, str], args: argparse.Namespace) -> None:
    """`gateways`: each gateway's URL by label; all are measured in every round."""
    rows: dict[str, list[float]] = defaultdict(list)
    body, stream = (LONG, LONG_STREAM) if args.routing else (BODY, STREAM_BODY)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for url in (*gateways.values(), direct):  # warm up connections and caches
            await latencies(s, url, body, 200)
        for _ in range(args.rounds):
            d = await latencies(s, direct, body, args.requests)
            ds = await latencies(s, direct, stream, args.requests // 10, first_byte=True)
            rows["direct_p50"].append(pct(d, 0.5))
            rows["direct_p99"].append(pct(d, 0.99))
            rows["ttfb_direct"].append(pct(ds, 0.5))
            for label, url in gateways.items():
                p = await latencies(s, url, body, args.requests)
                ps = await latencies(s, url, stream, args.requests // 10, first_byte=True)
                rows[f"{label} p50"].append(pct(p, 0.5) - pct(d, 0.5))
                rows[f"{label} p99"].append(pct(p, 0.99) - pct(d, 0.99))
                rows[f"{label} ttfb"].append(pct(ps, 0.5) - pct(ds, 0.5))
    med = {k: statistics.median(v) * 1000 for k, v in rows.items()}
    print(f"one connection, {args.requests} requests x {args.rounds} rounds (medians of rounds)")
    print(f"  fake upstream alone      p50 {med['direct_p50']:.3f} ms   p99 "
          f"{med['direct_p99']:.3f} ms   stream first byte {med['ttfb_direct']:.3f} ms")
    for label in gateways:
        print(f"  added by {label:15} p50 {med[f'{label} p50']:.3f} ms   p99 "
              f"{med[f'{label} p99']:.3f} ms   stream first byte {med[f'{label} ttfb']:.3f} ms")
    for label, url in gateways.items():
        for c in (1, 16, 64):
            print(f"  requests/s through {label} at {c:>2} connections: "
                  f"{(await rate(url, c, args.seconds)).rate:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writer", choices=("separate", "in-process"), default="separate",
                        help="run the ledger writer as its own process (on the other core) "
                             "or inside the gateway")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of another version, measured side by side")
    parser.add_argument("--routing", action="store_true",
                        help="prefix- and session-aware routing on against off, side by side")
    args = parser.parse_args()

    up_port = free_port()
    upstream = Service("fake-upstream", [sys.executable, "-m", "bench.fake_upstream",
                                         str(up_port)], up_port, "/health")
    # label: (checkout, routing settings, upstream URLs)
    one = f"http://127.0.0.1:{up_port}"
    sources: dict[str, tuple[Path | None, dict[str, object] | None, str]]
    if args.routing:
        two = f"{one},http://localhost:{up_port}"
        sources = {"prefix on": (None, None, two),
                   "prefix off": (None, {"weight_prefix": 0, "weight_session": 0}, two)}
    else:
        sources = {"this gateway": (None, None, one),
                   **({"the baseline": (args.baseline, None, one)} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [start(upstream, "1")]
        urls = {}
        for label, (source, routing, upstreams) in sources.items():
            gw = gateway(Path(tmp), upstreams, free_port(), routing=routing,
                         writer_in_process=args.writer == "in-process", source=source)
            procs.append(start(gw, "0", cwd=source))
            if args.writer == "separate":
                procs.append(ledger_writer(gw, "1", cwd=source))
            urls[label] = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
        print(f"ledger writer: {args.writer}")
        try:
            asyncio.run(measure(f"http://127.0.0.1:{up_port}/v1/chat/completions", urls, args))
        finally:
            for proc in procs:
                stop_process_group(proc.pid, grace_s=5)


if __name__ == "__main__":
    main()
