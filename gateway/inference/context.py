"""What the gateway knows about one inference request while it is served: who asks, what was
asked and for which model, what the hooks decided (policy, reservation, grounding), what the
model used, and how long it took. Every hook reads and writes it; the request's span reads it
when the request ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from guardrails import OFF, Policy, Tally
from llmops.catalog import CatalogEntry
from llmops.settings import PoolConfig
from tenancy import Principal
from tenancy.limits import Admission
from tenancy.priority import Priority

if TYPE_CHECKING:
    from guardrails import OutputFilter
    from observability.drift import Probe
    from retrieval.grounding import Grounding

__all__ = ["RequestContext", "estimate_tokens", "prompt_text"]


@dataclass(eq=False, slots=True)
class RequestContext:
    who: Principal
    request_id: str
    endpoint: str  # the path served, e.g. /v1/chat/completions
    kind: str  # the model kind the endpoint serves: chat or embedding
    on_close: Callable[[RequestContext, int], None]
    priority: Priority = Priority.INTERACTIVE  # the class the caller named
    model: str = ""  # as the client named it
    body: bytes = b""
    parsed: OpenAIRequest | None = None  # None once a guardrail blocked it: spans keep nothing
    entry: CatalogEntry | None = None
    # What the upstream body changes (fields replaced, fields of ours removed).
    changes: dict[str, Any] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    response_headers: dict[str, str] = field(default_factory=dict)
    # Awaited (shielded) before the answer goes out: work started while the model ran.
    before_answer: list[asyncio.Future[None]] = field(default_factory=list)
    admission: Admission | None = None
    policy: Policy = OFF
    output: OutputFilter | None = None  # output guardrails: an answer must be checkable
    grounding: Grounding | None = None
    probe: Probe | None = None  # set when drift detection samples this request
    guardrails: Tally = field(default_factory=Tally)  # what guardrails did to it
    client_usage: bool = False  # a stream's client asked for usage
    client_continuous: bool = False  # ... and for it in every chunk
    started: float = field(default_factory=time.perf_counter)
    created_at: float = field(default_factory=time.time)
    pool: PoolConfig | None = None
    device: str | None = None
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, found in the engine's prefix cache
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)  # the choices', as they end
    closed: bool = False
    _original: dict[str, Any] | None = None

    def original(self) -> dict[str, Any]:
        """The client's body as JSON (parsed once, when a hook first needs it)."""
        if self._original is None:
            self._original = orjson.loads(self.body)
        return self._original

    def upstream_body(self) -> bytes:
        """What the engine is sent: the client's bytes, unless a hook changed them."""
        if not self.changes and not self.removed:
            return self.body
        payload = {**self.original(), **self.changes}
        for name in self.removed:
            payload.pop(name, None)
        return orjson.dumps(payload)

    def first_byte(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000

    def usage_from(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            # vLLM reports cached tokens in a stream's last usage only, not in every chunk's.
            if isinstance(details := usage.get("prompt_tokens_details"), dict):
                self.cached_tokens = int(details.get("cached_tokens") or 0)

    def note_finish(self, choices: object) -> None:
        """Keep the finish reasons of an answer's (or a stream chunk's) choices."""
        if isinstance(choices, list):
            self.finish_reasons += [c["finish_reason"] for c in choices
                                    if isinstance(c, dict) and c.get("finish_reason")]

    def close(self, status: int) -> None:
        """End the request: the completion hooks run, once."""
        if not self.closed:
            self.closed = True
            self.on_close(self, status)


def estimate_tokens(entry: CatalogEntry, parsed: OpenAIRequest, body_size: int
                    ) -> tuple[int, int]:
    """Upper bounds of (prompt tokens, completion tokens) for one request: the prompt as its
    body's byte length (a token is at least one byte, and the JSON around each message
    outweighs the chat template's special tokens), the completion as its token limit (else the
    context length) times the number of choices; both capped at the context length."""
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
