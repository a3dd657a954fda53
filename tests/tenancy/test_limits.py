"""Rate limits and budgets on the real Redis: exact under concurrency, settled to real usage,
and a documented behaviour when Redis is unreachable."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from llmops.errors import APIError, RateLimitError, ServiceUnavailableError
from llmops.settings import LedgerConfig, LimitsConfig
from llmops.store import Database
from tenancy.ledger import LedgerPublisher, LedgerWriter, UsageEvent
from tenancy.limits import Limiter
from tenancy.tenants import Limits, Principal

NONE = Limits()


def principal(key: Limits = NONE, tenant: Limits = NONE, name: str = "a") -> Principal:
    return Principal(f"key_{name}", f"ten_{name}", "member", None, key, tenant)


async def admit_many(limiter: Limiter, who: Principal, n: int, tokens: int = 1,
                     cost: float = 0.0) -> list[object]:
    return await asyncio.gather(*(limiter.admit(who, tokens, cost) for _ in range(n)),
                                return_exceptions=True)


async def test_rpm_is_exact_under_concurrency(redis: Redis, db: Database, prefix: str) -> None:
    limiter = Limiter(redis, db, prefix, LimitsConfig())
    results = await admit_many(limiter, principal(Limits(rpm=10)), 50)
    refused = [r for r in results if isinstance(r, RateLimitError)]
    assert len(results) - len(refused) == 10 and len(refused) == 40
    assert refused[0].headers is not None and int(refused[0].headers["retry-after"]) >= 1
    assert refused[0].status == 429 and refused[0].code == "rate_limit_exceeded"


async def test_tenant_limit_spans_its_keys(redis: Redis, db: Database, prefix: str) -> None:
    limiter = Limiter(redis, db, prefix, LimitsConfig())
    tenant = Limits(rpm=6)
    a = Principal("key_1", "ten_shared", "member", None, Limits(), tenant)
    b = Principal("key_2", "ten_shared", "member", None, Limits(), tenant)
    results = await asyncio.gather(*(limiter.admit(w, 1, 0) for w in [a, b] * 10),
                                   return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 6


async def test_tpm_reserves_then_settles_to_real_usage(redis: Redis, db: Database,
                                                        prefix: str) -> None:
    limiter = Limiter(redis, db, prefix, LimitsConfig())
    who = principal(Limits(tpm=1000))
    results = await admit_many(limiter, who, 5, tokens=300)
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert len(admitted) == 3  # 3 x 300 fits in 1000, a fourth does not
    assert admitted[0].headers["x-ratelimit-limit-tokens"] == "1000"  # type: ignore[attr-defined]
    for admission in admitted:
        await limiter.settle(admission, 50, 0.0)  # each really used 50 tokens
    # 3 x 250 tokens came back: two more 300-token requests fit now.
    assert len([r for r in await admit_many(limiter, who, 3, tokens=300)
                if not isinstance(r, Exception)]) == 2


async def test_a_request_larger_than_the_limit_is_refused_clearly(
        redis: Redis, db: Database, prefix: str) -> None:
    limiter = Limiter(redis, db, prefix, LimitsConfig())
    with pytest.raises(RateLimitError, match="Request too large"):
        await limiter.admit(principal(Limits(tpm=100)), 101, 0)


async def test_budget_cannot_be_overshot_by_concurrent_requests(
        redis: Redis, db: Database, prefix: str) -> None:
    limiter = Limiter(redis, db, prefix, LimitsConfig())
    who = principal(Limits(budget_usd=1.0, budget_period="day"))
    results = await admit_many(limiter, who, 20, cost=0.3)
    admitted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, APIError)]
    assert len(admitted) == 3
    assert all(r.code == "insufficient_quota" and r.type == "insufficient_quota"
               for r in refused)
    for admission in admitted:
        await limiter.settle(admission, 0, 0.25)  # 0.75 spent in all
    assert len([r for r in await admit_many(limiter, who, 5, cost=0.3)
                if not isinstance(r, Exception)]) == 0  # 0.75 + 0.3 > 1.0
    assert len([r for r in await admit_many(limiter, who, 5, cost=0.2)
                if not isinstance(r, Exception)]) == 1


async def test_spend_is_loaded_from_the_ledger_when_redis_lost_it(
        redis: Redis, db: Database, prefix: str) -> None:
    # 0.9 USD already spent today, as the ledger says; Redis knows nothing.
    publisher = LedgerPublisher(redis, prefix, spool=Path("/nonexistent"))
    await publisher.publish(UsageEvent("r1", "ten_a", "key_a", "/v1/chat/completions", "m",
                                       200, cost_usd=0.9))
    await LedgerWriter(redis, db, prefix, LedgerConfig(block_ms=10)).flush()
    limiter = Limiter(redis, db, prefix, LimitsConfig())
    who = principal(Limits(budget_usd=1.0, budget_period="day"))
    with pytest.raises(RateLimitError, match="budget"):
        await limiter.admit(who, 1, 0.2)
    await limiter.admit(who, 1, 0.05)


async def test_unreachable_redis_fails_open_for_limits_and_closed_for_budgets(
        db: Database) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2,
                          socket_connect_timeout=0.2)
    limiter = Limiter(dead, db, "x", LimitsConfig())
    await limiter.admit(principal(Limits(rpm=1)), 1, 0)  # served without a limit
    with pytest.raises(ServiceUnavailableError) as info:
        await limiter.admit(principal(Limits(rpm=1, budget_usd=5.0)), 1, 0.1)
    assert info.value.status == 503 and info.value.code == "budget_unavailable"
    strict = Limiter(dead, db, "x", LimitsConfig(fail_open=False))
    with pytest.raises(ServiceUnavailableError):
        await strict.admit(principal(Limits(rpm=1)), 1, 0)
    lenient = Limiter(dead, db, "x", LimitsConfig(budgets_fail_open=True))
    await lenient.admit(principal(Limits(budget_usd=5.0)), 1, 0.1)
    await dead.aclose()
