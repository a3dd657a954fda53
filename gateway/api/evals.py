"""OpenAI's Evals API: `POST/GET /v1/evals`, `GET/POST/DELETE /v1/evals/{id}`,
`POST/GET /v1/evals/{id}/runs`, `GET/DELETE /v1/evals/{id}/runs/{run_id}`, cancel as
`POST /v1/evals/{id}/runs/{run_id}` (OpenAI's API) or `POST .../{run_id}/cancel` (what the
official client sends), and `GET .../runs/{run_id}/output_items[/{item_id}]`.

A run's data comes from a file uploaded with `POST /v1/files` or inline `file_content`; it is
checked when the run is created (size, item schema, message templates), and the run is queued
on the `eval` queue (`evals.runs`, which starts every run, a watch's too). Workers sample the
evaluated model and call model graders through this gateway, as the key that created the run,
so its limits and the usage ledger apply.

What is not supported is refused by name: `logs` and `stored_completions` data sources (the
platform does not store completions) and `responses` runs (there is no Responses API here).
Our additions to OpenAI's objects: `datasource_item_count` on runs, `errored` in
`per_testing_criteria_results`, and `type`, `error` and `detail` in an output item's results;
the `vector_store_search` run data source, which evaluates retrieval from a vector store
(`evals.retrieval.source`), and its runs' `retrieval` figures (recall@k, MRR).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

import tenancy
from evals.data import DataError, check_item_schema
from evals.graders import GraderError, LabelModelGrader, ScoreModelGrader, parse_criteria
from evals.retrieval.source import VECTOR_STORE_SEARCH, metric_names, summary
from evals.runs import RunIn, RunStarter, bad_request, chat_model
from evals.store import RUN_STATUSES, TERMINAL, Evals
from gateway.http.auth import Authenticated
from gateway.http.paging import bounded, page
from gateway.http.timestamps import epoch
from llmops.catalog import Catalog
from llmops.errors import BadRequestError, NotFoundError
from llmops.store import Eval, EvalOutputItem, EvalRun
from llmops.wire import Metadata, Open, Wire
from tenancy.tenants import Principal

__all__ = ["eval_out", "evals_router", "item_out", "run_out"]

# What a `completions` run's sample holds, as graders see it (the `sample` namespace).
SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"output_text": {"type": "string"}, "output_json": {"type": "object"},
                   "output_tools": {"type": "array"}, "choices": {"type": "array"}},
    "required": ["output_text"],
}


class DataSourceConfigIn(Open):
    type: Literal["custom", "logs", "stored_completions"]
    item_schema: dict[str, Any] | None = None
    include_sample_schema: bool = False


class EvalIn(Wire):
    name: str | None = Field(None, max_length=256)
    metadata: Metadata | None = None
    data_source_config: DataSourceConfigIn
    testing_criteria: list[dict[str, Any]] = Field(min_length=1, max_length=32)


class EvalPatch(Wire):
    name: str | None = Field(None, max_length=256)
    metadata: Metadata | None = None


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
            "created_at": epoch(ev.created_at), "metadata": ev.metadata_,
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
        "model": run.model, "status": run.status, "created_at": epoch(run.created_at),
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
            "eval_id": item.eval_id, "created_at": epoch(item.created_at),
            "status": item.status, "datasource_item_id": item.datasource_item_id,
            "datasource_item": item.datasource_item, "results": item.results,
            "sample": item.sample}


def evals_router(evals: Evals, catalog: Catalog, runs: RunStarter, principal: Authenticated
                 ) -> APIRouter:
    """`runs` starts the runs clients ask for, as it starts every run."""
    router = APIRouter(prefix="/v1/evals", tags=["evals"],
                       dependencies=[Depends(principal)])

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
            raise bad_request(exc) from None
        for i, grader in enumerate(graders):
            if isinstance(grader, ScoreModelGrader | LabelModelGrader) \
                    and not chat_model(catalog, who, grader.model):
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
                                                limit=bounded(limit), after=after, order=order,
                                                order_by=order_by)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return page([eval_out(r) for r in rows], more)

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

    @router.post("/{eval_id}/runs")
    async def create_run(request: Request, eval_id: str, body: RunIn) -> dict[str, Any]:
        ev = await owned(request, eval_id)
        run = await runs.start(request.state.principal, ev, body)
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
            rows, more = await evals.list_runs(ev.tenant_id, eval_id, limit=bounded(limit),
                                               after=after, order=order, status=status)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        base = str(request.base_url)
        return page([run_out(r, ev, base) for r in rows], more)

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
                                                limit=bounded(limit), after=after, order=order,
                                                status=status)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return page([item_out(r) for r in rows], more)

    @router.get("/{eval_id}/runs/{run_id}/output_items/{item_id}")
    async def retrieve_item(request: Request, eval_id: str, run_id: str, item_id: str
                            ) -> dict[str, Any]:
        ev, _ = await owned_run(request, eval_id, run_id)
        try:
            return item_out(await evals.get_item(ev.tenant_id, eval_id, run_id, item_id))
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="output_item_id") from None

    return router
