"""The query embedding of a search (`POST /v1/vector_stores/{id}/search`, a chat request's
`retrieval`, the Responses API's `file_search`) is a model call of the caller's: it is
admitted against their limits and budgets and recorded in the ledger exactly as if they had
called `/v1/embeddings` themselves. One rule for every search, here."""

from __future__ import annotations

import asyncio
import time

from gateway.inference.upstream import Embeddings, Upstream
from llmops.catalog import CatalogEntry
from llmops.errors import APIError
from retrieval.grounding import Caller
from tenancy.accounting import Accountant
from tenancy.ledger import UsageEvent

__all__ = ["ENDPOINT", "QueryEmbedder", "request_id"]

ENDPOINT = "/v1/embeddings"  # the ledger's: a search's embedding counts as any embedding


def request_id(of_request: str) -> str:
    """The ledger's id of the query embedding of a request: derived from the request's, so a
    record published twice is one row."""
    return f"{of_request}.search"


class QueryEmbedder:
    """Embeds search queries with `entry`'s model on the caller's behalf (`retrieval.Embed`)."""

    def __init__(self, upstream: Upstream, accountant: Accountant, entry: CatalogEntry) -> None:
        self.upstream = upstream
        self.accountant = accountant
        self.entry = entry

    async def __call__(self, caller: Caller, texts: list[str]) -> list[list[float]]:
        entry = self.entry
        # As the embeddings endpoint bounds a request: a token is at least one byte.
        prompt = min(sum(len(t.encode()) for t in texts), entry.base.context_length * len(texts))
        started, created_at = time.perf_counter(), time.time()
        try:
            admission = await self.accountant.admit(caller.who, entry, prompt, 0)
        except APIError as exc:  # refused by a limit or budget: recorded as any refusal
            self.accountant.settle(None, self._event(caller, exc.status, None, started,
                                                     created_at))
            raise
        status, used = 500, None
        # The start record, as every admitted call's: a gateway that dies meanwhile still
        # leaves one.
        start = self.accountant.started(self._event(caller, 0, None, started, created_at))
        try:
            used = await self.upstream.embeddings(entry, texts)
            status = 200
        except APIError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client left
            raise
        finally:
            self.accountant.settle(admission,
                                   self._event(caller, status, used, started, created_at))
        await asyncio.shield(start)
        return used.vectors

    def _event(self, caller: Caller, status: int, used: Embeddings | None, started: float,
               created_at: float) -> UsageEvent:
        tokens = used.prompt_tokens if used is not None else 0
        pool = used.pool if used is not None else None
        cost, seconds = self.accountant.cost(self.entry, pool, tokens, 0)
        return UsageEvent(
            request_id=request_id(caller.request_id), tenant_id=caller.who.tenant_id,
            key_id=caller.who.key_id, endpoint=ENDPOINT, model=self.entry.name,
            status=status, prompt_tokens=tokens,
            latency_ms=(time.perf_counter() - started) * 1000,
            pool=used.device if used is not None else None, cost_usd=cost,
            device_seconds=seconds, created_at=created_at, final=status != 0)
