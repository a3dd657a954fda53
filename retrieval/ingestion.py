"""Ingesting one file into one vector store: parse it, chunk it by the embedding model's
tokens (keeping character offsets), encode each chunk's BM25 terms, embed the chunks in
batches through the gateway's embedding model, and hand the points to the gateway, which owns
the vector index and replaces the file's chunks in one step.

Safe to run twice: the points of a given content have fixed ids, and the gateway completes a
file only while it still expects that content.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import threading
import time
from typing import Any

import aiohttp
import orjson

from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Database
from observability.worker_metrics import METRICS
from retrieval import ParseError, SparseEncoder, chunk_text, extract_text
from retrieval.stores import VectorStores
from tenancy.tenants import NotFoundError

__all__ = ["run_ingest"]

log = logging.getLogger(__name__)
_ATTEMPTS = 3  # for calls to the gateway, which may be restarting


class IngestError(Exception):
    """A failure that is the file's, reported as its `last_error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_loading = threading.Lock()


def _tokenizer(weights: str) -> Any:
    # Under a lock: threads of one worker importing transformers at once fail to import it.
    with _loading:
        return _load_tokenizer(weights)


@functools.cache
def _load_tokenizer(weights: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights)


async def run_ingest(store_id: str, file_id: str, settings: Settings) -> str:
    """Ingest the file if its store still wants it; returns what became of it."""
    db = Database(settings.database_url)
    stores = VectorStores(db)
    try:
        row = await stores.pending(store_id, file_id)
        if row is None:
            return "not pending"
        started, outcome = time.perf_counter(), "failed"
        try:
            chunks = await _ingest(row.tenant_id, store_id, file_id, row.chunking,
                                   row.content_sha256, Files(db, settings.files.root,
                                                             settings.files.max_bytes),
                                   settings)
            outcome = "completed"
        except IngestError as exc:
            if exc.code == "cancelled":
                outcome = "cancelled"
            await stores.finish(store_id, file_id, row.content_sha256,
                                error={"code": exc.code, "message": str(exc)[:1000]})
            return "failed"
        except Exception as exc:  # the file fails; the worker lives on
            log.exception("ingesting %s into %s failed", file_id, store_id)
            await stores.finish(store_id, file_id, row.content_sha256, error={
                "code": "server_error", "message": f"Ingestion failed: {exc}"[:1000]})
            return "failed"
        finally:
            METRICS.file_ingested(outcome, time.perf_counter() - started)
        log.info("ingested %s into %s: %d chunks", file_id, store_id, chunks)
        return "completed"
    finally:
        await db.close()


async def _ingest(tenant_id: str, store_id: str, file_id: str, chunking: dict[str, Any],
                  sha256: str, files: Files, settings: Settings) -> int:
    embedding = settings.embedding_model()
    if embedding is None or embedding.weights is None:
        raise IngestError("server_error", "No embedding model with weights is configured.")
    try:
        stored = await files.get(tenant_id, file_id)
    except NotFoundError:
        raise IngestError("invalid_file", f"File {file_id} was deleted.") from None
    data = await asyncio.to_thread(files.path(stored).read_bytes)
    tokenizer = await asyncio.to_thread(_tokenizer, embedding.weights)
    try:
        document = await asyncio.to_thread(extract_text, data, stored.filename)
    except ParseError as exc:
        raise IngestError(exc.code, str(exc)) from None
    chunks = await asyncio.to_thread(chunk_text, document.text, tokenizer,
                                     int(chunking["max_tokens"]), int(chunking["overlap_tokens"]))
    encoder = SparseEncoder()
    gateway = settings.gateway_url()
    headers = {"authorization": f"Bearer {settings.bootstrap_key()}"}
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        dense: list[str] = []
        size = settings.retrieval.embed_batch
        for i in range(0, len(chunks), size):
            batch = [c.text for c in chunks[i: i + size]]
            sent = time.perf_counter()
            answer = await _call(session, "POST", f"{gateway}/v1/embeddings", {
                "model": embedding.name, "input": batch, "encoding_format": "base64"})
            METRICS.embedded(len(batch), time.perf_counter() - sent)
            dense += [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]
        points = []
        for c, vector in zip(chunks, dense, strict=True):
            sparse = encoder.encode_document(c.text)
            _check_base64(vector)
            points.append({"chunk": c.index, "start": c.start, "end": c.end, "text": c.text,
                           "dense": vector, "sparse_indices": sparse.indices,
                           "sparse_values": sparse.values})
        await _call(session, "PUT",
                    f"{gateway}/internal/vector_stores/{store_id}/files/{file_id}/points",
                    {"content_sha256": sha256, "points": points})
    METRICS.upserted(len(points))
    return len(points)


def _check_base64(vector: str) -> None:
    if not isinstance(vector, str) or len(base64.b64decode(vector)) % 4:
        raise IngestError("server_error", "The embedding model returned no float32 vector.")


async def _call(session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any]
                ) -> Any:
    """A call to the gateway, retried while it is unreachable or failing."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            async with session.request(method, url, data=orjson.dumps(body), headers={
                    "content-type": "application/json"}) as resp:
                payload = await resp.read()
                if resp.status < 500 or attempt == _ATTEMPTS:
                    if resp.status == 409:
                        raise IngestError("cancelled", orjson.loads(payload)["error"]["message"])
                    if resp.status != 200:
                        raise IngestError("server_error", f"The gateway answered {resp.status}: "
                                          f"{payload[:300].decode(errors='replace')}")
                    return orjson.loads(payload)
        except (aiohttp.ClientConnectionError, TimeoutError):
            if attempt == _ATTEMPTS:
                raise IngestError("server_error", "The gateway could not be reached.") from None
        await asyncio.sleep(2.0 * attempt)
    raise AssertionError("unreachable")
