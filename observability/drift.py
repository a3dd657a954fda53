"""Drift detection: does a model's recent traffic still look like its reference window?

A sampled request leaves one small record in Redis, never its text: the embedding of its
prompt (from the platform's own embedding model), its output length, and whether its answer
was empty or a refusal, or failed. Per model (an adapter is a model of its own), the first
`window` records after start-up or a reset form the reference window; later ones a sliding
recent window of the same size. Every `interval_s` the windows are compared on four signals,
each a score and a threshold set for a false alarm rate `alpha`:

- prompt_embedding: squared maximum mean discrepancy (MMD², Gaussian kernel, bandwidth by the
  median heuristic; Gretton et al., JMLR 2012) between the windows' prompt embeddings;
  threshold: the 1 - alpha quantile of MMD² over random re-splits of the pooled embeddings
  (a permutation test), at least `min_mmd`.
- output_length: the two-sample Kolmogorov-Smirnov statistic of completion tokens;
  threshold: its asymptotic critical value at alpha.
- empty_or_refusal_rate, error_rate: how far the recent rate rose above the reference's;
  threshold: a one-sided two-proportion z bound at alpha, at least `min_rate_rise`.

Cost is bounded by the sample rate, the embedding queue (`max_pending`) and the window: one
comparison is a (2 x window)² kernel matrix and `permutations` quadratic forms over it.
Gateway replicas share the windows in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import struct
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.asyncio import Redis

from llmops.settings import DriftConfig

__all__ = [
    "SIGNALS",
    "Comparison",
    "DriftDetector",
    "DriftWindows",
    "Probe",
    "Record",
    "Signal",
    "compare",
    "is_empty_or_refusal",
    "ks_test",
    "mmd_test",
    "rate_rise",
]

log = logging.getLogger(__name__)

SIGNALS = ("prompt_embedding", "output_length", "empty_or_refusal_rate", "error_rate")
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]
ReferenceSource = Literal["recent", "next"]

_OUTPUT_CHARS = 200  # of an answer, enough to tell a refusal
_PROMPT_CHARS = 2000  # of a prompt, to embed (the embedding model truncates anyway)
_EMBED_BATCH = 64
_FLUSH_S = 1.0
_STOP_S = 5.0
_EMBED_TRIES = 3  # flush rounds a batch waits for the embedding model before going without
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|i apologi[sz]e|sorry, (?:but )?i"
    r"|i(?: a|')m (?:not able|unable) to|i (?:can ?not|can't|won't|will not) "
    r"(?:help|assist|provide|do|comply|answer|fulfil|share|create|write)|as an ai\b)",
    re.IGNORECASE)


def is_empty_or_refusal(text: str) -> bool:
    """An answer with no text, or one that opens by declining."""
    text = text.strip().replace("\u2019", "'")
    return not text or _REFUSAL.match(text) is not None


@dataclass
class Probe:
    """What one sampled request leaves for drift detection, filled in as it runs."""

    prompt: str
    output: str = ""

    def add_output(self, text: str) -> None:
        if len(self.output) < _OUTPUT_CHARS:
            self.output += text[: _OUTPUT_CHARS - len(self.output)]


_HEADER = struct.Struct("<IB")
_EMPTY, _FAILED = 1, 2


@dataclass(frozen=True)
class Record:
    """One sampled request as stored: no text, a few hundred bytes."""

    output_tokens: int
    empty_or_refusal: bool
    failed: bool
    embedding: NDArray[np.float16] | None = None

    def encode(self) -> bytes:
        flags = (_EMPTY if self.empty_or_refusal else 0) | (_FAILED if self.failed else 0)
        head = _HEADER.pack(min(self.output_tokens, 2**32 - 1), flags)
        return head if self.embedding is None else head + self.embedding.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> Record:
        tokens, flags = _HEADER.unpack_from(data)
        rest = data[_HEADER.size:]
        return cls(tokens, bool(flags & _EMPTY), bool(flags & _FAILED),
                   np.frombuffer(rest, dtype=np.float16) if rest else None)


@dataclass(frozen=True)
class Signal:
    score: float
    threshold: float
    method: str

    @property
    def drifted(self) -> bool:
        return self.score > self.threshold


@dataclass(frozen=True)
class Comparison:
    """The signals of one model's windows, as last compared."""

    reference: int
    recent: int
    computed_at: float
    signals: dict[str, Signal] = field(default_factory=dict)


# The statistics, on plain arrays.

def mmd_test(x: NDArray[Any], y: NDArray[Any], alpha: float, permutations: int,
             rng: np.random.Generator) -> tuple[float, float]:
    """MMD² (biased estimate) of samples `x` and `y` (rows), and its 1 - alpha quantile
    under the null hypothesis, from random re-splits of the pooled rows."""
    z = np.concatenate([x, y]).astype(np.float64)
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    median = float(np.median(d2[np.triu_indices(len(z), 1)]))
    kernel = np.exp(-d2 / median) if median > 0 else np.ones_like(d2)
    # MMD² = wᵀKw with w = 1/n on x's rows and -1/m on y's; a permutation shuffles w.
    w = np.concatenate([np.full(len(x), 1.0 / len(x)), np.full(len(y), -1.0 / len(y))])
    ws = np.vstack([w, rng.permuted(np.tile(w, (permutations, 1)), axis=1)])
    stats = np.einsum("pi,pi->p", ws @ kernel, ws)
    return float(stats[0]), float(np.quantile(stats[1:], 1.0 - alpha))


def ks_test(a: NDArray[Any], b: NDArray[Any], alpha: float) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic and its critical value at alpha."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    gap = (np.searchsorted(a, grid, side="right") / len(a)
           - np.searchsorted(b, grid, side="right") / len(b))
    n, m = len(a), len(b)
    return float(np.max(np.abs(gap))), math.sqrt(-math.log(alpha / 2) / 2 * (n + m) / (n * m))


def rate_rise(reference: NDArray[np.bool_], recent: NDArray[np.bool_], alpha: float,
              floor: float) -> tuple[float, float]:
    """How far the recent rate rose above the reference's, and the rise a one-sided
    two-proportion z test at alpha would call significant (at least `floor`)."""
    n, m = len(reference), len(recent)
    p0, p1 = float(reference.mean()), float(recent.mean())
    pooled = (p0 * n + p1 * m) / (n + m)
    bound = NormalDist().inv_cdf(1 - alpha) * math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m))
    return max(0.0, p1 - p0), max(bound, floor)


def compare(reference: list[Record], recent: list[Record], config: DriftConfig,
            rng: np.random.Generator) -> dict[str, Signal]:
    """Every signal both windows have enough samples for."""
    out: dict[str, Signal] = {}
    if min(len(reference), len(recent)) < config.min_samples:
        return out
    # Only embeddings of the current embedding model's size count (the model may change).
    size = next((len(r.embedding) for r in recent if r.embedding is not None), 0)
    x = [r.embedding for r in reference if r.embedding is not None and len(r.embedding) == size]
    y = [r.embedding for r in recent if r.embedding is not None and len(r.embedding) == size]
    if size and min(len(x), len(y)) >= config.min_samples:
        score, null = mmd_test(np.stack(x), np.stack(y), config.alpha, config.permutations, rng)
        out["prompt_embedding"] = Signal(score, max(null, config.min_mmd), "mmd2_permutation")
    a, b = (np.array([r.output_tokens for r in w if not r.failed], dtype=np.float64)
            for w in (reference, recent))
    if min(len(a), len(b)) >= config.min_samples:
        out["output_length"] = Signal(*ks_test(a, b, config.alpha), "kolmogorov_smirnov")
    for name, flag in (("empty_or_refusal_rate", _empty_answer), ("error_rate", _failed)):
        p, q = (np.array([flag(r) for r in w], dtype=np.bool_) for w in (reference, recent))
        out[name] = Signal(*rate_rise(p, q, config.alpha, config.min_rate_rise),
                           "two_proportion_z")
    return out


def _empty_answer(r: Record) -> bool:
    return r.empty_or_refusal and not r.failed


def _failed(r: Record) -> bool:
    return r.failed


# Redis: the windows every gateway replica shares.

# KEYS: reference, recent, meta. ARGV: window, now, records... The reference fills first
# (oldest first); once full, records go to the recent window (newest first, trimmed).
_PUSH = """
local window = tonumber(ARGV[1])
for i = 3, #ARGV do
  local n = redis.call('LLEN', KEYS[1])
  if n < window then
    redis.call('RPUSH', KEYS[1], ARGV[i])
    if n + 1 == window then redis.call('HSET', KEYS[3], 'complete_at', ARGV[2]) end
  else
    redis.call('LPUSH', KEYS[2], ARGV[i])
  end
end
redis.call('LTRIM', KEYS[2], 0, window - 1)
"""
# KEYS: reference, recent, meta. ARGV: now, source. `recent`: the recent window becomes the
# reference; `next`: both are emptied and the next records form the reference.
_RESET = """
redis.call('DEL', KEYS[1])
if ARGV[2] == 'recent' then
  local rows = redis.call('LRANGE', KEYS[2], 0, -1)
  for i = #rows, 1, -1 do redis.call('RPUSH', KEYS[1], rows[i]) end
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[3], 'set_at', ARGV[1])
"""


class DriftWindows:
    """Each model's reference and recent windows of records, in Redis."""

    def __init__(self, redis: Redis, prefix: str, window: int) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:drift"
        self.window = window
        self._push = redis.register_script(_PUSH)
        self._reset = redis.register_script(_RESET)

    def _keys(self, model: str) -> list[str]:
        return [f"{self.prefix}:{model}:{part}" for part in ("reference", "recent", "meta")]

    async def push(self, model: str, records: list[Record]) -> None:
        await self.redis.sadd(f"{self.prefix}:models", model)
        await self._push(self._keys(model),
                         [self.window, time.time(), *(r.encode() for r in records)])

    async def models(self) -> list[str]:
        members = await self.redis.smembers(f"{self.prefix}:models")
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def read(self, model: str) -> tuple[list[Record], list[Record], dict[str, float]]:
        """The reference (oldest first), the recent window (newest first), and when the
        reference was set and completed (unix seconds)."""
        reference, recent, meta = self._keys(model)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrange(reference, 0, -1)
            pipe.lrange(recent, 0, -1)
            pipe.hgetall(meta)
            ref_rows, recent_rows, times = await pipe.execute()
        return ([Record.decode(r) for r in ref_rows], [Record.decode(r) for r in recent_rows],
                {k.decode(): float(v) for k, v in times.items()})

    async def reset(self, model: str, source: ReferenceSource) -> None:
        await self.redis.sadd(f"{self.prefix}:models", model)
        await self._reset(self._keys(model), [time.time(), source])


class DriftDetector:
    """Samples requests, embeds their prompts in batches, keeps the windows and compares them
    in the background; a Prometheus collector of the last comparison."""

    def __init__(self, config: DriftConfig, windows: DriftWindows, embed: Embed | None) -> None:
        self.config = config
        self.windows = windows
        self.embed = embed
        self.results: dict[str, Comparison] = {}
        self.dropped = 0
        self._queue: deque[tuple[str, Probe, int, bool]] = deque()
        self._rng = np.random.default_rng()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._embed_failures = 0

    # On the request path: cheap, never raising.

    def sampled(self) -> bool:
        return self.config.enabled and random.random() < self.config.sample_rate

    def record(self, model: str, probe: Probe, output_tokens: int, failed: bool) -> None:
        if len(self._queue) >= self.config.max_pending:
            self.dropped += 1
            return
        self._queue.append((model, probe, output_tokens, failed))

    # In the background.

    async def flush(self) -> None:
        """Embed the queued prompts and append their records to their models' windows."""
        while self._queue:
            batch = [self._queue.popleft()
                     for _ in range(min(_EMBED_BATCH, len(self._queue)))]
            embeddings: list[NDArray[np.float16] | None] = [None] * len(batch)
            if self.embed is not None:
                try:
                    vectors = await self.embed([p.prompt[:_PROMPT_CHARS] or " "
                                                for _, p, _, _ in batch])
                    embeddings = [np.asarray(v, dtype=np.float16) for v in vectors]
                    self._embed_failures = 0
                except Exception as exc:
                    self._embed_failures += 1
                    log.warning("drift: prompt embeddings failed (%d in a row): %s",
                                self._embed_failures, exc)
                    if self._embed_failures < _EMBED_TRIES:  # a blip: try again next round
                        self._queue.extendleft(reversed(batch))
                        return
                    # The embedding model stays away: the other signals still count.
            by_model: dict[str, list[Record]] = defaultdict(list)
            for (model, probe, tokens, failed), emb in zip(batch, embeddings, strict=True):
                by_model[model].append(Record(tokens, is_empty_or_refusal(probe.output),
                                              failed, emb))
            for model, records in by_model.items():
                await self.windows.push(model, records)

    async def compare(self) -> None:
        for model in await self.windows.models():
            reference, recent, _ = await self.windows.read(model)
            signals = await asyncio.to_thread(compare, reference, recent, self.config,
                                              self._rng)
            self.results[model] = Comparison(len(reference), len(recent), time.time(), signals)

    async def reset(self, model: str, source: ReferenceSource) -> None:
        """Set the reference window: the recent one now, or the next `window` records."""
        await self.windows.reset(model, source)
        self.results.pop(model, None)

    async def report(self) -> list[dict[str, Any]]:
        """Every model's windows and signals, for `/admin/drift`."""
        out = []
        for model in await self.windows.models():
            reference, recent, times = await self.windows.read(model)
            last = self.results.get(model)
            out.append({
                "model": model,
                "reference": {"samples": len(reference), "set_at": times.get("set_at"),
                              "complete_at": times.get("complete_at")},
                "recent": {"samples": len(recent)},
                "computed_at": last.computed_at if last else None,
                "signals": {name: {"score": s.score, "threshold": s.threshold,
                                   "drifted": s.drifted, "method": s.method}
                            for name, s in (last.signals if last else {}).items()},
            })
        return out

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """End the background work, keeping what was sampled (bounded: shutdown must not
        wait on a slow Redis or embedding engine)."""
        self._stopping = True  # ends the loop even if a client library swallowed the cancel
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=_STOP_S)
            self._task = None
        try:
            async with asyncio.timeout(_STOP_S):
                await self.flush()
        except Exception as exc:
            log.warning("drift: samples lost at shutdown: %r", exc)

    async def _run(self) -> None:
        due = time.monotonic()
        while not self._stopping:
            try:
                await self.flush()
                if time.monotonic() >= due:
                    due = time.monotonic() + self.config.interval_s
                    await self.compare()
            except Exception as exc:  # a round may fail (Redis away); the next one runs
                log.warning("drift detection round failed: %s", exc)
            await asyncio.sleep(min(_FLUSH_S, self.config.interval_s))

    # The Prometheus collector.

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("llmops_drift_score",
                              "How far recent traffic is from the reference window.",
                              labels=["model", "signal"]),
            GaugeMetricFamily("llmops_drift_threshold",
                              "The score over which a signal has drifted.",
                              labels=["model", "signal"]),
            GaugeMetricFamily("llmops_drift_window_samples", "Samples in each drift window.",
                              labels=["model", "window"]),
        )

    def collect(self) -> Iterable[Metric]:
        score, threshold, samples = self._families()
        for model, result in self.results.items():
            samples.add_metric([model, "reference"], result.reference)
            samples.add_metric([model, "recent"], result.recent)
            for name, signal in result.signals.items():
                score.add_metric([model, name], signal.score)
                threshold.add_metric([model, name], signal.threshold)
        return [score, threshold, samples]
