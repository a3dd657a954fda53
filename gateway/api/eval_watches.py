"""Regression watches (our addition to OpenAI's Evals API): an eval run against a model on a
schedule, its pass rates exported as metrics and alerted on below a threshold or below the
accepted run.

`POST /v1/evals/{eval_id}/watches` creates one and starts its first run at once, as the
caller, the way every run starts (`evals.runs`): the data source is checked exactly as a run's,
and an error is the run's (a watch's `model` is its own field). Then
`GET .../watches[/{watch_id}]`, `GET .../watches/{watch_id}/runs` (its trend: the newest `limit`
runs, oldest first, each with its pass rates), `POST .../watches/{watch_id}` (interval_s,
min_pass_rate, tolerance, enabled, accepted_run_id) and `DELETE .../watches/{watch_id}`.
Another tenant's eval or watch is reported as missing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import Field

import tenancy
from evals.runs import RunStarter
from evals.scheduler import start_watch_run
from evals.store import Evals, pass_ratios
from evals.watches import EvalWatches, InvalidRunError, WatchLimitError, WatchView, pass_rate
from gateway.http.auth import Authenticated
from gateway.http.paging import bounded, page
from gateway.http.timestamps import epoch
from llmops.errors import BadRequestError, ConflictError, NotFoundError, RateLimitError
from llmops.settings import Settings
from llmops.store import Eval, EvalRun, EvalWatch
from llmops.wire import Wire
from tenancy.tenants import Principal

__all__ = ["eval_watches_router", "watch_out"]

_MAX_INTERVAL_S = 366 * 24 * 3600
Interval = Annotated[int, Field(ge=1, le=_MAX_INTERVAL_S)]
Ratio = Annotated[float, Field(ge=0, le=1)]


class WatchDataSourceIn(Wire):
    """A `completions` run's data source without its model (the watch's `model`)."""

    type: Literal["completions"]
    source: dict[str, Any]
    input_messages: dict[str, Any]
    sampling_params: dict[str, Any] | None = None


class WatchIn(Wire):
    name: str = Field(pattern=r"^[a-z0-9_-]{1,48}$")
    model: str = Field(min_length=1, max_length=256)
    data_source: WatchDataSourceIn
    interval_s: Interval
    min_pass_rate: Ratio | None = None
    tolerance: Ratio = 0.0


class WatchPatch(Wire):
    interval_s: Interval | None = None
    min_pass_rate: Ratio | None = None
    tolerance: Ratio | None = None
    enabled: bool | None = None
    accepted_run_id: str | None = Field(None, max_length=40)


def _run(run: EvalRun | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"id": run.id, "status": run.status, "created_at": epoch(run.created_at),
            "finished_at": epoch(run.finished_at), "pass_rate": pass_rate(run),
            "per_testing_criteria": pass_ratios(run)}


def watch_out(view: WatchView) -> dict[str, Any]:
    """OpenAI-style object of a watch: `pass_rate` is the latest completed run's,
    `accepted_pass_rate` the accepted run's."""
    w = view.watch
    latest = _run(view.latest)
    accepted = _run(view.accepted)
    return {
        "object": "eval.watch", "id": w.id, "eval_id": w.eval_id, "name": w.name,
        "model": w.model, "data_source": w.data_source, "interval_s": w.interval_s,
        "min_pass_rate": w.min_pass_rate, "tolerance": w.tolerance, "enabled": w.enabled,
        "created_at": epoch(w.created_at),
        "next_run_at": epoch(w.next_run_at) if w.enabled else None,
        "pass_rate": latest["pass_rate"] if latest else None,
        "accepted_pass_rate": accepted["pass_rate"] if accepted else None,
        "below_threshold": view.below_threshold, "regressed": view.regressed,
        "last_run": _run(view.last_run), "latest_completed_run": latest,
        "accepted_run": accepted,
        "skipped_runs": w.skipped_runs,
        "last_skip": ({"at": epoch(w.last_skip_at), "reason": w.last_skip_reason}
                      if w.last_skip_at is not None else None),
        "last_error": w.last_error,
    }


def eval_watches_router(settings: Settings, evals: Evals, watches: EvalWatches,
                        starter: RunStarter, principal: Authenticated) -> APIRouter:
    router = APIRouter(prefix="/v1/evals", tags=["evals"],
                       dependencies=[Depends(principal)])
    config = settings.eval_watches

    async def owned(request: Request, eval_id: str) -> Eval:
        try:
            return await evals.get(request.state.principal.tenant_id, eval_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="eval_id") from None

    async def owned_watch(request: Request, eval_id: str, watch_id: str) -> EvalWatch:
        ev = await owned(request, eval_id)
        try:
            return await watches.get(ev.tenant_id, eval_id, watch_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="watch_id") from None

    async def out(watch: EvalWatch) -> dict[str, Any]:
        return watch_out((await watches.views([watch]))[0])

    def check_interval(interval_s: int) -> None:
        if interval_s < config.min_interval_s:
            raise BadRequestError(f"interval_s must be at least {config.min_interval_s} "
                                  "seconds.", param="interval_s")

    @router.post("/{eval_id}/watches")
    async def create(request: Request, eval_id: str, body: WatchIn) -> dict[str, Any]:
        who: Principal = request.state.principal
        ev = await owned(request, eval_id)
        check_interval(body.interval_s)
        data_source = body.data_source.model_dump(exclude_none=True)
        if len(orjson.dumps(data_source)) > config.max_data_source_bytes:
            raise BadRequestError(
                f"A watch's data source may take {config.max_data_source_bytes} bytes; put "
                "larger data in a file (source type 'file_id').", param="data_source.source")
        try:
            watch = await watches.create(
                ev, key_id=who.key_id, name=body.name, model=body.model,
                data_source=data_source, interval_s=body.interval_s,
                min_pass_rate=body.min_pass_rate, tolerance=body.tolerance, enabled=True,
                max_per_tenant=config.max_per_tenant, max_total=config.max_total)
        except tenancy.ConflictError as exc:
            raise ConflictError(str(exc), param="name") from None
        except WatchLimitError as exc:
            raise RateLimitError(str(exc), code="too_many_eval_watches") from None
        # The first run, made as the caller: its refusal is the watch's.
        try:
            run = await start_watch_run(starter, who, ev, watch)
        except Exception:
            await watches.delete(ev.tenant_id, ev.id, watch.id)
            raise
        await watches.started(watch.id, run.id)
        return await out(await watches.get(ev.tenant_id, ev.id, watch.id))

    @router.get("/{eval_id}/watches")
    async def list_watches(request: Request, eval_id: str) -> dict[str, Any]:
        ev = await owned(request, eval_id)
        views = await watches.views(await watches.list_watches(ev.tenant_id, ev.id))
        return page([watch_out(v) for v in views], False)

    @router.get("/{eval_id}/watches/{watch_id}")
    async def retrieve(request: Request, eval_id: str, watch_id: str) -> dict[str, Any]:
        return await out(await owned_watch(request, eval_id, watch_id))

    @router.get("/{eval_id}/watches/{watch_id}/runs")
    async def list_runs(request: Request, eval_id: str, watch_id: str, limit: int = 20
                        ) -> dict[str, Any]:
        watch = await owned_watch(request, eval_id, watch_id)
        runs, more = await watches.runs(watch, bounded(limit))
        return page([r for r in map(_run, runs) if r is not None], more)

    @router.post("/{eval_id}/watches/{watch_id}")
    async def update(request: Request, eval_id: str, watch_id: str, body: WatchPatch
                     ) -> dict[str, Any]:
        watch = await owned_watch(request, eval_id, watch_id)
        changes = {name: getattr(body, name) for name in body.model_fields_set}
        for name in ("interval_s", "tolerance", "enabled"):
            if name in changes and changes[name] is None:
                raise BadRequestError(f"{name} may not be null.", param=name)
        if "interval_s" in changes:
            check_interval(changes["interval_s"])
        try:
            watch = await watches.update(watch.tenant_id, eval_id, watch_id, changes)
        except InvalidRunError as exc:
            raise BadRequestError(str(exc), param="accepted_run_id") from None
        except tenancy.NotFoundError as exc:  # deleted meanwhile
            raise NotFoundError(str(exc), param="watch_id") from None
        return await out(watch)

    @router.delete("/{eval_id}/watches/{watch_id}")
    async def delete(request: Request, eval_id: str, watch_id: str) -> dict[str, Any]:
        watch = await owned_watch(request, eval_id, watch_id)
        await watches.delete(watch.tenant_id, eval_id, watch_id)
        return {"object": "eval.watch.deleted", "deleted": True, "watch_id": watch_id}

    return router
