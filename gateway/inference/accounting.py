"""Per-request accounting: reserve limits and budget before the call, then settle them and
publish exactly one usage record when the request ends, however it ends.

Settling and publishing run in background tasks so that the response never waits on Redis.
Token estimates before the call are upper bounds (so budgets cannot be overshot): the prompt is
counted as its request body's byte length (a token is at least one byte, and the JSON around
each message outweighs the chat template's special tokens), capped at the model's context
length; the completion as `max_completion_tokens` / `max_tokens` (else the context length)
times the number of choices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from guardrails.events import Tally, log_events
from guardrails.outputs import OutputFilter
from llmops.catalog import CatalogEntry
from llmops.errors import ServiceUnavailableError
from llmops.settings import PoolConfig
from observability.drift import DriftDetector, Probe
from tenancy.ledger import LedgerPublisher, UsageEvent
from tenancy.limits import Admission, Limiter, LimitExceededError
from tenancy.pricing import Price, request_cost
from tenancy.tenants import Principal

__all__ = ["Account", "Accountant", "PriceBook", "RequestObserver", "SseUsageTap"]

log = logging.getLogger(__name__)


class PriceBook:
    """Model prices set by admins, cached in the gateway (refreshed by the app)."""

    def __init__(self) -> None:
        self.prices: dict[str, Price] = {}

    def price(self, entry: CatalogEntry) -> Price | None:
        return self.prices.get(entry.name) or self.prices.get(entry.base.name)


class RequestObserver(Protocol):
    """Sees each request's life (the gateway's metrics). Called on the request path: every
    method must be cheap and must not raise. `model` is the catalog name, never the raw one."""

    def admitted(self, model: str) -> None: ...

    def rejected(self, reason: str, tenant_id: str) -> None: ...

    def retried(self, model: str) -> None: ...

    def dispatched(self, model: str, pool: PoolConfig) -> None: ...

    def finished(self, event: UsageEvent, model: str | None, pool: PoolConfig | None,
                 admitted: bool) -> None: ...


@dataclass
class Account:
    accountant: Accountant
    who: Principal
    request_id: str
    endpoint: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    created_at: float = field(default_factory=time.time)
    entry: CatalogEntry | None = None
    admission: Admission | None = None
    pool: PoolConfig | None = None
    device: str | None = None
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)  # the choices', as they end
    probe: Probe | None = None  # set when drift detection samples this request
    guardrails: Tally = field(default_factory=Tally)  # what guardrails did to it
    started_record: asyncio.Future[None] | None = None  # the start record, once durable
    closed: bool = False

    def first_byte(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000

    def usage_from(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def note_finish(self, choices: object) -> None:
        """Keep the finish reasons of an answer's (or a stream chunk's) choices."""
        if isinstance(choices, list):
            self.finish_reasons += [c["finish_reason"] for c in choices
                                    if isinstance(c, dict) and c.get("finish_reason")]

    def close(self, status: int) -> None:
        """End the request: settle its reservation and publish its record (once)."""
        if self.closed:
            return
        self.closed = True
        self.accountant.finish(self, status)


class Accountant:
    def __init__(self, limiter: Limiter, publisher: LedgerPublisher, prices: PriceBook,
                 observer: RequestObserver | None = None,
                 drift: DriftDetector | None = None) -> None:
        self.limiter = limiter
        self.publisher = publisher
        self.prices = prices
        self.observer = observer
        self.drift = drift
        self._pending: set[asyncio.Task[None]] = set()

    def open(self, who: Principal, request_id: str, endpoint: str) -> Account:
        return Account(self, who, request_id, endpoint, model="")

    async def admit(self, account: Account, entry: CatalogEntry, parsed: OpenAIRequest,
                    body_size: int) -> Admission:
        account.entry = entry
        prompt, completion = estimate_tokens(entry, parsed, body_size)
        cost = max(request_cost(self.prices.price(entry), pool, prompt, completion)[0]
                   for pool in entry.base.pools)  # the dearest pool it may land on
        try:
            account.admission = await self.limiter.admit(account.who, prompt + completion, cost)
        except (LimitExceededError, ServiceUnavailableError) as exc:
            if self.observer is not None:
                reason = exc.reason if isinstance(exc, LimitExceededError) else "unavailable"
                self.observer.rejected(reason, account.who.tenant_id)
            raise
        if self.observer is not None:
            self.observer.admitted(entry.name)
        if (self.drift is not None and entry.base.kind == "chat" and self.drift.sampled()
                and (text := prompt_text(parsed)) is not None):
            account.probe = Probe(text)
        # The start record goes out while the model is called (Proxy awaits it before
        # answering): a gateway killed mid-request still leaves a record.
        account.started_record = self.publisher.submit(self._event(account, status=0,
                                                                   final=False))
        return account.admission

    def _event(self, account: Account, status: int, final: bool) -> UsageEvent:
        price = self.prices.price(account.entry) if account.entry else None
        cost, seconds = request_cost(price, account.pool, account.prompt_tokens,
                                     account.completion_tokens)
        return UsageEvent(
            request_id=account.request_id, tenant_id=account.who.tenant_id,
            key_id=account.who.key_id, endpoint=account.endpoint, model=account.model[:256],
            adapter=account.entry.adapter if account.entry else None, status=status,
            prompt_tokens=account.prompt_tokens, completion_tokens=account.completion_tokens,
            latency_ms=(time.perf_counter() - account.started) * 1000,
            ttft_ms=account.ttft_ms, pool=account.device, cost_usd=cost,
            device_seconds=seconds, created_at=account.created_at, final=final,
            guardrails=account.guardrails.records())

    def finish(self, account: Account, status: int) -> None:
        event = self._event(account, status, final=True)
        if account.guardrails:
            log_events(account.guardrails, account.request_id, account.who.tenant_id,
                       account.who.key_id)
        if account.started_record is not None:  # a failure there is the end record's to tell
            account.started_record.add_done_callback(_quiet)
        task = asyncio.get_running_loop().create_task(
            self._settle(account.admission, event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        # Answers and failures of the model count; refusals by limits or clients that left do not.
        if account.probe is not None and self.drift is not None and account.entry is not None \
                and (status == 200 or status >= 500):
            self.drift.record(account.entry.name, account.probe, account.completion_tokens,
                              failed=status >= 500)
        if self.observer is not None:
            try:
                self.observer.finished(event, account.entry.name if account.entry else None,
                                       account.pool, account.admission is not None)
            except Exception:  # metrics must never fail a request
                log.exception("request observer failed")

    async def _settle(self, admission: Admission | None, event: UsageEvent) -> None:
        try:
            if admission is not None:
                await self.limiter.settle(
                    admission, event.prompt_tokens + event.completion_tokens, event.cost_usd)
        finally:
            await self.publisher.publish(event)

    async def drain(self) -> None:
        """Wait for every record still being published (shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


def _quiet(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def estimate_tokens(entry: CatalogEntry, parsed: OpenAIRequest, body_size: int
                    ) -> tuple[int, int]:
    """Upper bounds of (prompt tokens, completion tokens) for one request."""
    context = entry.base.context_length
    if entry.base.kind == "embedding":
        return min(body_size, context * max(1, _input_count(parsed))), 0
    limit = (getattr(parsed, "max_completion_tokens", None)
             or getattr(parsed, "max_tokens", None) or context)
    best_of = getattr(parsed, "best_of", None) or (parsed.model_extra or {}).get("best_of")
    choices = max(getattr(parsed, "n", None) or 1, best_of if isinstance(best_of, int) else 1)
    return min(body_size, context), min(limit, context) * choices


def prompt_text(parsed: OpenAIRequest) -> str | None:
    """What drift detection embeds: the last user message, or the (first) text prompt."""
    if isinstance(parsed, ChatCompletionRequest):
        for message in reversed(parsed.messages):
            if message.role == "user":
                content = message.content
                if isinstance(content, list):  # text parts only
                    content = " ".join(str(p.get("text", "")) for p in content
                                       if p.get("type") == "text")
                return content or ""
        return None
    if isinstance(parsed, CompletionRequest):
        prompt = parsed.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else None  # token ids: nothing to embed
    return None


def _input_count(parsed: OpenAIRequest) -> int:
    value = getattr(parsed, "input", None)
    return len(value) if isinstance(value, list) and value and not isinstance(value[0], int) \
        else 1


class SseUsageTap:
    """Reads vLLM's usage out of an SSE stream and shows the client only what it asked for.

    The gateway always asks vLLM for `include_usage` and `continuous_usage_stats`, so even a
    stream cut short has counted tokens. A client that did not ask for usage gets no usage
    chunk; one that did not ask for continuous stats gets usage only in the last chunk. With a
    `guard` (output guardrails), every chunk's text goes through it, and what it still holds
    when the stream ends goes out in a chunk of its own before `data: [DONE]`."""

    def __init__(self, account: Account, *, client_usage: bool, client_continuous: bool,
                 guard: OutputFilter | None = None) -> None:
        self.account = account
        self.client_usage = client_usage
        self.client_continuous = client_continuous
        self.guard = guard
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._partial = data
            return b""
        complete, self._partial = data[: end + 2], data[end + 2:]
        guard = self.guard
        if guard is None and b'"usage"' not in complete:
            return complete
        out = []
        for event in complete.split(b"\n\n")[:-1]:
            if event.startswith(b"data: {") and (guard is not None or b'"usage"' in event):
                event = self._rewrite(event)
                if not event:
                    continue
            elif guard is not None and event == b"data: [DONE]":
                out.append(self._held())
            out.append(event + b"\n\n")
        return b"".join(out)

    def _held(self) -> bytes:
        last = self.guard.end() if self.guard is not None else None
        return b"" if last is None else b"data: " + orjson.dumps(last) + b"\n\n"

    def _rewrite(self, event: bytes) -> bytes:
        try:
            obj = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return event
        usage = obj.get("usage")
        if usage:
            self.account.usage_from(usage)
        held = b""
        if self.guard is not None:
            if obj.get("choices"):
                if not self.guard.chunk(obj):
                    return b""  # nothing left to show (a withheld choice's later text)
            elif obj.get("choices") == []:  # the last chunk (usage): held text goes first
                held = self._held()
        out = self._visible(event, obj, usage, changed=self.guard is not None)
        if not held:
            return out
        return held + out if out else held[:-2]  # the caller ends each event

    def _visible(self, event: bytes, obj: dict[str, Any], usage: object, changed: bool
                 ) -> bytes:
        """The event as the client asked for it (`changed`: `obj` differs from `event`)."""
        self.account.note_finish(obj.get("choices"))
        if self.account.probe is not None and obj.get("choices"):
            self.account.probe.add_output(
                str((obj["choices"][0].get("delta") or {}).get("content") or ""))
        if self.client_continuous:
            return b"data: " + orjson.dumps(obj) if changed else event
        if obj.get("choices") == [] and usage:  # the final usage chunk
            return event if self.client_usage else b""
        obj.pop("usage", None)
        return b"data: " + orjson.dumps(obj)

    def tail(self) -> bytes:
        rest, self._partial = self._partial, b""
        return self._held() + rest
