"""What a request costs.

Two sources, in this order: a price set for the model (USD per million prompt, cached prompt
and completion tokens, set through the admin API, as for a hosted model), or the price of the
device time it used on a self-hosted pool. Cached prompt tokens are those the engine found in
its prefix cache (`usage.prompt_tokens_details.cached_tokens`): they have a price of their
own, the prompt price unless one is set, and cost no prefill time. Device time is derived
from measured throughput:

    device_seconds = (prompt_tokens - cached_tokens) / prefill_tokens_per_s
                     + completion_tokens / decode_tokens_per_s
    cost_usd       = device_seconds * cost_per_hour_usd / 3600

with `cost_per_hour_usd`, `prefill_tokens_per_s` and `decode_tokens_per_s` configured per pool
(measure them with the benchmarks). Device seconds are reported per tenant either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmops.settings import PoolConfig

__all__ = ["Price", "device_seconds", "request_cost", "training_cost"]


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None  # None: as `input_per_mtok`
    training_per_mtok: float | None = None  # fine-tuning; None: the workers' device time

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
             ) -> float:
        cached = (self.input_per_mtok if self.cached_input_per_mtok is None
                  else self.cached_input_per_mtok)
        return ((prompt_tokens - cached_tokens) * self.input_per_mtok
                + cached_tokens * cached
                + completion_tokens * self.output_per_mtok) / 1e6


def device_seconds(pool: PoolConfig, prompt_tokens: int, completion_tokens: int,
                   cached_tokens: int = 0) -> float:
    return ((prompt_tokens - cached_tokens) / pool.prefill_tokens_per_s
            + completion_tokens / pool.decode_tokens_per_s)


def training_cost(price: Price | None, device_cost_per_hour_usd: float, trained_tokens: int,
                  device_seconds: float) -> float:
    """What fine-tuning cost: the model's training price per token trained on when it has
    one, else the fine-tuning workers' device time."""
    if price is not None and price.training_per_mtok is not None:
        return trained_tokens * price.training_per_mtok / 1e6
    return device_seconds * device_cost_per_hour_usd / 3600.0


def request_cost(price: Price | None, pool: PoolConfig | None, prompt_tokens: int,
                 completion_tokens: int, cached_tokens: int = 0) -> tuple[float, float]:
    """(cost in USD, device seconds) of one request; `cached_tokens` are part of
    `prompt_tokens`."""
    cached_tokens = min(cached_tokens, prompt_tokens)  # an engine's figure, not trusted blindly
    seconds = (device_seconds(pool, prompt_tokens, completion_tokens, cached_tokens)
               if pool else 0.0)
    if price is not None:
        return price.cost(prompt_tokens, completion_tokens, cached_tokens), seconds
    if pool is not None:
        return seconds * pool.cost_per_hour_usd / 3600.0, seconds
    return 0.0, seconds
