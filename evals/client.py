"""How an eval run's worker reaches models and vector stores: through the gateway's OpenAI
API, with the bootstrap admin key acting for the key that created the run
(`x-llmops-on-behalf-of`), so the run's calls count against that tenant's limits and appear in
its usage ledger.

Every call has a timeout and a bounded number of tries (connection failures, 429 and 5xx are
tried again after a short wait); the calls of a run share one concurrency bound. A refusal
that no retry or other item can change (the creating key revoked, the model gone) is fatal
to the run: it is kept on the transport, since graders turn exceptions into per-item errors.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tenancy.priority import PRIORITY_HEADER, Priority
from tenancy.tenants import ON_BEHALF_HEADER

__all__ = ["Completion", "FatalRunError", "GatewayTransport", "ItemClient", "ModelCallError"]

_RETRY_STATUSES = (429, 500, 502, 503, 504)
_MAX_WAIT_S = 10.0


class ModelCallError(Exception):
    """One call failed for good; the item it served errors, the run goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FatalRunError(ModelCallError):
    """A failure every further call would repeat: the run fails with it."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: dict[str, int]
    tool_calls: list[Any]
    choices: list[Any]
    citations: list[dict[str, Any]] = field(default_factory=list)  # answers with `retrieval`


def _usage(body: dict[str, Any]) -> dict[str, int]:
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(usage.get("total_tokens") or prompt + completion),
            "cached_tokens": int(details.get("cached_tokens") or 0)}


def _message(payload: bytes) -> str:
    try:
        return str(orjson.loads(payload)["error"]["message"])[:500]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return payload[:300].decode(errors="replace")


class GatewayTransport:
    """The HTTP side shared by a run's items: one session, one concurrency bound."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, admin_key: str,
                 acting_for: str | None, *, concurrency: int, attempts: int,
                 embedding_model: str | None, request_prefix: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.headers = {"authorization": f"Bearer {admin_key}",
                        "content-type": "application/json",
                        PRIORITY_HEADER: Priority.BACKGROUND.label}  # after everyone else
        if acting_for is not None:
            self.headers[ON_BEHALF_HEADER] = acting_for
        self.limit = asyncio.Semaphore(concurrency)
        self.attempts = attempts
        self.embedding_model = embedding_model
        self.request_prefix = request_prefix  # request ids name the run: found in the ledger
        self.fatal: FatalRunError | None = None

    async def post(self, path: str, body: dict[str, Any], request_tag: str, *,
                   not_found: str = "model_not_found") -> dict[str, Any]:
        """POST as the run's key; a 404 is fatal to the run, with `not_found` as its code."""
        if self.fatal is not None:
            raise self.fatal
        for attempt in range(1, self.attempts + 1):
            # Each try has its own request id: the ledger keeps the first record of an id.
            rid = f"{self.request_prefix}.{request_tag}.{uuid.uuid4().hex[:8]}"
            wait = 1.0 * 2 ** (attempt - 1)
            try:
                async with self.limit, self.session.post(
                        f"{self.base_url}{path}", data=orjson.dumps(body),
                        headers={**self.headers, "x-request-id": rid}) as resp:
                    payload = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("retry-after", "")
            except (aiohttp.ClientConnectionError, TimeoutError):
                if attempt == self.attempts:
                    raise ModelCallError("gateway_unreachable", "The gateway could not be "
                                         f"reached in {self.attempts} tries.") from None
                await asyncio.sleep(min(wait, _MAX_WAIT_S))
                continue
            if status == 200:
                return dict(orjson.loads(payload))
            if status in (401, 403, 404):
                self.fatal = FatalRunError(
                    not_found if status == 404 else "permission_denied", _message(payload))
                raise self.fatal
            if status not in _RETRY_STATUSES or attempt == self.attempts:
                raise ModelCallError(f"http_{status}", _message(payload))
            if retry_after.replace(".", "", 1).isdigit():
                wait = float(retry_after)
            await asyncio.sleep(min(wait, _MAX_WAIT_S))
        raise AssertionError("unreachable")


@dataclass
class ItemClient:
    """The model client of one item (graders' `ModelClient`): it counts the item's usage per
    model, for the run's `per_model_usage`."""

    transport: GatewayTransport
    tag: str
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    calls: int = 0

    def _count(self, model: str, usage: dict[str, int]) -> None:
        into = self.usage.setdefault(model, {"invocation_count": 0})
        into["invocation_count"] += 1
        for name, value in usage.items():
            into[name] = into.get(name, 0) + value

    async def complete(self, model: str, messages: list[dict[str, Any]],
                       **params: Any) -> Completion:
        self.calls += 1
        body = await self.transport.post("/v1/chat/completions",
                                         {**params, "model": model, "messages": messages,
                                          "stream": False}, f"{self.tag}.{self.calls}")
        usage = _usage(body)
        self._count(model, usage)
        choices = body.get("choices") or [{}]
        message = choices[0].get("message") or {}
        return Completion(str(message.get("content") or ""),
                          str(choices[0].get("finish_reason") or ""), usage,
                          list(message.get("tool_calls") or []), choices,
                          [c for c in body.get("citations") or [] if isinstance(c, dict)])

    async def search(self, vector_store_id: str, **options: Any) -> list[dict[str, Any]]:
        """A vector store search (`POST /v1/vector_stores/{id}/search`): its ranked results.
        A store that is gone (or not the run's tenant's) fails the run."""
        self.calls += 1
        body = await self.transport.post(f"/v1/vector_stores/{vector_store_id}/search",
                                         options, f"{self.tag}.{self.calls}",
                                         not_found="vector_store_not_found")
        return [r for r in body.get("data") or [] if isinstance(r, dict)]

    async def chat(self, model: str, messages: list[dict[str, Any]], **params: Any) -> str:
        return (await self.complete(model, messages, **params)).text

    async def embed(self, texts: list[str]) -> list[list[float]]:
        model = self.transport.embedding_model
        if model is None:
            raise ModelCallError("no_embedding_model", "No embedding model is configured "
                                 "for cosine similarity.")
        self.calls += 1
        body = await self.transport.post("/v1/embeddings", {"model": model, "input": texts},
                                         f"{self.tag}.{self.calls}")
        self._count(model, _usage(body))
        data = sorted(body.get("data") or [], key=lambda d: int(d.get("index", 0)))
        return [list(map(float, d["embedding"])) for d in data]
