"""Starting an eval run, the one way for every caller: a client's `POST /v1/evals/{id}/runs`,
a regression watch's scheduled run (`evals.scheduler`) and fine-tune promotion's runs
(`finetune.promotion`).

The run's data is read and checked when the run is created (size, item schema, message
templates, a retrieval run's vector store and the files its items name), the tenant's queued
and running runs are bounded, and the stored run is handed to the `enqueue` its caller chose:
the gateway's `eval` queue, or a worker that runs it here and now. A refusal is an
`llmops.errors` error whose `param` names the field of the run request at fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import Field, ValidationError

from evals.data import (
    DataError,
    Row,
    check_rows,
    item_reference_messages,
    parse_jsonl,
    parse_message_templates,
    render_messages,
    rows_from_content,
)
from evals.graders import GraderError
from evals.retrieval.metrics import RetrievalQuestion
from evals.retrieval.source import (
    MAX_RESULTS,
    VECTOR_STORE_SEARCH,
    default_ks,
    metric_names,
    questions,
)
from evals.store import Evals, RunLimitError
from llmops.catalog import Catalog
from llmops.errors import (
    BadRequestError,
    ModelNotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from llmops.files import Files
from llmops.settings import EvalsConfig
from llmops.store import Eval, EvalRun
from llmops.wire import Metadata, Open, Wire
from retrieval import InvalidFilterError, parse_filters
from retrieval.stores import VectorStores
from tenancy.tenants import NotFoundError, Principal
from tenancy.visibility import may_see

__all__ = ["Enqueue", "RunIn", "RunStarter", "bad_request", "chat_model", "parse_run"]

Enqueue = Callable[[str], Awaitable[None]]  # hands a stored run, by id, to what runs it


class SourceIn(Open):
    type: Literal["file_id", "file_content", "stored_completions", "responses"]
    id: str | None = None
    content: list[dict[str, Any]] | None = None


class InputMessagesIn(Wire):
    type: Literal["template", "item_reference"]
    template: list[dict[str, Any]] | None = None
    item_reference: str | None = None


class SamplingParamsIn(Wire):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    reasoning_effort: str | None = None


class DataSourceIn(Open):
    type: Literal["jsonl", "completions", "responses", "vector_store_search"]
    source: SourceIn
    model: str | None = Field(None, max_length=256)
    input_messages: InputMessagesIn | None = None
    sampling_params: SamplingParamsIn | None = None


class RagIn(Wire):
    """A `vector_store_search` run's RAG answers: the model asked, with the chat `retrieval`
    extension on the run's store."""

    model: str = Field(max_length=256)
    sampling_params: SamplingParamsIn | None = None
    max_num_results: int = Field(5, ge=1, le=MAX_RESULTS)
    score_threshold: float | None = Field(None, ge=0, le=1)


class VectorStoreSearchIn(Wire):
    """Our data source for retrieval evals: items `{"question", "file_id"?, "filename"?,
    "span"?, "answer"?}` searched in one vector store."""

    type: Literal["vector_store_search"]
    vector_store_id: str = Field(max_length=64)
    source: SourceIn
    max_num_results: int = Field(10, ge=1, le=MAX_RESULTS)
    ks: list[int] | None = Field(None, min_length=1, max_length=10)
    filters: dict[str, Any] | None = None
    search_mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    rag: RagIn | None = None


class RunIn(Wire):
    """The body of `POST /v1/evals/{eval_id}/runs`."""

    name: str | None = Field(None, max_length=256)
    metadata: Metadata | None = None
    data_source: DataSourceIn


def chat_model(catalog: Catalog, who: Principal, name: str) -> bool:
    """`name` is a chat model that `who` may see and use: one to sample or to grade with."""
    entry = catalog.resolve(name)
    return entry is not None and entry.base.kind == "chat" and may_see(catalog, who, entry)


def bad_request(exc: DataError | GraderError) -> BadRequestError:
    return BadRequestError(exc.message, param=exc.param)


def _invalid(exc: ValidationError, within: str = "") -> BadRequestError:
    """Pydantic's first complaint about a body, worded as the API words a malformed request
    (`gateway.http.errors`): the field's path, `within` the given one, names the param."""
    first = exc.errors()[0]
    param = (within + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                              for p in first["loc"])).removeprefix(".")
    if not param:
        return BadRequestError(str(first["msg"]))
    return BadRequestError(f"{param}: {first['msg']}", param=param)


def parse_run(body: dict[str, Any]) -> RunIn:
    """A run request made by our own code (a watch's, promotion's), refused as the API refuses
    a client's malformed one."""
    try:
        return RunIn.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _too_many(exc: RunLimitError) -> RateLimitError:
    return RateLimitError(str(exc), code="too_many_eval_runs")


def _missing_model(model: str, param: str) -> ModelNotFoundError:
    exc = ModelNotFoundError(model)
    exc.param = param
    return exc


class RunStarter:
    """Checks, stores and hands over new runs. `enqueue` takes a stored run's id; when it
    refuses (ServiceUnavailableError) the run is deleted again, so that nothing is left queued
    that nothing will run. `stores`: the vector stores retrieval runs search; None where none
    are served (no embedding model), and such runs are refused."""

    def __init__(self, evals: Evals, files: Files, catalog: Catalog, limits: EvalsConfig,
                 enqueue: Enqueue, stores: VectorStores | None = None) -> None:
        self.evals = evals
        self.files = files
        self.catalog = catalog
        self.limits = limits
        self.enqueue = enqueue
        self.stores = stores

    async def start(self, who: Principal, ev: Eval, request: RunIn) -> EvalRun:
        """A new run of `ev` (an eval of `who`'s tenant), made as `who`: its model calls are
        made as that key, so its limits and ledger apply. Returns the run as it was stored,
        queued (an `enqueue` that runs it at once leaves the finished run in the store)."""
        ds = request.data_source
        if ds.type == "responses":
            raise BadRequestError("Data source type 'responses' is not supported: there is "
                                  "no Responses API here. Use 'completions' or 'jsonl'.",
                                  param="data_source.type")
        max_active = self.limits.max_active_runs
        if await self.evals.active_runs(who.tenant_id) >= max_active:
            # refused before reading any data; create_run counts again, atomically
            raise _too_many(RunLimitError(max_active))
        schema = ev.data_source_config.get("item_schema")
        spec = (await self._retrieval_spec(who, ds, ev) if ds.type == VECTOR_STORE_SEARCH
                else None)

        def check(rows: list[Row]) -> list[RetrievalQuestion]:
            check_rows(rows, schema)
            if ds.type == "completions":
                self._check_sampling(who, ds, rows, schema)
            elif spec is not None:
                return questions(rows)
            elif ds.model is not None or ds.input_messages is not None:
                raise DataError("A jsonl run grades the samples given with its items: it "
                                "takes no model or input_messages (use 'completions').",
                                "data_source.type")
            return []

        try:
            rows = await self._rows(who, ds.source)
            asked = await asyncio.to_thread(check, rows)  # up to max_items: off the event loop
            if spec is not None:
                await self._check_named_files(who, spec, asked)
        except DataError as exc:
            raise bad_request(exc) from None
        if spec is None:
            model, data_source = ds.model or "", ds.model_dump(exclude_none=True)
            name = f"{model or 'jsonl'} run"
        else:
            model = spec.rag.model if spec.rag else ""
            data_source = spec.model_dump(exclude_none=True)
            name = f"{spec.vector_store_id} retrieval"
        try:
            run = await self.evals.create_run(
                ev, key_id=who.key_id, name=request.name or name, model=model,
                data_source=data_source, metadata=request.metadata or {},
                items_total=len(rows), max_active=max_active)
        except RunLimitError as exc:
            raise _too_many(exc) from None
        try:
            await self.enqueue(run.id)
        except ServiceUnavailableError:
            await self.evals.delete_run(ev.tenant_id, ev.id, run.id)
            raise
        return run

    async def _rows(self, who: Principal, source: SourceIn) -> list[Row]:
        if source.type in ("stored_completions", "responses"):
            raise BadRequestError(
                f"Source type '{source.type}' is not supported: this platform does not store "
                "completions. Use 'file_id' or 'file_content'.",
                param="data_source.source.type")
        limits = self.limits
        if source.type == "file_content":
            return rows_from_content(source.content or [], limits.max_items)
        if not source.id:
            raise BadRequestError("A file_id source needs the file's id.",
                                  param="data_source.source.id")
        try:
            stored = await self.files.get(who.tenant_id, source.id)
        except NotFoundError:
            raise BadRequestError(f"File {source.id} not found.",
                                  param="data_source.source.id") from None
        if stored.bytes > limits.max_file_bytes:
            raise BadRequestError(f"File {source.id} has {stored.bytes} bytes; an eval's data "
                                  f"file may have at most {limits.max_file_bytes}.",
                                  param="data_source.source.id")
        data = await asyncio.to_thread(self.files.path(stored).read_bytes)
        return await asyncio.to_thread(parse_jsonl, data, limits.max_items)

    def _check_sampling(self, who: Principal, ds: DataSourceIn, rows: list[Row],
                        schema: dict[str, Any] | None) -> None:
        if not ds.model:
            raise BadRequestError("A completions run needs the model to evaluate.",
                                  param="data_source.model")
        if not chat_model(self.catalog, who, ds.model):
            raise _missing_model(ds.model, "data_source.model")
        messages = ds.input_messages
        if messages is None:
            raise BadRequestError("A completions run needs input_messages (a template, or "
                                  "an item_reference).", param="data_source.input_messages")
        if ds.sampling_params is not None and ds.sampling_params.reasoning_effort is not None:
            raise BadRequestError("reasoning_effort is not supported by the served models.",
                                  param="data_source.sampling_params.reasoning_effort")
        if messages.type == "template":
            templates = parse_message_templates(messages.template, schema)
            for i, row in enumerate(rows):
                try:
                    render_messages(templates, row.item)
                except DataError as exc:
                    raise DataError(f"Item {i}: {exc.message}",
                                    "data_source.input_messages.template") from None
        else:
            ref = messages.item_reference or ""
            if not ref.startswith("item."):
                raise BadRequestError("item_reference must name a field of the item, as "
                                      "'item.<field>'.",
                                      param="data_source.input_messages.item_reference")
            for i, row in enumerate(rows):
                try:
                    item_reference_messages(ref, row.item)
                except DataError as exc:
                    raise DataError(f"Item {i}: {exc.message}",
                                    "data_source.input_messages.item_reference") from None

    async def _retrieval_spec(self, who: Principal, ds: DataSourceIn, ev: Eval
                              ) -> VectorStoreSearchIn:
        """A `vector_store_search` data source, checked but for its items."""
        try:
            spec = VectorStoreSearchIn.model_validate(ds.model_dump(exclude_none=True))
        except ValidationError as exc:
            raise _invalid(exc, "data_source") from None
        if self.stores is None:
            raise BadRequestError("Retrieval runs need vector stores, which this gateway does "
                                  "not serve (no embedding model is configured).",
                                  param="data_source.type")
        try:
            await self.stores.get(who.tenant_id, spec.vector_store_id)
        except NotFoundError:
            raise BadRequestError(f"Vector store {spec.vector_store_id} not found.",
                                  param="data_source.vector_store_id") from None
        ks = sorted(set(spec.ks or default_ks(spec.max_num_results)))
        if not all(1 <= k <= spec.max_num_results for k in ks):
            raise BadRequestError("Each of ks must be between 1 and max_num_results "
                                  f"({spec.max_num_results}).", param="data_source.ks")
        spec.ks = ks
        if spec.filters is not None:
            try:
                parse_filters(spec.filters)
            except InvalidFilterError as exc:
                raise BadRequestError(str(exc), param=f"data_source.{exc.param}") from None
        if spec.rag is not None:
            if not chat_model(self.catalog, who, spec.rag.model):
                raise _missing_model(spec.rag.model, "data_source.rag.model")
            if spec.rag.sampling_params and spec.rag.sampling_params.reasoning_effort:
                raise BadRequestError(
                    "reasoning_effort is not supported by the served models.",
                    param="data_source.rag.sampling_params.reasoning_effort")
            metrics = metric_names(spec.model_dump())
            for criterion in ev.testing_criteria:  # their tallies would be added together
                if criterion.get("name") in metrics:
                    raise BadRequestError(
                        f"The eval's testing criterion '{criterion['name']}' has the name of a "
                        "retrieval metric; rename it to grade RAG answers with it.",
                        param="data_source.rag")
        return spec

    async def _check_named_files(self, who: Principal, spec: VectorStoreSearchIn,
                                 asked: list[RetrievalQuestion]) -> None:
        """A question that names a file the store does not hold could never be answered."""
        assert self.stores is not None  # a retrieval spec was checked first
        held = await self.stores.store_filenames(who.tenant_id, spec.vector_store_id)
        names = set(held.values())
        for i, q in enumerate(asked):
            if q.file_id is not None and q.file_id not in held:
                raise DataError(f"Item {i}: file {q.file_id} is not in vector store "
                                f"{spec.vector_store_id}.", "data_source.source")
            if q.filename is not None and q.filename not in names:
                raise DataError(f"Item {i}: no file named {q.filename!r} is in vector store "
                                f"{spec.vector_store_id}.", "data_source.source")
