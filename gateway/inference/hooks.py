"""The concerns an inference request passes through, one hook each, in the order they are
listed by the app: admission (limits, budgets, the ledger, metrics), guardrails, grounding,
usage, drift, and the engine's answers put in OpenAI's published shape.

A hook may act at four points, each optional:
- `before`: before the model is called, in order; it may change what the engine is sent
  (`ctx.changes`), refuse the request (raise), or answer in the model's place (return the
  whole answer, which the pipeline sends whole or as a stream, as the client asked);
- `on_data`: on each answer object, in order: the whole answer, or each streamed chunk (the
  same hook sees both); it may change the object (CHANGED) or, in a stream, drop it (DROP);
- `flush`: when a stream's answer ends (before its usage chunk, or `[DONE]`): objects to send
  as chunks of their own, such as text held back or the citations;
- `after`: once the request has ended, however it ended, with its status.
Adding a concern is adding a hook; whole and streamed answers share every one of them."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from gateway.inference.context import RequestContext, estimate_tokens, prompt_text
from gateway.inference.protocol import ChatCompletionRequest
from guardrails import OFF, GuardrailBlockedError, Guardrails, log_events
from llmops.errors import BadRequestError, ServiceUnavailableError
from llmops.settings import PoolConfig
from observability.drift import DriftDetector, Probe
from retrieval.grounding import NO_ANSWER, Caller, Retriever
from tenancy.accounting import Accountant
from tenancy.ledger import UsageEvent
from tenancy.limits import LimitExceededError

__all__ = ["CHANGED", "DROP", "KEEP", "AdmissionHook", "ConformanceHook", "DriftHook",
           "GroundingHook", "GuardrailHook", "Hook", "Hooks", "RequestObserver", "UsageHook"]

log = logging.getLogger(__name__)

KEEP, CHANGED, DROP = 0, 1, 2  # what `on_data` did to an answer object
_SCAN_INLINE_BYTES = 64 * 1024


class Hook:
    """One concern on the request path; every method is optional."""

    async def before(self, ctx: RequestContext) -> dict[str, Any] | None:
        return None

    def on_data(self, ctx: RequestContext, data: dict[str, Any], whole: bool) -> int:
        return KEEP

    def flush(self, ctx: RequestContext) -> list[dict[str, Any]]:
        return []

    def after(self, ctx: RequestContext, status: int) -> None:
        return None


class Hooks:
    """The hooks of a pipeline, in order. At each point only the hooks that act there are
    called: a stream's chunks are many."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.all = tuple(hooks)
        self._before = [h for h in hooks if type(h).before is not Hook.before]
        self._on_data = [h for h in hooks if type(h).on_data is not Hook.on_data]
        self._flush = [h for h in hooks if type(h).flush is not Hook.flush]
        self._after = [h for h in hooks if type(h).after is not Hook.after]

    async def before(self, ctx: RequestContext) -> dict[str, Any] | None:
        """The first answer a hook gives in the model's place, if any."""
        for hook in self._before:
            if (answered := await hook.before(ctx)) is not None:
                return answered
        return None

    def on_data(self, ctx: RequestContext, data: dict[str, Any], whole: bool) -> int:
        """CHANGED if a hook changed `data`; DROP (and no later hook) once one dropped it."""
        verdict = KEEP
        for hook in self._on_data:
            if (done := hook.on_data(ctx, data, whole)) == DROP:
                return DROP
            verdict |= done
        return verdict

    def flush(self, ctx: RequestContext) -> list[dict[str, Any]]:
        return [obj for hook in self._flush for obj in hook.flush(ctx)]

    def after(self, ctx: RequestContext, status: int) -> None:
        for hook in self._after:
            try:
                hook.after(ctx, status)
            except Exception:  # one concern's failure must not skip the others' bookkeeping
                log.exception("%s failed at the end of request %s", type(hook).__name__,
                              ctx.request_id)


class RequestObserver(Protocol):
    """Sees each request's life (the gateway's metrics). Called on the request path: every
    method must be cheap and must not raise. `model` is the catalog name, never the raw one."""

    def admitted(self, model: str) -> None: ...

    def rejected(self, reason: str, tenant_id: str) -> None: ...

    def retried(self, model: str) -> None: ...

    def dispatched(self, model: str, pool: PoolConfig, reason: str) -> None:
        """Sent to a replica of `pool`; `reason`: why routing chose it (one of REASONS)."""

    def finished(self, event: UsageEvent, model: str | None, pool: PoolConfig | None,
                 admitted: bool) -> None: ...


class AdmissionHook(Hook):
    """Limits and budgets reserved before the call and settled after it, with exactly one
    usage record; the metrics observer sees admissions, refusals and endings."""

    def __init__(self, accountant: Accountant, observer: RequestObserver | None) -> None:
        self.accountant = accountant
        self.observer = observer

    async def before(self, ctx: RequestContext) -> None:
        assert ctx.entry is not None and ctx.parsed is not None
        prompt, completion = estimate_tokens(ctx.entry, ctx.parsed, len(ctx.body))
        try:
            ctx.admission = await self.accountant.admit(ctx.who, ctx.entry, prompt, completion)
        except (LimitExceededError, ServiceUnavailableError) as exc:
            if self.observer is not None:
                reason = exc.reason if isinstance(exc, LimitExceededError) else "unavailable"
                self.observer.rejected(reason, ctx.who.tenant_id)
            raise
        if self.observer is not None:
            self.observer.admitted(ctx.entry.name)
        ctx.response_headers.update(ctx.admission.headers)
        # The start record goes out while the model is called: a gateway killed mid-request
        # still leaves a record.
        ctx.before_answer.append(self.accountant.started(self._event(ctx, 0, final=False)))

    def after(self, ctx: RequestContext, status: int) -> None:
        event = self._event(ctx, status, final=True)
        self.accountant.settle(ctx.admission, event)
        if self.observer is not None:
            self.observer.finished(event, ctx.entry.name if ctx.entry else None, ctx.pool,
                                   ctx.admission is not None)

    def _event(self, ctx: RequestContext, status: int, final: bool) -> UsageEvent:
        cost, seconds = self.accountant.cost(ctx.entry, ctx.pool, ctx.prompt_tokens,
                                             ctx.completion_tokens, ctx.cached_tokens)
        return UsageEvent(
            request_id=ctx.request_id, tenant_id=ctx.who.tenant_id, key_id=ctx.who.key_id,
            endpoint=ctx.endpoint, model=ctx.model[:256],
            adapter=ctx.entry.adapter if ctx.entry else None, status=status,
            prompt_tokens=ctx.prompt_tokens, cached_tokens=ctx.cached_tokens,
            completion_tokens=ctx.completion_tokens,
            latency_ms=(time.perf_counter() - ctx.started) * 1000, ttft_ms=ctx.ttft_ms,
            pool=ctx.device, cost_usd=cost, device_seconds=seconds, created_at=ctx.created_at,
            final=final, guardrails=ctx.guardrails.records())


class GuardrailHook(Hook):
    """The tenant's and key's guardrail policy on chat requests: the prompt is checked (and
    redacted) before the call, and the answer, whole or streamed, on its way out."""

    def __init__(self, guardrails: Guardrails) -> None:
        self.guardrails = guardrails

    async def before(self, ctx: RequestContext) -> None:
        assert ctx.parsed is not None
        ctx.policy = policy = self.guardrails.policy(ctx.who) if ctx.kind == "chat" else OFF
        if policy.looks_at_input:
            original = ctx.original()
            check = functools.partial(self.guardrails.check_input, policy, original,
                                      ctx.guardrails)
            try:  # a big prompt is scanned off the event loop (tens of ms per MB)
                redacted = (await asyncio.to_thread(check)
                            if len(ctx.body) > _SCAN_INLINE_BYTES else check())
            except GuardrailBlockedError:
                ctx.parsed = None  # a span capturing content must not keep it
                raise
            if redacted:
                ctx.changes.update(redacted)
                # What the model is sent, for the hooks after this one and for the span.
                ctx.parsed = type(ctx.parsed).model_validate_json(
                    orjson.dumps({**original, **redacted}))
        ctx.output = self.guardrails.output_filter(policy, ctx.guardrails)

    def on_data(self, ctx: RequestContext, data: dict[str, Any], whole: bool) -> int:
        if ctx.output is None:
            return KEEP
        if whole:
            ctx.output.answer(data)
            return CHANGED
        if data.get("choices"):
            return CHANGED if ctx.output.chunk(data) else DROP  # a withheld choice's text
        return KEEP

    def flush(self, ctx: RequestContext) -> list[dict[str, Any]]:
        held = ctx.output.end() if ctx.output is not None else None
        return [held] if held is not None else []

    def after(self, ctx: RequestContext, status: int) -> None:
        if ctx.guardrails:
            log_events(ctx.guardrails, ctx.request_id, ctx.who.tenant_id, ctx.who.key_id)


class GroundingHook(Hook):
    """A chat request's `retrieval` option: the caller's vector stores are searched, the
    sources (screened for injected instructions) go to the model in a system message, and the
    answer carries its citations; with no relevant source the gateway answers so itself."""

    def __init__(self, retriever: Retriever | None) -> None:
        self.retriever = retriever

    async def before(self, ctx: RequestContext) -> dict[str, Any] | None:
        parsed = ctx.parsed
        if not isinstance(parsed, ChatCompletionRequest) or parsed.retrieval is None:
            return None
        if self.retriever is None:
            raise BadRequestError("Retrieval is not available: no embedding model is "
                                  "configured.", param="retrieval")
        options = parsed.retrieval
        grounding = await self.retriever.ground(
            Caller(ctx.who, ctx.request_id), prompt_text(parsed) or "", options.vector_store_ids,
            limit=options.max_num_results, filters=options.filters,
            threshold=options.score_threshold, mode=options.search_mode)
        if ctx.policy.retrieval_injection != "off" or ctx.output is not None:
            screened = Guardrails.screen(ctx.policy, grounding.sources, ctx.guardrails)
            grounding = grounding.screened(
                screened.kept, screened.dropped,
                ctx.output.quote if ctx.output is not None else None)
        ctx.removed.add("retrieval")  # ours, not the engine's
        ctx.grounding = grounding
        if not grounding.sources and options.required:
            return _no_answer(parsed, grounding.dropped)
        if grounding.sources:
            messages = ctx.changes.get("messages") or ctx.original()["messages"]
            ctx.changes["messages"] = grounding.messages(messages)
        return None

    def on_data(self, ctx: RequestContext, data: dict[str, Any], whole: bool) -> int:
        if ctx.grounding is None or not whole:
            return KEEP
        data["citations"] = ctx.grounding.citations()
        data["dropped_sources"] = ctx.grounding.dropped
        return CHANGED

    def flush(self, ctx: RequestContext) -> list[dict[str, Any]]:
        if ctx.grounding is None:
            return []
        return [{"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion.chunk",
                 "created": int(time.time()), "model": ctx.model, "choices": [],
                 "citations": ctx.grounding.citations(),
                 "dropped_sources": ctx.grounding.dropped}]


def _no_answer(request: ChatCompletionRequest, dropped: list[dict[str, Any]]
               ) -> dict[str, Any]:
    """What the gateway says, without asking the model, when no source is relevant."""
    return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
            "created": int(time.time()), "model": request.model, "citations": [],
            "dropped_sources": dropped,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": NO_ANSWER,
                                     "refusal": None}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


class UsageHook(Hook):
    """Every stream is counted, even one cut short: the engine is always asked for usage in
    every chunk, and the client is shown only the usage it asked for. Finish reasons are kept
    for the span."""

    async def before(self, ctx: RequestContext) -> None:
        assert ctx.parsed is not None
        if not ctx.parsed.stream:
            return
        asked = ctx.parsed.stream_options.model_dump() if ctx.parsed.stream_options else {}
        ctx.client_usage = bool(asked.get("include_usage"))
        ctx.client_continuous = bool(asked.get("continuous_usage_stats"))
        if not (ctx.client_usage and ctx.client_continuous):
            ctx.changes["stream_options"] = {**asked, "include_usage": True,
                                             "continuous_usage_stats": True}

    def on_data(self, ctx: RequestContext, data: dict[str, Any], whole: bool) -> int:
        ctx.note_finish(data.get("choices"))
        if whole or ctx.client_continuous or "usage" not in data:
            return KEEP
        if data.get("choices") == [] and data["usage"]:  # the final usage chunk
            return KEEP if ctx.client_usage else DROP
        del data["usage"]
        return CHANGED


class DriftHook(Hook):
    """A sample of chat requests leaves its prompt and the start of its answer for drift
    detection; answers and failures of the model count, refusals and clients that left not."""

    def __init__(self, drift: DriftDetector) -> None:
        self.drift = drift

    async def before(self, ctx: RequestContext) -> None:
        assert ctx.entry is not None and ctx.parsed is not None
        if (ctx.entry.base.kind == "chat" and self.drift.sampled()
                and (text := prompt_text(ctx.parsed)) is not None):
            ctx.probe = Probe(text)

    def on_data(self, ctx: RequestContext, data: dict[str, Any], whole: bool) -> int:
        if ctx.probe is not None and data.get("choices"):
            choice = data["choices"][0]
            text = ((choice.get("message") or {}).get("content") or choice.get("text")
                    if whole else (choice.get("delta") or {}).get("content"))
            ctx.probe.add_output(str(text or ""))
        return KEEP

    def after(self, ctx: RequestContext, status: int) -> None:
        if ctx.probe is not None and ctx.entry is not None and (status == 200 or status >= 500):
            self.drift.record(ctx.entry.name, ctx.probe, ctx.completion_tokens,
                              failed=status >= 500)


# Properties OpenAI's schema has as optional but not nullable, where engines (vLLM) send null:
# typed clients take a null there for a value of the wrong type, so it is left out instead.
_ANSWER_NULLS = ("system_fingerprint", "usage")  # a whole answer's; a chunk's usage may be null
_CHUNK_NULLS = ("system_fingerprint", "obfuscation")
_USAGE_NULLS = ("prompt_tokens_details", "completion_tokens_details")
_DETAIL_NULLS = ("cached_tokens", "audio_tokens", "text_tokens", "image_tokens",
                 "cache_write_tokens", "reasoning_tokens", "accepted_prediction_tokens",
                 "rejected_prediction_tokens")
_MESSAGE_NULLS = ("annotations", "function_call", "tool_calls")
_DELTA_NULLS = ("role", "function_call", "tool_calls")
_TOOL_CALL_NULLS = ("id", "type", "function")
_FUNCTION_NULLS = ("name", "arguments")


class ConformanceHook(Hook):
    """Engine answers (chat completions, completions, embeddings, whole or streamed) in OpenAI's
    published shape: a null where OpenAI's schema has an optional property that may not be
    null is left out. The engine's own extra fields stay (no object they sit in is closed).
    A chunk with nothing to leave out is sent as the engine's bytes."""

    def on_data(self, ctx: RequestContext, data: dict[str, Any], whole: bool) -> int:
        changed = _drop_nulls(data, _ANSWER_NULLS if whole else _CHUNK_NULLS)
        if isinstance(usage := data.get("usage"), dict):
            changed |= _drop_nulls(usage, _USAGE_NULLS)
            for name in _USAGE_NULLS:
                if isinstance(details := usage.get(name), dict):
                    changed |= _drop_nulls(details, _DETAIL_NULLS)
        for choice in data.get("choices") or ():
            if whole:
                if isinstance(message := choice.get("message"), dict):
                    changed |= _drop_nulls(message, _MESSAGE_NULLS)
            elif isinstance(delta := choice.get("delta"), dict):
                changed |= _drop_nulls(delta, _DELTA_NULLS)
                for call in delta.get("tool_calls") or ():
                    changed |= _drop_nulls(call, _TOOL_CALL_NULLS)
                    if isinstance(function := call.get("function"), dict):
                        changed |= _drop_nulls(function, _FUNCTION_NULLS)
        return CHANGED if changed else KEEP


def _drop_nulls(obj: dict[str, Any], names: tuple[str, ...]) -> bool:
    dropped = False
    for name in names:
        if name in obj and obj[name] is None:
            del obj[name]
            dropped = True
    return dropped
