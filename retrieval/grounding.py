"""Search over a tenant's vector stores, and answers grounded in them.

`Retriever.search` embeds the query with the platform's embedding model (a model call of the
caller's, made through the `Embed` the gateway gives it), encodes it as BM25 terms, and asks
the index (always filtered to the caller's tenant and stores). `Grounding`
turns the hits of a chat request's `retrieval` option into a system message of numbered
sources and the citations returned with the answer; when nothing relevant is found the
gateway answers `NO_ANSWER` itself instead of letting the model guess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import tenancy
from llmops.errors import BadRequestError, NotFoundError
from observability import tracing
from retrieval import InvalidFilterError, SparseEncoder, VectorIndex, parse_filters
from retrieval.stores import VectorStores

__all__ = ["NO_ANSWER", "Caller", "Embed", "Grounding", "Retriever", "Source"]

NO_ANSWER = ("I could not find anything about this in the selected documents, so I cannot "
             "answer from them.")
_INSTRUCTIONS = (
    "Answer the user's question using only the numbered sources below, and cite the sources "
    "you use like [1]. If the sources do not contain the answer, say that you do not know.")



@dataclass(frozen=True)
class Caller:
    """Whom a search is for: its query embedding is their model call (their limits, budget
    and ledger), recorded under an id derived from their request's."""

    who: tenancy.Principal
    request_id: str


# The query texts' vectors, embedded on the caller's behalf.
Embed = Callable[[Caller, list[str]], Awaitable[list[list[float]]]]


@dataclass(frozen=True)
class Source:
    """One retrieved chunk and where it lies in its file's text."""

    file_id: str
    filename: str
    chunk: int
    start: int
    end: int
    text: str
    score: float
    attributes: dict[str, Any]

    def citation(self, index: int, quote: Callable[[str], str] | None = None
                 ) -> dict[str, Any]:
        return {"index": index, "file_id": self.file_id, "filename": self.filename,
                "chunk": self.chunk, "start": self.start, "end": self.end,
                "quote": quote(self.text) if quote else self.text,
                "score": round(self.score, 4)}


class Retriever:
    """Searches on behalf of the vector stores API and of chat requests. The index is opened
    by the gateway's lifespan: this process is its one owner."""

    def __init__(self, stores: VectorStores, embed: Embed, default_threshold: float) -> None:
        self.stores = stores
        self.index = cast(VectorIndex, _Closed())
        self.embed = embed
        self.encoder = SparseEncoder()
        self.default_threshold = default_threshold

    async def search(self, caller: Caller, store_ids: Sequence[str], queries: Sequence[str],
                     *, limit: int, filters: dict[str, Any] | None, threshold: float,
                     mode: str = "hybrid", ranker: str = "auto") -> list[Source]:
        """The best chunks for any of `queries`, best first; unknown or foreign stores are
        reported as missing. Ranker `none` is plain fusion in hybrid mode; any other is the
        feedback ranker (retrieval.feedback)."""
        with tracing.span("vector_stores.search", attributes={
                "llmops.retrieval.stores": len(store_ids), "llmops.retrieval.queries": len(queries),
                "llmops.retrieval.mode": mode, "llmops.retrieval.ranker": ranker,
                "llmops.retrieval.limit": limit,
                "llmops.retrieval.filtered": filters is not None}) as span:
            sources = await self._search(caller, store_ids, queries, limit=limit,
                                         filters=filters, threshold=threshold, mode=mode,
                                         feedback=ranker != "none")
            if span is not None:
                span.set_attribute("llmops.retrieval.results", len(sources))
            return sources

    async def _search(self, caller: Caller, store_ids: Sequence[str], queries: Sequence[str],
                      *, limit: int, filters: dict[str, Any] | None, threshold: float,
                      mode: str, feedback: bool) -> list[Source]:
        tenant_id = caller.who.tenant_id
        for store_id in store_ids:
            try:
                await self.stores.get(tenant_id, store_id)
            except tenancy.NotFoundError as exc:
                raise NotFoundError(str(exc), param="vector_store_id") from None
        texts = [q.strip() for q in queries]
        if not texts or not all(texts):
            raise BadRequestError("The search query must not be empty.", param="query")
        if filters is not None:
            try:
                parse_filters(filters)  # refused before any embedding is computed
            except InvalidFilterError as exc:
                raise BadRequestError(str(exc), param=exc.param) from None
        dense: list[list[float]] | list[None] = (
            [None] * len(texts) if mode == "sparse" else await self.embed(caller, texts))
        best: dict[str, tuple[int, Any]] = {}  # point id -> (best rank in any query, hit)
        for text, vector in zip(texts, dense, strict=True):
            sparse = None if mode == "dense" else self.encoder.encode_query(text)
            hits = await asyncio.to_thread(self.index.search, tenant_id, list(store_ids),
                                           vector, sparse, mode, limit, filters, threshold,
                                           feedback=feedback)
            for rank, hit in enumerate(hits):
                if hit.id not in best or rank < best[hit.id][0]:
                    best[hit.id] = (rank, hit)
        ranked = [h for _, h in sorted(best.values(), key=lambda rh: (rh[0], -rh[1].score))]
        ranked = ranked[:limit]
        return [Source(file_id=h.payload["file"], filename=h.payload.get("filename", ""),
                       chunk=h.payload["chunk"], start=h.payload["start"],
                       end=h.payload["end"], text=h.payload["text"], score=h.score,
                       attributes=h.payload.get("attributes", {})) for h in ranked]

    async def ground(self, caller: Caller, query: str, store_ids: Sequence[str], *,
                     limit: int, filters: dict[str, Any] | None, threshold: float | None,
                     mode: str) -> Grounding:
        """The sources for an answer to `query` (the last user message of a chat)."""
        if not query:
            raise BadRequestError("Retrieval needs a user message to search for.",
                                  param="messages")
        sources = await self.search(
            caller, store_ids, [query], limit=limit, filters=filters, mode=mode,
            threshold=threshold if threshold is not None else self.default_threshold)
        return Grounding(sources, query=query)


class _Closed:
    """Stands in for the index before start-up and after shutdown."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the vector index is not open")



@dataclass(frozen=True)
class Grounding:
    sources: list[Source]
    # Chunks left out by guardrails (file, chunk, score and why; never their text), returned
    # as `dropped_sources` next to the citations.
    dropped: list[dict[str, Any]] = field(default_factory=list)
    quote: Callable[[str], str] | None = None  # what a citation shows of its chunk's text
    query: str = ""  # what was searched for

    def citations(self) -> list[dict[str, Any]]:
        return [s.citation(i, self.quote) for i, s in enumerate(self.sources, 1)]

    def screened(self, kept: Sequence[int], dropped: Mapping[int, str],
                 quote: Callable[[str], str] | None) -> Grounding:
        """Only the `kept` sources; `dropped` maps the others to the marker found in them."""
        return Grounding(
            [self.sources[i] for i in kept],
            [{"file_id": s.file_id, "filename": s.filename, "chunk": s.chunk,
              "score": round(s.score, 4), "reason": "prompt_injection", "marker": marker}
             for i, marker in dropped.items() for s in (self.sources[i],)],
            quote, self.query)

    def messages(self, original: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The client's messages after a system message holding the sources."""
        blocks = [f"[{i}] {s.filename}:\n{s.text}" for i, s in enumerate(self.sources, 1)]
        context = _INSTRUCTIONS + "\n\n" + "\n\n".join(blocks)
        return [{"role": "system", "content": context}, *original]
