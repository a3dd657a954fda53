"""What a request costs with cached prompt tokens: their own price when an admin set one, the
input price when not, no prefill time on a self-hosted pool; reservations bound the cost
whatever the engine will find cached, and the usage record carries what it reported."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.inference.context import RequestContext
from gateway.inference.hooks import AdmissionHook
from gateway.inference.protocol import ChatCompletionRequest
from llmops.catalog import CatalogEntry
from llmops.settings import ModelConfig, PoolConfig
from tenancy.accounting import Accountant, PriceBook
from tenancy.ledger import UsageEvent
from tenancy.limits import Admission
from tenancy.pricing import Price, request_cost
from tenancy.tenants import Limits, Principal

# 3600 USD an hour: a second of device time costs a dollar.
POOL = PoolConfig(device="cpu", urls=["http://cpu-0:8000"], cost_per_hour_usd=3600.0,
                  prefill_tokens_per_s=1000.0, decode_tokens_per_s=100.0)
CHAT = ModelConfig(name="chat", kind="chat", pools=[POOL], context_length=2048)


def test_cached_tokens_cost_the_input_price_unless_one_is_set() -> None:
    unset = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    assert unset.cost(1000, 10, cached_tokens=768) == pytest.approx(unset.cost(1000, 10))
    assert unset.cost(1000, 10, cached_tokens=768) == pytest.approx((1000 * 2 + 10 * 8) / 1e6)
    cheap = Price(input_per_mtok=2.0, output_per_mtok=8.0, cached_input_per_mtok=0.5)
    assert cheap.cost(1000, 10, cached_tokens=768) == pytest.approx(
        (232 * 2.0 + 768 * 0.5 + 10 * 8.0) / 1e6)
    free = Price(input_per_mtok=2.0, output_per_mtok=8.0, cached_input_per_mtok=0.0)
    assert free.cost(1000, 0, cached_tokens=1000) == 0.0


def test_cached_tokens_take_no_prefill_time_on_a_self_hosted_pool() -> None:
    assert request_cost(None, POOL, 1000, 10) == pytest.approx((1.1, 1.1))
    assert request_cost(None, POOL, 1000, 10, 768) == pytest.approx((0.332, 0.332))
    # A model price wins over device time; device seconds are reported either way.
    price = Price(2.0, 8.0, cached_input_per_mtok=0.5)
    assert request_cost(price, POOL, 1000, 10, 768) == pytest.approx(
        ((232 * 2.0 + 768 * 0.5 + 10 * 8.0) / 1e6, 0.332))


def test_an_engine_reporting_more_cached_than_prompt_tokens_is_not_believed() -> None:
    price = Price(2.0, 8.0, cached_input_per_mtok=0.5)
    assert request_cost(price, POOL, 100, 0, 500) == request_cost(price, POOL, 100, 0, 100)


class Limiter:
    """Records what it is asked to reserve and settle (no Redis: the rule is under test)."""

    def __init__(self) -> None:
        self.reserved: list[float] = []
        self.settled: list[float] = []

    async def admit(self, who: Principal, tokens: int, cost: float) -> Admission:
        self.reserved.append(cost)
        return Admission()

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        self.settled.append(cost)


class Ledger:
    def __init__(self) -> None:
        self.events: list[UsageEvent] = []

    async def publish(self, event: UsageEvent) -> None:
        self.events.append(event)

    def submit(self, event: UsageEvent) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def served(price: Price | None, usage: dict[str, object]
                 ) -> tuple[Limiter, UsageEvent]:
    """One request admitted, answered by the engine with `usage`, and ended."""
    limiter, ledger, prices = Limiter(), Ledger(), PriceBook()
    if price is not None:
        prices.prices["chat"] = price
    accountant = Accountant(limiter, ledger, prices)  # type: ignore[arg-type]
    hook = AdmissionHook(accountant, None)
    parsed = ChatCompletionRequest(model="chat", max_tokens=10,
                                   messages=[{"role": "user", "content": "hi"}])
    ctx = RequestContext(Principal("key_a", "ten_a", "member", None, Limits(), Limits()),
                         uuid.uuid4().hex, "/v1/chat/completions", "chat", hook.after,
                         model="chat", body=b" " * 1000, parsed=parsed,
                         entry=CatalogEntry("chat", CHAT))
    await hook.before(ctx)
    ctx.pool, ctx.device = POOL, "cpu"
    ctx.usage_from(usage)
    ctx.close(200)
    await accountant.drain()
    return limiter, ledger.events[-1]


async def test_the_record_and_the_settled_cost_use_the_cached_price() -> None:
    price = Price(2.0, 8.0, cached_input_per_mtok=0.5)
    limiter, event = await served(price, {
        "prompt_tokens": 1000, "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 768}})
    assert (event.prompt_tokens, event.cached_tokens, event.completion_tokens) == (1000, 768, 10)
    assert event.cost_usd == pytest.approx((232 * 2.0 + 768 * 0.5 + 10 * 8.0) / 1e6)
    assert event.device_seconds == pytest.approx(0.332)
    assert limiter.settled == [event.cost_usd]
    # Without details (an engine that does not report them) nothing counts as cached.
    _, plain = await served(price, {"prompt_tokens": 1000, "completion_tokens": 10})
    assert plain.cached_tokens == 0
    assert plain.cost_usd == pytest.approx((1000 * 2.0 + 10 * 8.0) / 1e6)


async def test_reservations_bound_the_cost_whatever_the_engine_finds_cached() -> None:
    # Before the call nothing is known of the cache: the dearer of all or none cached.
    body_tokens, completion = 1000, 10  # the prompt's bound is the body's size
    for price in (Price(2.0, 8.0), Price(2.0, 8.0, cached_input_per_mtok=0.5),
                  Price(2.0, 8.0, cached_input_per_mtok=3.0)):
        limiter, event = await served(price, {
            "prompt_tokens": body_tokens, "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": body_tokens}})
        assert limiter.reserved == [pytest.approx(max(
            price.cost(body_tokens, completion), price.cost(body_tokens, completion,
                                                            body_tokens)))]
        assert limiter.reserved[0] >= event.cost_usd
