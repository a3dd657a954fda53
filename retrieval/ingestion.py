"""Ingesting one file into one vector store: parse it, chunk it by the embedding model's
tokens (keeping character offsets), encode each chunk's BM25 terms, embed the chunks in
batches through the gateway's embedding model, and hand the points to the gateway, which owns
the vector index and replaces the file's chunks in one step.

Safe to run twice: the points of a given content have fixed ids, and the gateway completes a
file only while it still expects that content.

The embedding calls are made as the key that attached the file (the bootstrap admin key
acting for it, `x-llmops-on-behalf-of`), so that key's limits and budget apply and the usage
ledger bills its tenant; files attached before keys were recorded use a stand-in key of the
store's tenant (`tenancy.auth.stand_in_key`). A refusal (a limit, a budget, a revoked key)
fails the file with the gateway's error code and message instead of being retried on end;
a rate limit that names its wait is waited out a bounded number of times. Request ids name the
store and file (`ingest.<store>.<file>.<n>.<random>`), so the ledger rows of an ingestion can
be found.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import threading
import time
import uuid
from typing import Any

import aiohttp
import orjson

from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Database, VectorStoreFile
from observability.worker_metrics import METRICS
from retrieval import ParseError, SparseEncoder, chunk_text, extract_text
from retrieval.stores import VectorStores
from tenancy.auth import stand_in_key
from tenancy.tenants import ON_BEHALF_HEADER, NotFoundError, Tenancy

__all__ = ["run_ingest"]

log = logging.getLogger(__name__)
_ATTEMPTS = 3  # for calls to the gateway, which may be restarting or rate limiting
_MAX_WAIT_S = 10.0


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
            key_id = row.key_id or await stand_in_key(Tenancy(db), row.tenant_id)
            if key_id is None:
                raise IngestError("invalid_api_key", "The vector store's tenant has no usable "
                                  "API key to ingest with; attach the file again.")
            chunks = await _ingest(row, key_id, stores, Files(db, settings.files.root,
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


async def _ingest(row: VectorStoreFile, key_id: str, stores: VectorStores, files: Files,
                  settings: Settings) -> int:
    tenant_id, store_id, file_id = row.tenant_id, row.store_id, row.file_id
    chunking, sha256 = row.chunking, row.content_sha256
    embedding = settings.embedding_model()
    if embedding is None or embedding.weights is None:
        raise IngestError("server_error", "No embedding model with weights is configured.")
    admin_key = settings.bootstrap_key()
    if admin_key is None:
        raise IngestError("server_error", "Workers need the bootstrap admin key to call the "
                          "gateway (admin_key or admin_key_file).")
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
    headers = {"authorization": f"Bearer {admin_key}"}
    timeout = aiohttp.ClientTimeout(total=600, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        dense: list[str] = []
        size = settings.retrieval.embed_batch
        for i in range(0, len(chunks), size):
            # A file cancelled (its batch), detached or attached again meanwhile is not
            # embedded further: its key pays for no more than it had asked for.
            if i and not await stores.expects(store_id, file_id, sha256):
                raise IngestError("cancelled", "The file is no longer waiting for this "
                                  "content.")
            batch = [c.text for c in chunks[i: i + size]]
            sent = time.perf_counter()
            answer = await _call(session, "POST", f"{gateway}/v1/embeddings", {
                "model": embedding.name, "input": batch, "encoding_format": "base64"},
                acting_for=key_id, request_id=f"ingest.{store_id}.{file_id}.{i // size}")
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


async def _call(session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any],
                *, acting_for: str | None = None, request_id: str | None = None) -> Any:
    """A call to the gateway (as the key `acting_for`, when given), tried again while the
    gateway is unreachable or failing, or rate limits with a wait it names; any other refusal
    is the file's error."""
    headers = {"content-type": "application/json"}
    if acting_for is not None:
        headers[ON_BEHALF_HEADER] = acting_for
    for attempt in range(1, _ATTEMPTS + 1):
        if request_id is not None:  # each try its own: the ledger keeps an id's first record
            headers["x-request-id"] = f"{request_id}.{uuid.uuid4().hex[:8]}"
        wait = 2.0 * attempt
        try:
            async with session.request(method, url, data=orjson.dumps(body),
                                       headers=headers) as resp:
                status, payload = resp.status, await resp.read()
                retry_after = resp.headers.get("retry-after", "")
        except (aiohttp.ClientConnectionError, TimeoutError):
            if attempt == _ATTEMPTS:
                raise IngestError("server_error", "The gateway could not be reached.") from None
            await asyncio.sleep(wait)
            continue
        if status == 200:
            return orjson.loads(payload)
        code, message = _error(payload)
        if status == 409:
            raise IngestError("cancelled", message)
        # A rate limit passes; a budget spent, an oversized request or a revoked key do not.
        waits = status >= 500 or (status == 429 and retry_after.isdigit())
        if not waits or attempt == _ATTEMPTS:
            if 400 <= status < 500:
                who = f" for key {acting_for}" if acting_for is not None else ""
                raise IngestError(code or "server_error",
                                  f"The gateway refused the request{who} ({status}): {message}")
            raise IngestError("server_error", f"The gateway answered {status}: {message}")
        if retry_after.isdigit():
            wait = float(retry_after)
        await asyncio.sleep(min(wait, _MAX_WAIT_S))
    raise AssertionError("unreachable")


def _error(payload: bytes) -> tuple[str | None, str]:
    """The code and message of an error in OpenAI's shape (or the start of another body)."""
    try:
        error = orjson.loads(payload)["error"]
        return (str(error["code"]) if error.get("code") else None), str(error["message"])[:500]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None, payload[:300].decode(errors="replace")
