"""OpenAI's Evals API: `POST/GET /v1/evals`, `GET/POST/DELETE /v1/evals/{id}`,
`POST/GET /v1/evals/{id}/runs`, `GET/DELETE /v1/evals/{id}/runs/{run_id}`, cancel as
`POST /v1/evals/{id}/runs/{run_id}` (OpenAI's API) or `POST .../{run_id}/cancel` (what the
official client sends), and `GET .../runs/{run_id}/output_items[/{item_id}]`.

A run's data comes from a file uploaded with `POST /v1/files` or inline `file_content`; it is
checked here, when the run is created (size, item schema, message templates), and the run is
queued on the `eval` queue. Workers sample the evaluated model and call model graders through
this gateway, as the key that created the run, so its limits and the usage ledger apply.

What is not supported is refused by name: `logs` and `stored_completions` data sources (the
platform does not store completions) and `responses` runs (there is no Responses API here).
Our additions to OpenAI's objects: `datasource_item_count` on runs, `errored` in
`per_testing_criteria_results`, and `type`, `error` and `detail` in an output item's results;
the `vector_store_search` run data source, which evaluates retrieval from a vector store
(`evals.retrieval.source`), and its runs' `retrieval` figures (recall@k, MRR).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import tenancy
from evals.data import (
    DataError,
    Row,
    check_item_schema,
    check_rows,
    item_reference_messages,
    parse_jsonl,
    parse_message_templates,
    render_messages,
    rows_from_content,
)
from evals.graders import GraderError, LabelModelGrader, ScoreModelGrader, parse_criteria
from evals.retrieval.metrics import RetrievalQuestion
from evals.retrieval.source import (
    MAX_RESULTS,
    VECTOR_STORE_SEARCH,
    default_ks,
    metric_names,
    questions,
    summary,
)
from evals.store import RUN_STATUSES, TERMINAL, Evals, RunLimitError
from gateway.http.auth import authenticated
from gateway.tasks import enqueue
from llmops.catalog import Catalog
from llmops.errors import (
    BadRequestError,
    ModelNotFoundError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Eval, EvalOutputItem, EvalRun
from retrieval import InvalidFilterError, parse_filters
from retrieval.stores import VectorStores
from tenancy.auth import Authenticator
from tenancy.tenants import Principal
from workers.app import EVAL_TASK

__all__ = ["eval_out", "evals_router", "item_out", "run_out"]

Metadata = Annotated[dict[Annotated[str, Field(max_length=64)],
                          Annotated[str, Field(max_length=512)]], Field(max_length=16)]

# What a `completions` run's sample holds, as graders see it (the `sample` namespace).
SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"output_text": {"type": "string"}, "output_json": {"type": "object"},
                   "output_tools": {"type": "array"}, "choices": {"type": "array"}},
    "required": ["output_text"],
}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    # Fields of variants we refuse by name are let through, so the refusal can say why.
    model_config = ConfigDict(extra="allow")


class DataSourceConfigIn(_Open):
    type: Literal["custom", "logs", "stored_completions"]
    item_schema: dict[str, Any] | None = None
    include_sample_schema: bool = False


class EvalIn(_Wire):
    name: str | None = Field(None, max_length=256)
    metadata: Metadata | None = None
    data_source_config: DataSourceConfigIn
    testing_criteria: list[dict[str, Any]] = Field(min_length=1, max_length=32)


class EvalPatch(_Wire):
    name: str | None = Field(None, max_length=256)
    metadata: Metadata | None = None


class SourceIn(_Open):
    type: Literal["file_id", "file_content", "stored_completions", "responses"]
    id: str | None = None
    content: list[dict[str, Any]] | None = None


class InputMessagesIn(_Wire):
    type: Literal["template", "item_reference"]
    template: list[dict[str, Any]] | None = None
    item_reference: str | None = None


class SamplingParamsIn(_Wire):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    reasoning_effort: str | None = None


class DataSourceIn(_Open):
    type: Literal["jsonl", "completions", "responses", "vector_store_search"]
    source: SourceIn
    model: str | None = Field(None, max_length=256)
    input_messages: InputMessagesIn | None = None
    sampling_params: SamplingParamsIn | None = None


class RagIn(_Wire):
    """A `vector_store_search` run's RAG answers: the model asked, with the chat `retrieval`
    extension on the run's store."""

    model: str = Field(max_length=256)
    sampling_params: SamplingParamsIn | None = None
    max_num_results: int = Field(5, ge=1, le=MAX_RESULTS)
    score_threshold: float | None = Field(None, ge=0, le=1)


class VectorStoreSearchIn(_Wire):
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


class RunIn(_Wire):
    name: str | None = Field(None, max_length=256)
    metadata: Metadata | None = None
    data_source: DataSourceIn


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _config_out(config: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's view of a custom data source: the schema of the `item` (and `sample`)
    namespaces together."""
    properties: dict[str, Any] = {"item": config.get("item_schema") or {"type": "object"}}
    required = ["item"]
    if config.get("include_sample_schema"):
        properties["sample"] = SAMPLE_SCHEMA
        required.append("sample")
    return {"type": "custom",
            "schema": {"type": "object", "properties": properties, "required": required}}


def eval_out(ev: Eval) -> dict[str, Any]:
    return {"object": "eval", "id": ev.id, "name": ev.name,
            "created_at": _ts(ev.created_at), "metadata": ev.metadata_,
            "data_source_config": _config_out(ev.data_source_config),
            "testing_criteria": ev.testing_criteria}


def _criteria_names(run: EvalRun, ev: Eval) -> list[str]:
    """The eval's criteria, and a retrieval run's metrics (without `rag` it has no answer
    for the eval's criteria to grade)."""
    names = [str(spec.get("name")) for spec in ev.testing_criteria]
    if run.data_source.get("type") != VECTOR_STORE_SEARCH:
        return names
    return (names if run.data_source.get("rag") else []) + metric_names(run.data_source)


def run_out(run: EvalRun, ev: Eval, base_url: str) -> dict[str, Any]:
    counts = run.per_criteria
    per_criteria = [{"testing_criteria": name, "passed": int(c.get("passed", 0)),
                     "failed": int(c.get("failed", 0)), "errored": int(c.get("errored", 0))}
                    for name in _criteria_names(run, ev) for c in [counts.get(name, {})]]
    usage = [{"model_name": model, "invocation_count": int(u.get("invocation_count", 0)),
              "prompt_tokens": int(u.get("prompt_tokens", 0)),
              "completion_tokens": int(u.get("completion_tokens", 0)),
              "total_tokens": int(u.get("total_tokens", 0)),
              "cached_tokens": int(u.get("cached_tokens", 0))}
             for model, u in sorted(run.per_model_usage.items())]
    extra = ({"retrieval": summary(run.data_source, counts,
                                   run.passed + run.failed + run.errored)}
             if run.data_source.get("type") == VECTOR_STORE_SEARCH else {})
    return {
        "object": "eval.run", "id": run.id, "eval_id": run.eval_id, "name": run.name,
        "model": run.model, "status": run.status, "created_at": _ts(run.created_at),
        "data_source": run.data_source, "metadata": run.metadata_, "error": run.error,
        "report_url": f"{base_url.rstrip('/')}/v1/evals/{run.eval_id}/runs/{run.id}",
        "result_counts": {"total": run.passed + run.failed + run.errored,
                          "passed": run.passed, "failed": run.failed,
                          "errored": run.errored},
        "per_testing_criteria_results": per_criteria, "per_model_usage": usage,
        "datasource_item_count": run.items_total, **extra,
    }


def item_out(item: EvalOutputItem) -> dict[str, Any]:
    return {"object": "eval.run.output_item", "id": item.id, "run_id": item.run_id,
            "eval_id": item.eval_id, "created_at": _ts(item.created_at),
            "status": item.status, "datasource_item_id": item.datasource_item_id,
            "datasource_item": item.datasource_item, "results": item.results,
            "sample": item.sample}


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise BadRequestError("'limit' must be between 1 and 100.", param="limit")
    return limit


def _bad(exc: DataError | GraderError) -> BadRequestError:
    return BadRequestError(exc.message, param=exc.param)


def _too_many(exc: RunLimitError) -> RateLimitError:
    return RateLimitError(str(exc), code="too_many_eval_runs")


def evals_router(settings: Settings, evals: Evals, files: Files, catalog: Catalog,
                 celery: Celery, auth: Authenticator, stores: VectorStores | None = None
                 ) -> APIRouter:
    """`stores`: the vector stores retrieval runs search; None where none are served (no
    embedding model), and such runs are refused."""
    router = APIRouter(prefix="/v1/evals", tags=["evals"],
                       dependencies=[Depends(authenticated(auth))])
    limits = settings.evals

    def chat_model(who: Principal, name: str) -> bool:
        entry = catalog.resolve(name)
        return (entry is not None and entry.base.kind == "chat" and who.may_use(entry.name)
                and catalog.visible_to(entry, who.tenant_id, who.is_admin))

    async def owned(request: Request, eval_id: str) -> Eval:
        try:
            return await evals.get(request.state.principal.tenant_id, eval_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="eval_id") from None

    async def owned_run(request: Request, eval_id: str, run_id: str) -> tuple[Eval, EvalRun]:
        ev = await owned(request, eval_id)
        try:
            return ev, await evals.get_run(ev.tenant_id, eval_id, run_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="run_id") from None

    @router.post("")
    async def create(request: Request, body: EvalIn) -> dict[str, Any]:
        who: Principal = request.state.principal
        config = body.data_source_config
        if config.type != "custom":
            raise BadRequestError(
                f"data_source_config type '{config.type}' is not supported: this platform "
                "does not store completions. Use 'custom' with an item_schema and run the "
                "eval on a file of items.", param="data_source_config.type")
        if config.item_schema is None:
            raise BadRequestError("A custom data source needs an item_schema.",
                                  param="data_source_config.item_schema")
        try:
            check_item_schema(config.item_schema)
            graders = parse_criteria(body.testing_criteria, config.item_schema)
        except (DataError, GraderError) as exc:
            raise _bad(exc) from None
        for i, grader in enumerate(graders):
            if isinstance(grader, ScoreModelGrader | LabelModelGrader) \
                    and not chat_model(who, grader.model):
                raise BadRequestError(
                    f"The model `{grader.model}` does not exist or you do not have access to "
                    "it.", param=f"testing_criteria[{i}].model", code="model_not_found")
        ev = await evals.create(
            tenant_id=who.tenant_id, key_id=who.key_id, name=body.name or "",
            metadata=body.metadata or {},
            data_source_config={"type": "custom", "item_schema": config.item_schema,
                                "include_sample_schema": config.include_sample_schema},
            testing_criteria=body.testing_criteria)
        return eval_out(ev)

    @router.get("")
    async def list_evals(request: Request, limit: int = 20, after: str | None = None,
                         order: Literal["asc", "desc"] = "asc",
                         order_by: Literal["created_at", "updated_at"] = "created_at"
                         ) -> dict[str, Any]:
        try:
            rows, more = await evals.list_evals(request.state.principal.tenant_id,
                                                limit=_limit(limit), after=after, order=order,
                                                order_by=order_by)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return _page([eval_out(r) for r in rows], more)

    @router.get("/{eval_id}")
    async def retrieve(request: Request, eval_id: str) -> dict[str, Any]:
        return eval_out(await owned(request, eval_id))

    @router.post("/{eval_id}")
    async def update(request: Request, eval_id: str, body: EvalPatch) -> dict[str, Any]:
        ev = await owned(request, eval_id)
        return eval_out(await evals.update(ev.tenant_id, eval_id, name=body.name,
                                           metadata=body.metadata))

    @router.delete("/{eval_id}")
    async def delete(request: Request, eval_id: str) -> dict[str, Any]:
        ev = await owned(request, eval_id)
        await evals.delete(ev.tenant_id, eval_id)
        return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}

    async def load_rows(who: Principal, source: SourceIn) -> list[Row]:
        if source.type in ("stored_completions", "responses"):
            raise BadRequestError(
                f"Source type '{source.type}' is not supported: this platform does not store "
                "completions. Use 'file_id' or 'file_content'.",
                param="data_source.source.type")
        if source.type == "file_content":
            return rows_from_content(source.content or [], limits.max_items)
        if not source.id:
            raise BadRequestError("A file_id source needs the file's id.",
                                  param="data_source.source.id")
        try:
            stored = await files.get(who.tenant_id, source.id)
        except tenancy.NotFoundError:
            raise BadRequestError(f"File {source.id} not found.",
                                  param="data_source.source.id") from None
        if stored.bytes > limits.max_file_bytes:
            raise BadRequestError(f"File {source.id} has {stored.bytes} bytes; an eval's data "
                                  f"file may have at most {limits.max_file_bytes}.",
                                  param="data_source.source.id")
        data = await asyncio.to_thread(files.path(stored).read_bytes)
        return await asyncio.to_thread(parse_jsonl, data, limits.max_items)

    def check_sampling(who: Principal, ds: DataSourceIn, rows: list[Row],
                       schema: dict[str, Any] | None) -> None:
        if not ds.model:
            raise BadRequestError("A completions run needs the model to evaluate.",
                                  param="data_source.model")
        if not chat_model(who, ds.model):
            exc = ModelNotFoundError(ds.model)
            exc.param = "data_source.model"
            raise exc
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

    async def retrieval_spec(who: Principal, ds: DataSourceIn, ev: Eval
                             ) -> VectorStoreSearchIn:
        """A `vector_store_search` data source, checked but for its items."""
        try:
            spec = VectorStoreSearchIn.model_validate(ds.model_dump(exclude_none=True))
        except ValidationError as exc:
            first = exc.errors()[0]
            param = "data_source" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                            for p in first["loc"])
            raise BadRequestError(f"{param}: {first['msg']}", param=param) from None
        if stores is None:
            raise BadRequestError("Retrieval runs need vector stores, which this gateway does "
                                  "not serve (no embedding model is configured).",
                                  param="data_source.type")
        try:
            await stores.get(who.tenant_id, spec.vector_store_id)
        except tenancy.NotFoundError:
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
            if not chat_model(who, spec.rag.model):
                missing = ModelNotFoundError(spec.rag.model)
                missing.param = "data_source.rag.model"
                raise missing
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

    async def check_named_files(who: Principal, spec: VectorStoreSearchIn,
                                asked: list[RetrievalQuestion]) -> None:
        """A question that names a file the store does not hold could never be answered."""
        assert stores is not None
        held = await stores.store_filenames(who.tenant_id, spec.vector_store_id)
        names = set(held.values())
        for i, q in enumerate(asked):
            if q.file_id is not None and q.file_id not in held:
                raise DataError(f"Item {i}: file {q.file_id} is not in vector store "
                                f"{spec.vector_store_id}.", "data_source.source")
            if q.filename is not None and q.filename not in names:
                raise DataError(f"Item {i}: no file named {q.filename!r} is in vector store "
                                f"{spec.vector_store_id}.", "data_source.source")

    @router.post("/{eval_id}/runs")
    async def create_run(request: Request, eval_id: str, body: RunIn) -> dict[str, Any]:
        who: Principal = request.state.principal
        ev = await owned(request, eval_id)
        ds = body.data_source
        if ds.type == "responses":
            raise BadRequestError("Data source type 'responses' is not supported: there is "
                                  "no Responses API here. Use 'completions' or 'jsonl'.",
                                  param="data_source.type")
        if await evals.active_runs(who.tenant_id) >= limits.max_active_runs:
            # refused before reading any data; create_run counts again, atomically
            raise _too_many(RunLimitError(limits.max_active_runs))
        schema = ev.data_source_config.get("item_schema")
        spec = await retrieval_spec(who, ds, ev) if ds.type == VECTOR_STORE_SEARCH else None

        def check(rows: list[Row]) -> list[RetrievalQuestion]:
            check_rows(rows, schema)
            if ds.type == "completions":
                check_sampling(who, ds, rows, schema)
            elif spec is not None:
                return questions(rows)
            elif ds.model is not None or ds.input_messages is not None:
                raise DataError("A jsonl run grades the samples given with its items: it "
                                "takes no model or input_messages (use 'completions').",
                                "data_source.type")
            return []

        try:
            rows = await load_rows(who, ds.source)
            asked = await asyncio.to_thread(check, rows)  # up to max_items: off the event loop
            if spec is not None:
                await check_named_files(who, spec, asked)
        except DataError as exc:
            raise _bad(exc) from None
        if spec is None:
            model, data_source = ds.model or "", ds.model_dump(exclude_none=True)
            name = f"{model or 'jsonl'} run"
        else:
            model = spec.rag.model if spec.rag else ""
            data_source = spec.model_dump(exclude_none=True)
            name = f"{spec.vector_store_id} retrieval"
        try:
            run = await evals.create_run(
                ev, key_id=who.key_id, name=body.name or name, model=model,
                data_source=data_source, metadata=body.metadata or {}, items_total=len(rows),
                max_active=limits.max_active_runs)
        except RunLimitError as exc:
            raise _too_many(exc) from None
        try:
            await enqueue(celery, EVAL_TASK, [run.id])
        except ServiceUnavailableError:
            await evals.delete_run(ev.tenant_id, ev.id, run.id)
            raise
        return run_out(run, ev, str(request.base_url))

    @router.get("/{eval_id}/runs")
    async def list_runs(request: Request, eval_id: str, limit: int = 20,
                        after: str | None = None, order: Literal["asc", "desc"] = "asc",
                        status: str | None = None) -> dict[str, Any]:
        ev = await owned(request, eval_id)
        if status is not None and status not in RUN_STATUSES:
            raise BadRequestError(f"status must be one of {list(RUN_STATUSES)}.",
                                  param="status")
        try:
            rows, more = await evals.list_runs(ev.tenant_id, eval_id, limit=_limit(limit),
                                               after=after, order=order, status=status)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        base = str(request.base_url)
        return _page([run_out(r, ev, base) for r in rows], more)

    @router.get("/{eval_id}/runs/{run_id}")
    async def retrieve_run(request: Request, eval_id: str, run_id: str) -> dict[str, Any]:
        ev, run = await owned_run(request, eval_id, run_id)
        return run_out(run, ev, str(request.base_url))

    async def cancel(request: Request, eval_id: str, run_id: str) -> dict[str, Any]:
        ev, run = await owned_run(request, eval_id, run_id)
        if run.status in TERMINAL:
            raise BadRequestError(f"Run {run_id} has already {run.status}.", param="run_id")
        run = await evals.cancel_run(ev.tenant_id, eval_id, run_id)
        return run_out(run, ev, str(request.base_url))

    # OpenAI's API cancels with a POST to the run; its Python client posts to `/cancel`.
    router.add_api_route("/{eval_id}/runs/{run_id}", cancel, methods=["POST"])
    router.add_api_route("/{eval_id}/runs/{run_id}/cancel", cancel, methods=["POST"])

    @router.delete("/{eval_id}/runs/{run_id}")
    async def delete_run(request: Request, eval_id: str, run_id: str) -> dict[str, Any]:
        ev, run = await owned_run(request, eval_id, run_id)
        if run.status not in TERMINAL:
            await evals.cancel_run(ev.tenant_id, eval_id, run_id)  # its worker stops
        await evals.delete_run(ev.tenant_id, eval_id, run_id)
        return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}

    @router.get("/{eval_id}/runs/{run_id}/output_items")
    async def list_items(request: Request, eval_id: str, run_id: str, limit: int = 20,
                         after: str | None = None, order: Literal["asc", "desc"] = "asc",
                         status: Literal["pass", "fail", "error"] | None = None
                         ) -> dict[str, Any]:
        ev, _ = await owned_run(request, eval_id, run_id)
        try:
            rows, more = await evals.list_items(ev.tenant_id, eval_id, run_id,
                                                limit=_limit(limit), after=after, order=order,
                                                status=status)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return _page([item_out(r) for r in rows], more)

    @router.get("/{eval_id}/runs/{run_id}/output_items/{item_id}")
    async def retrieve_item(request: Request, eval_id: str, run_id: str, item_id: str
                            ) -> dict[str, Any]:
        ev, _ = await owned_run(request, eval_id, run_id)
        try:
            return item_out(await evals.get_item(ev.tenant_id, eval_id, run_id, item_id))
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="output_item_id") from None

    return router
