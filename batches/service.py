"""Creating and cancelling batches, as the API asks (`POST /v1/batches`,
`POST /v1/batches/{id}/cancel`). A request's parameters are checked first (an error naming
its `param`); then every line of the input file is validated before anything runs: a file
with a bad line makes a `failed` batch that lists them, and a good one a `validating` batch
handed to `enqueue`, which a worker takes and runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from pydantic import Field

from batches.store import Batches
from batches.validation import ENDPOINTS, EndpointRule, validate
from llmops.catalog import Catalog
from llmops.errors import (
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from llmops.files import Files
from llmops.settings import BatchesConfig
from llmops.store import Batch
from llmops.wire import Metadata, Wire
from tenancy import NotFoundError as MissingError
from tenancy.tenants import Principal

__all__ = ["WINDOWS", "BatchIn", "BatchService", "Enqueue"]

Enqueue = Callable[[str], Awaitable[None]]  # hands a stored batch, by id, to what runs it

WINDOWS = {"24h": timedelta(hours=24)}  # OpenAI's only completion window


class BatchIn(Wire):
    """The body of `POST /v1/batches`."""

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: Metadata | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted; outputs do not expire here


class BatchService:
    """`rules`: how each endpoint reads a body (the gateway's own parsers)."""

    def __init__(self, batches: Batches, files: Files, catalog: Catalog, config: BatchesConfig,
                 rules: Mapping[str, EndpointRule], enqueue: Enqueue,
                 max_line_bytes: int) -> None:
        self.batches = batches
        self.files = files
        self.catalog = catalog
        self.config = config
        self.rules = rules
        self.enqueue = enqueue
        self.max_line_bytes = max_line_bytes

    async def create(self, who: Principal, request: BatchIn) -> Batch:
        if request.endpoint not in ENDPOINTS:
            raise BadRequestError(f"'endpoint' must be one of {list(ENDPOINTS)}.",
                                  param="endpoint")
        window = WINDOWS.get(request.completion_window)
        if window is None:
            raise BadRequestError(f"'completion_window' must be one of {list(WINDOWS)}.",
                                  param="completion_window")
        try:
            stored = await self.files.get(who.tenant_id, request.input_file_id)
        except MissingError:
            raise NotFoundError(f"No such File object: {request.input_file_id}",
                                param="input_file_id") from None
        if stored.purpose != "batch":
            raise BadRequestError(f"File {stored.id} has purpose '{stored.purpose}'; a batch's "
                                  "input file must have purpose 'batch'.",
                                  param="input_file_id")
        limit = self.config.max_file_bytes
        if stored.bytes > limit:
            raise BadRequestError(f"File {stored.id} has {stored.bytes} bytes; a batch's input "
                                  f"file may have at most {limit}.", param="input_file_id")
        if await self.batches.active(who.tenant_id) >= self.config.max_active:
            raise RateLimitError(f"Your organization has {self.config.max_active} batches "
                                 "in progress, the most it may have; wait for one to finish "
                                 "or cancel one.", code="too_many_batches")
        data = await asyncio.to_thread(self.files.path(stored).read_bytes)
        checked = await asyncio.to_thread(
            validate, data, request.endpoint, self.rules, self.catalog, who,
            max_line_bytes=self.max_line_bytes, max_errors=self.config.max_errors)
        total = len(checked.lines) + checked.error_count
        if total == 0:
            raise BadRequestError(f"File {stored.id} holds no requests.",
                                  param="input_file_id")
        if total > self.config.max_lines:
            raise BadRequestError(f"File {stored.id} holds {total} requests; a batch may have "
                                  f"at most {self.config.max_lines}.", param="input_file_id")
        errors = [e.as_dict() for e in checked.errors] or None
        batch = await self.batches.create(
            tenant_id=who.tenant_id, key_id=who.key_id, endpoint=request.endpoint,
            input_file_id=stored.id, completion_window=request.completion_window,
            window=window, metadata=request.metadata, total=total, errors=errors)
        if errors is None:
            try:
                await self.enqueue(batch.id)
            except ServiceUnavailableError:
                await self.batches.discard(batch.id)
                raise
        return batch

    async def cancel(self, who: Principal, batch_id: str) -> Batch:
        batch = await self.get(who, batch_id)
        if batch.status not in ("validating", "in_progress", "cancelling"):
            raise BadRequestError(f"Batch {batch_id} cannot be cancelled: it is "
                                  f"{batch.status}.", param="batch_id",
                                  code="batch_not_cancellable")
        batch, held = await self.batches.cancel(who.tenant_id, batch_id)
        if not held:  # a worker must still write out what was done
            await self.enqueue(batch.id)
        return batch

    async def get(self, who: Principal, batch_id: str) -> Batch:
        try:
            return await self.batches.get(who.tenant_id, batch_id)
        except MissingError as exc:
            raise NotFoundError(str(exc), param="batch_id") from None

    async def list_batches(self, who: Principal, *, limit: int, after: str | None
                   ) -> tuple[list[Batch], bool]:
        try:
            return await self.batches.list_batches(who.tenant_id, limit=limit, after=after)
        except MissingError as exc:
            raise NotFoundError(str(exc), param="after") from None
