"""Pieces shared by the proxy benchmarks (`bench.gateway_overhead`, `bench.peers`): the request
bodies, starting a service pinned to a core, the llmops gateway's benchmark configuration, and
the load: sequential latencies at one connection and a closed loop at a fixed concurrency."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import yaml

from llmops.cli.stack import Service

__all__ = ["BODY", "KEY", "STREAM_BODY", "Load", "chat_body", "cpu_seconds", "gateway",
           "latencies", "ledger_writer", "rate", "start", "ttft"]

KEY = "sk-bench"
BODY = b'{"model":"fake","messages":[{"role":"user","content":"What is the capital of France?"}]}'
STREAM_BODY = BODY[:-1] + b',"stream":true}'
_HEADERS = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}


def chat_body(model: str, *, stream: bool = False, max_tokens: int | None = None,
              content: str = "What is the capital of France?") -> bytes:
    body: dict[str, object] = {"model": model,
                               "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body |= {"max_tokens": max_tokens, "temperature": 0.0}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def start(service: Service, core: str | None, timeout_s: float = 30.0,
          log: Path | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `service` (pinned to `core` with taskset when given) and wait until healthy; run
    from `cwd`, a checkout's own code is imported first."""
    argv = ["taskset", "-c", core, *service.argv] if core else service.argv
    out = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env={**os.environ, **service.env}, start_new_session=True,
                            cwd=cwd,
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not service.healthy():
        if time.monotonic() > deadline or proc.poll() is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            raise RuntimeError(f"{service.name} did not start" + (f" (log: {log})" if log else ""))
        time.sleep(0.1)
    return proc


def gateway(tmp: Path, upstream: str, port: int, *, model: str = "fake",
            writer_in_process: bool = False, pool: dict[str, object] | None = None,
            source: Path | None = None, routing: dict[str, object] | None = None) -> Service:
    """The llmops gateway in front of `upstream` (one URL, or several: one replica each)
    with auth (the bootstrap admin key `KEY`), limits (the local Redis) and the ledger (a
    SQLite store, spooled) on."""
    config = tmp / f"gateway-{port}.yaml"
    urls = upstream.split(",")
    config.write_text(yaml.safe_dump({
        "models": [{"name": model, "kind": "chat", "pools": [
            {"device": "cpu", "urls": urls, **(pool or {})}]}],
        **({"routing": routing} if routing else {}),
        "admin_key": KEY, "port": port, "log_level": "warning",
        "database_url": f"sqlite:///{tmp}/bench.db", "redis_prefix": f"bench-{port}",
        "ledger": {"spool_path": f"{tmp}/spool", "writer": writer_in_process}}))
    env = {"LLMOPS_CONFIG": str(config)}
    if source is not None:  # another checkout's gateway: its code first on the path
        env["PYTHONPATH"] = str(source)
    return Service("llmops", [sys.executable, "-m", "gateway"], port, "/readyz", env)


def ledger_writer(gateway: Service, core: str | None, cwd: Path | None = None
                  ) -> subprocess.Popen[bytes]:
    """The ledger writer for `gateway`'s spool, as a process of its own (pinned to `core`)."""
    argv = [sys.executable, "-m", "llmops.cli", "ledger-writer"]
    return subprocess.Popen(["taskset", "-c", core, *argv] if core else argv,
                            env={**os.environ, **gateway.env}, start_new_session=True,
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pgid: int) -> float:
    """User + system CPU time of the processes in process group `pgid` (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp; fields start at the state (field 3)
            total += int(fields[11]) + int(fields[12])
    return total / tick


async def latencies(session: aiohttp.ClientSession, url: str, body: bytes, n: int,
                    first_byte: bool = False) -> list[float]:
    """Seconds per request (or to the first byte of the body), `n` requests one after another."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers=_HEADERS) as resp:
            if first_byte:
                await resp.content.readany()
                out.append(time.perf_counter() - t0)
                await resp.read()
            else:
                await resp.read()
                out.append(time.perf_counter() - t0)
            assert resp.status == 200, resp.status
    return out


async def ttft(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, float, int]:
    """(time to the first content token, total time, content frames) of one stream; raises
    unless the stream parses as OpenAI chunks and ends with `data: [DONE]`."""
    t0 = time.perf_counter()
    first, frames, done = float("nan"), 0, False
    async with session.post(url, data=body, headers=_HEADERS) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: "):
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{url}: error frame {chunk['error']}")
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    frames += 1
                    if first != first:
                        first = time.perf_counter() - t0
    if not done or not frames:
        raise RuntimeError(f"{url}: stream without content or [DONE] ({frames} frames)")
    return first, time.perf_counter() - t0, frames


@dataclass
class Load:
    """What a closed loop did: requests answered 200, requests failed, seconds, latencies of the
    answered ones, completion tokens (from `usage`, when counted)."""
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    tokens: int = 0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


async def rate(url: str, concurrency: int, seconds: float | None = None, *,
               body: bytes = BODY, requests: int | None = None, count_tokens: bool = False,
               timeout_s: float = 60.0) -> Load:
    """`concurrency` connections each sending requests back to back, for `seconds` or until
    `requests` have been sent in all; failures (status, connection, timeout) are counted."""
    ok = errors = sent = tokens = 0
    lat: list[float] = []
    stop = time.perf_counter() + (seconds if seconds is not None else 1e9)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=timeout) as s:
        async def worker() -> None:
            nonlocal ok, errors, sent, tokens
            while time.perf_counter() < stop and (requests is None or sent < requests):
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with s.post(url, data=body, headers=_HEADERS) as resp:
                        data = await resp.read()
                        if resp.status != 200:
                            errors += 1
                            continue
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)
                ok += 1
                if count_tokens:
                    tokens += orjson.loads(data).get("usage", {}).get("completion_tokens", 0)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Load(ok, errors, time.perf_counter() - t0, lat, tokens)
