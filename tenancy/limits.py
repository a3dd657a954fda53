"""Rate limits and budgets, enforced in Redis with Lua scripts so that they hold exactly across
any number of gateway processes.

Rate limits are token buckets refilled continuously (capacity = the per-minute limit). One
script checks every bucket a request touches (key and tenant, requests and tokens) and takes
from all of them or from none. Tokens are reserved as prompt tokens + the completion budget
before the call and settled to vLLM's reported usage after it.

Budgets keep, per key and tenant and period, the spend settled so far and the cost reserved by
requests in flight; a request is admitted only if spent + reserved + its own worst-case cost
fits the budget, so concurrent requests cannot overshoot. A spend counter missing from Redis
(first use in a period, or Redis restarted empty) is loaded from the ledger first. Tenants'
budgets and spend are also read for the metrics (`Limiter.tenant_budgets`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select

from llmops.errors import APIError, RateLimitError, ServiceUnavailableError
from llmops.settings import LimitsConfig
from llmops.store import Database, Tenant
from tenancy.ledger import spend_since
from tenancy.tenants import Principal

__all__ = ["Admission", "BudgetUse", "LimitExceededError", "Limiter", "period_start"]

# KEYS: bucket keys. ARGV: pairs of (capacity per minute, cost). Returns {1, remaining...}
# when every bucket had room (all are debited), else {0, index, seconds until it would}.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local levels = {}
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  local cost = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(state[1]) or cap
  local ts = tonumber(state[2]) or now
  level = math.min(cap, level + (now - ts) * cap / 60)
  if level < cost then
    return {0, i, tostring((cost - level) * 60 / cap)}
  end
  levels[i] = level
end
local out = {1}
for i, key in ipairs(KEYS) do
  local left = levels[i] - tonumber(ARGV[2 * i])
  redis.call('HSET', key, 'level', tostring(left), 'ts', tostring(now))
  redis.call('EXPIRE', key, 120)
  out[i + 1] = tostring(left)
end
return out
"""

# KEYS: bucket keys. ARGV: pairs of (capacity, amount to give back; negative takes more).
_ADJUST = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  local state = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(state[1]) or cap
  local ts = tonumber(state[2]) or now
  level = math.min(cap, level + (now - ts) * cap / 60 + tonumber(ARGV[2 * i]))
  redis.call('HSET', key, 'level', tostring(level), 'ts', tostring(now))
  redis.call('EXPIRE', key, 120)
end
return 1
"""

# KEYS: per scope (spent, reserved). ARGV: per scope (budget, reservation, ttl seconds).
# Returns {1} and reserves everywhere, {0, index} over budget, {-1, index} spent unknown.
_RESERVE = """
for i = 1, #KEYS / 2 do
  local spent = redis.call('GET', KEYS[2 * i - 1])
  if not spent then return {-1, i} end
  local reserved = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local budget = tonumber(ARGV[3 * i - 2])
  if tonumber(spent) + reserved + tonumber(ARGV[3 * i - 1]) > budget then return {0, i} end
end
for i = 1, #KEYS / 2 do
  redis.call('INCRBYFLOAT', KEYS[2 * i], ARGV[3 * i - 1])
  redis.call('EXPIRE', KEYS[2 * i], tonumber(ARGV[3 * i]))
end
return {1}
"""

# KEYS: spend counters. ARGV: cost. Adds to the counters that exist (a missing one is loaded
# from the ledger, which already holds the cost, when it is next needed).
_CHARGE = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBYFLOAT', key, ARGV[1]) end
end
return 1
"""

# KEYS: per scope (spent, reserved). ARGV: reservation, actual cost, ttl seconds.
_SETTLE = """
for i = 1, #KEYS / 2 do
  redis.call('INCRBYFLOAT', KEYS[2 * i], -tonumber(ARGV[1]))
  if redis.call('EXISTS', KEYS[2 * i - 1]) == 1 then
    redis.call('INCRBYFLOAT', KEYS[2 * i - 1], ARGV[2])
    redis.call('EXPIRE', KEYS[2 * i - 1], tonumber(ARGV[3]))
  end
end
return 1
"""


class LimitExceededError(RateLimitError):
    """A 429 from the limiter; `reason` (rate_limit, token_limit or budget) says which kind
    of limit refused the request, as a bounded metric label."""

    def __init__(self, message: str, *, reason: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason


def period_start(period: str, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _period_id(period: str, now: datetime) -> str:
    return now.strftime("%Y%m%d" if period == "day" else "%Y%m")


def _ttl_s(period: str) -> int:
    """How long a period's counters are kept: a little over the period."""
    return 2 * 86400 if period == "day" else 32 * 86400


@dataclass(frozen=True)
class BudgetUse:
    """A tenant's budget for the current period and what it has spent of it (settled)."""

    tenant_id: str
    budget_usd: float
    spent_usd: float


@dataclass(frozen=True)
class _Bucket:
    key: str
    capacity: int
    kind: str  # requests | tokens
    scope: str  # key | tenant


@dataclass(frozen=True)
class _Budget:
    spent: str
    reserved: str
    budget: float
    column: str  # key_id | tenant_id
    owner: str
    start: datetime
    ttl_s: int


@dataclass
class Admission:
    """What a request reserved; settled once when it ends."""

    token_buckets: list[_Bucket] = field(default_factory=list)
    reserved_tokens: int = 0
    budgets: list[_Budget] = field(default_factory=list)
    reserved_cost: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class Limiter:
    def __init__(self, redis: Redis, db: Database, prefix: str, config: LimitsConfig) -> None:
        self.redis = redis
        self.db = db
        self.prefix = prefix
        self.config = config
        self._take = redis.register_script(_TAKE)
        self._adjust = redis.register_script(_ADJUST)
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._charge = redis.register_script(_CHARGE)

    def _buckets(self, who: Principal, tokens: int) -> list[tuple[_Bucket, int]]:
        out = []
        for scope, owner, limits in (("key", who.key_id, who.key_limits),
                                     ("tenant", who.tenant_id, who.tenant_limits)):
            if limits.rpm:
                out.append((_Bucket(f"{self.prefix}:rl:{owner}:r", limits.rpm, "requests",
                                    scope), 1))
            if limits.tpm:
                out.append((_Bucket(f"{self.prefix}:rl:{owner}:t", limits.tpm, "tokens",
                                    scope), tokens))
        return out

    def _budgets(self, who: Principal) -> list[_Budget]:
        now = datetime.now(UTC)
        out = []
        for column, owner, limits in (("key_id", who.key_id, who.key_limits),
                                      ("tenant_id", who.tenant_id, who.tenant_limits)):
            if limits.budget_usd is None:
                continue
            base = self._budget_key(owner, limits.budget_period, now)
            out.append(_Budget(f"{base}:spent", f"{base}:reserved", limits.budget_usd, column,
                               owner, period_start(limits.budget_period, now),
                               _ttl_s(limits.budget_period)))
        return out

    def _budget_key(self, owner: str, period: str, now: datetime) -> str:
        return f"{self.prefix}:budget:{owner}:{_period_id(period, now)}"

    async def tenant_budgets(self) -> list[BudgetUse]:
        """Every enabled tenant that has a budget, with its spend this period: one query and
        one MGET; a counter Redis lacks is loaded from the ledger as admission would load it,
        so the ledger is read once per tenant and period, not at every call."""
        now = datetime.now(UTC)
        query = select(Tenant.id, Tenant.budget_usd, Tenant.budget_period).where(
            Tenant.budget_usd.is_not(None), Tenant.disabled_at.is_(None))
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        if not rows:
            return []
        keys = [f"{self._budget_key(tenant, period, now)}:spent" for tenant, _, period in rows]
        out = []
        for (tenant, budget, period), key, value in zip(
                rows, keys, await self.redis.mget(keys), strict=True):
            if value is None:
                spent = await spend_since(self.db, "tenant_id", tenant,
                                          period_start(period, now))
                await self.redis.set(key, repr(spent), nx=True, ex=_ttl_s(period))
            else:
                spent = float(value)
            out.append(BudgetUse(tenant, float(budget or 0), spent))  # never None here
        return out

    async def admit(self, who: Principal, tokens: int, cost: float) -> Admission:
        """Reserve `tokens` and `cost` for one request, or raise 429 (or 503 when Redis is
        unreachable and the configuration says to fail closed)."""
        admission = Admission()
        buckets = self._buckets(who, tokens)
        if buckets:
            try:
                await self._take_buckets(buckets, admission)
            except RedisError:
                if not self.config.fail_open:
                    raise ServiceUnavailableError(
                        "Rate limits cannot be checked right now. Try again shortly.",
                        code="limits_unavailable") from None
                admission.token_buckets = []
        budgets = self._budgets(who)
        if budgets:
            try:
                await self._reserve_budgets(budgets, cost)
                admission.budgets, admission.reserved_cost = budgets, cost
            except RedisError:
                if not self.config.budgets_fail_open:
                    await self._give_back_tokens(admission)
                    raise ServiceUnavailableError(
                        "Budgets cannot be checked right now. Try again shortly.",
                        code="budget_unavailable") from None
            except APIError:
                await self._give_back_tokens(admission)
                raise
        return admission

    async def _take_buckets(self, buckets: list[tuple[_Bucket, int]], admission: Admission
                            ) -> None:
        for bucket, cost in buckets:
            if cost > bucket.capacity:
                raise LimitExceededError(
                    f"Request too large: it may use up to {cost} tokens, over the {bucket.scope}"
                    f"'s limit of {bucket.capacity} tokens per minute. Lower max_tokens.",
                    reason="token_limit", code="rate_limit_exceeded")
        argv: list[int] = []
        for bucket, cost in buckets:
            argv += [bucket.capacity, cost]
        result = await self._take(keys=[b.key for b, _ in buckets], args=argv)
        if int(result[0]) == 0:
            bucket = buckets[int(result[1]) - 1][0]
            wait = float(result[2])
            raise LimitExceededError(
                f"Rate limit reached for {bucket.kind} per minute on this {bucket.scope}: "
                f"limit {bucket.capacity}. Try again in {wait:.1f}s.",
                reason="rate_limit" if bucket.kind == "requests" else "token_limit",
                code="rate_limit_exceeded",
                headers={"retry-after": str(max(1, int(wait + 0.999))),
                         **_limit_headers(buckets, None)})
        remaining = [float(r) for r in result[1:]]
        admission.headers = _limit_headers(buckets, remaining)
        admission.token_buckets = [b for b, _ in buckets if b.kind == "tokens"]
        admission.reserved_tokens = next((c for b, c in buckets if b.kind == "tokens"), 0)

    async def _reserve_budgets(self, budgets: list[_Budget], cost: float) -> None:
        keys = [k for b in budgets for k in (b.spent, b.reserved)]
        argv = [v for b in budgets for v in (b.budget, cost, b.ttl_s)]
        for _ in range(3):
            result = await self._reserve(keys=keys, args=argv)
            status, index = int(result[0]), int(result[1]) if len(result) > 1 else 0
            if status == 1:
                return
            budget = budgets[index - 1]
            if status == 0:
                scope = "key" if budget.column == "key_id" else "tenant"
                raise LimitExceededError(
                    f"You exceeded the budget of this {scope}: {budget.budget:.4f} USD for the "
                    "current period.", reason="budget", code="insufficient_quota",
                    type_="insufficient_quota")
            # The period's spend is not in Redis yet: load it from the ledger, once.
            spent = await spend_since(self.db, budget.column, budget.owner, budget.start)
            await self.redis.set(budget.spent, repr(spent), nx=True, ex=budget.ttl_s)
        raise ServiceUnavailableError("Budget state is unavailable.", code="budget_unavailable")

    async def check_budget(self, who: Principal, cost: float, what: str) -> None:
        """Raise 429 `insufficient_quota` when `cost` (of work about to be created, e.g. a
        fine-tuning job's estimate, described by `what`) does not fit the key's or tenant's
        remaining budget. Nothing stays reserved: the work is billed as it runs."""
        budgets = self._budgets(who)
        if not budgets:
            return
        try:
            await self._reserve_budgets(budgets, cost)
        except LimitExceededError as exc:
            raise LimitExceededError(f"{what} does not fit the remaining budget. {exc.message}",
                                     reason="budget", code="insufficient_quota",
                                     type_="insufficient_quota") from None
        except RedisError:
            if not self.config.budgets_fail_open:
                raise ServiceUnavailableError("Budgets cannot be checked right now. Try again "
                                              "shortly.", code="budget_unavailable") from None
            return
        await self.settle(Admission(budgets=budgets, reserved_cost=cost), 0, 0.0)

    async def charge(self, tenant_id: str, key_id: str, cost: float) -> None:
        """Add spend that bypassed admission (training, billed by workers as it runs) to the
        key's and tenant's budget counters of this day and month."""
        if cost == 0:
            return
        now = datetime.now(UTC)
        keys = [f"{self._budget_key(owner, period, now)}:spent"
                for owner in (key_id, tenant_id) for period in ("day", "month")]
        # On failure the spend is still in the ledger, and reloaded when Redis returns empty.
        with contextlib.suppress(RedisError):
            await self._charge(keys=keys, args=[repr(cost)])

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        """Replace the reservation with what the request really used."""
        try:
            if admission.token_buckets:
                refund = admission.reserved_tokens - tokens
                if refund:
                    argv: list[int] = []
                    for b in admission.token_buckets:
                        argv += [b.capacity, refund]
                    await self._adjust(keys=[b.key for b in admission.token_buckets],
                                       args=argv)
            if admission.budgets:
                keys = [k for b in admission.budgets for k in (b.spent, b.reserved)]
                ttl = max(b.ttl_s for b in admission.budgets)
                await self._settle(keys=keys, args=[admission.reserved_cost, cost, ttl])
        except RedisError:
            # Spend is durable in the ledger and reloaded from it when Redis returns empty.
            pass

    async def _give_back_tokens(self, admission: Admission) -> None:
        await self.settle(Admission(token_buckets=admission.token_buckets,
                                    reserved_tokens=admission.reserved_tokens), 0, 0.0)


def _limit_headers(buckets: list[tuple[_Bucket, int]], remaining: list[float] | None
                   ) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest bucket of each kind."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        of_kind = [(b, (remaining[i] if remaining else 0.0))
                   for i, (b, _) in enumerate(buckets) if b.kind == kind]
        if not of_kind:
            continue
        bucket, left = min(of_kind, key=lambda x: x[1])
        reset = (bucket.capacity - max(left, 0.0)) * 60 / bucket.capacity
        headers[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(left)))
        headers[f"x-ratelimit-reset-{kind}"] = f"{reset:.3f}s"
    return headers


