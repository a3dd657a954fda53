"""OpenAI's fine-tuning API: `POST/GET /v1/fine_tuning/jobs`, `GET .../{id}`,
`POST .../{id}/cancel`, `GET .../{id}/events`, `GET .../{id}/checkpoints`.

`method` is OpenAI's: `supervised` (the default) on chat files, or `dpo` on preference files.
Our additions are named as such: `lora` (r, alpha, dropout, target_modules, `quantization:
"nf4"` for QLoRA, gradient_checkpointing, checkpoint_every, devices) next to OpenAI's fields.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, Depends, Request
from pydantic import Field

import tenancy
from evals.store import Evals
from finetune.billing import estimate_cost
from finetune.dataset import InvalidDatasetError, validate_chat_jsonl, validate_preference_jsonl
from finetune.jobs import FineTuning, adapter_name
from gateway.http.auth import Authenticated
from gateway.http.paging import page
from gateway.http.timestamps import epoch
from gateway.tasks import enqueue
from llmops.errors import (
    BadRequestError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from llmops.files import Files
from llmops.settings import ModelConfig, Settings
from llmops.store import FineTuningEvent, FineTuningJob
from llmops.wire import Open, Wire
from tenancy.accounting import PriceBook
from tenancy.limits import Limiter
from tenancy.tenants import Principal
from workers.app import FINETUNE_TASK

__all__ = ["event_out", "fine_tuning_router", "job_out"]

Auto = Literal["auto"]


class Hyperparameters(Wire):
    n_epochs: int | Auto = Field("auto", description="1-50")
    batch_size: int | Auto = Field("auto", description="1-256")
    learning_rate_multiplier: float | Auto = Field("auto", description="0 < x <= 10")


class DpoHyperparameters(Hyperparameters):
    beta: float | Auto = Field("auto", description="0 < x <= 2")


class SupervisedMethod(Wire):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(Wire):
    hyperparameters: DpoHyperparameters | None = None


class Method(Open):
    type: str = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


METHODS = ("supervised", "dpo")
# Inclusive bounds, but beta's low end is exclusive: 0 would ignore the preferences.
RANGES = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (1e-6, 10),
          "beta": (0, 2)}
DEFAULT_HYPERPARAMETERS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
DEFAULT_BETA = 0.1


class LoraOptions(Wire):
    r: int = Field(16, ge=1, le=256)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    quantization: Literal["none", "nf4"] = "none"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(10, ge=1)
    devices: int | None = Field(None, ge=1, le=64, description="Processes (GPUs) to train on, "
                                "data parallel; unset: the worker's `finetune.devices`.")


class EvaluationIn(Wire):
    """Ours: evaluate base and adapter after training (see finetune.promotion)."""

    eval_id: str | None = Field(None, description="The eval; default: one made from the "
                                "validation file's answers.")
    data_source: dict[str, Any] | None = Field(
        None, description="A `completions` run data source (no model); default: the "
        "validation file's questions.")
    promote: Literal["always", "if_better"] = Field(
        "always", description="`if_better`: serve the adapter only if it beats the base.")


class MlflowOptions(Wire):
    experiment: str = Field(min_length=1, max_length=500,
                            description="The MLflow experiment; created when missing.")
    run_name: str | None = Field(None, min_length=1, max_length=250,
                                 description="Default: the job's id.")
    tags: dict[Annotated[str, Field(min_length=1, max_length=250)],
               Annotated[str, Field(max_length=5000)]] | None = Field(None, max_length=50)


class Integration(Wire):
    """OpenAI's `integrations` entry; the kind this gateway has is an MLflow tracking server
    (the gateway's own: a job cannot name a server for workers to call)."""

    type: Literal["mlflow"]
    mlflow: MlflowOptions


class JobIn(Wire):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None
    lora: LoraOptions = Field(default_factory=LoraOptions)
    evaluation: EvaluationIn | None = None
    integrations: list[Integration] | None = Field(None, max_length=1)


def _method(body: JobIn) -> tuple[str, dict[str, Any]]:
    """The job's method and its hyperparameters, "auto" left out (defaults apply)."""
    method = body.method or Method()
    if method.type not in METHODS:
        raise BadRequestError(f"method.type {method.type!r} is not supported here; use "
                              "'supervised' or 'dpo'.", param="method.type")
    for other in METHODS:
        if other != method.type and getattr(method, other) is not None:
            raise BadRequestError(f"method.{other} is given but method.type is "
                                  f"{method.type!r}.", param=f"method.{other}")
    where, hp = "hyperparameters", body.hyperparameters  # OpenAI's older, top-level place
    chosen: SupervisedMethod | DpoMethod | None = getattr(method, method.type)
    if chosen is not None and chosen.hyperparameters is not None:
        where, hp = f"method.{method.type}.hyperparameters", chosen.hyperparameters
    values = {k: v for k, v in (hp.model_dump() if hp else {}).items() if v != "auto"}
    for name, value in values.items():
        low, high = RANGES[name]
        exclusive = name == "beta"
        if value > high or value < low or (exclusive and value == low):
            bounds = (f"greater than {low} and at most {high}" if exclusive
                      else f"between {low} and {high}")
            raise BadRequestError(f"{where}.{name} must be {bounds}.", param=f"{where}.{name}")
    return method.type, values


async def _evaluation(body: JobIn, tenant_id: str, evals: Evals) -> dict[str, Any] | None:
    spec = body.evaluation
    if spec is None:
        return None
    if spec.eval_id is not None:
        try:
            await evals.get(tenant_id, spec.eval_id)
        except tenancy.NotFoundError:
            raise BadRequestError(f"Eval {spec.eval_id} not found.",
                                  param="evaluation.eval_id") from None
    if spec.data_source is None:
        if body.validation_file is None:
            raise BadRequestError("An evaluation needs a data_source or a validation_file "
                                  "to take its questions from.", param="evaluation.data_source")
    elif spec.data_source.get("type") != "completions" or "model" in spec.data_source:
        raise BadRequestError("evaluation.data_source must be a `completions` run data source "
                              "without `model` (base and adapter are filled in).",
                              param="evaluation.data_source")
    return spec.model_dump(exclude_none=True)


def job_out(job: FineTuningJob) -> dict[str, Any]:
    hp = {k: job.hyperparameters.get(k, v) for k, v in DEFAULT_HYPERPARAMETERS.items()}
    method_hp = {**hp, "beta": job.hyperparameters.get("beta", DEFAULT_BETA)} \
        if job.method == "dpo" else hp
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": epoch(job.created_at),
        "finished_at": epoch(job.finished_at), "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant_id, "result_files": [], "status": job.status,
        "training_file": job.training_file, "validation_file": job.validation_file,
        "hyperparameters": hp, "trained_tokens": job.trained_tokens, "error": job.error,
        "seed": job.seed, "user_provided_suffix": job.suffix, "estimated_finish": None,
        "integrations": _integrations_out(job), "metadata": None,
        "method": {"type": job.method, job.method: {"hyperparameters": method_hp}},
        "lora": job.lora, "evaluation": job.evaluation, "result": job.result or None,
    }


def _integrations_out(job: FineTuningJob) -> list[dict[str, Any]]:
    """The integrations as given; the MLflow one with its run once the worker opened it."""
    out = []
    for item in job.integrations or []:
        if item.get("type") == "mlflow" and job.tracking:
            run = {k: job.tracking[k] for k in ("run_id", "experiment_id", "url")}
            item = {**item, "mlflow": {**item["mlflow"], "run": run}}
        out.append(item)
    return out


def event_out(event: FineTuningEvent) -> dict[str, Any]:
    out = {"id": f"ftevent-{event.id}", "object": "fine_tuning.job.event",
           "created_at": epoch(event.created_at), "level": event.level,
           "message": event.message, "type": event.type}
    if event.data is not None:  # OpenAI's `data` is an object when present, never null
        out["data"] = event.data
    return out


def fine_tuning_router(settings: Settings, jobs: FineTuning, files: Files, celery: Celery,
                       principal: Authenticated, evals: Evals, limiter: Limiter, prices: PriceBook
                       ) -> APIRouter:
    router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"],
                       dependencies=[Depends(principal)])
    bases = {m.name: m for m in settings.models if m.kind == "chat"}
    tokenizers: dict[str, Any] = {}  # base model -> its tokenizer, loaded at first need

    async def check_budget(who: Principal, base: ModelConfig, file_id: str, method: str,
                           hyperparameters: dict[str, Any]) -> None:
        """Refuse a job whose estimated cost does not fit the caller's remaining budget; the
        file is read (and tokenized) only for callers that have a budget."""
        if who.key_limits.budget_usd is None and who.tenant_limits.budget_usd is None:
            return
        assert base.weights is not None
        if base.name not in tokenizers:
            from transformers import AutoTokenizer  # heavy: only when budgets need it

            tokenizers[base.name] = await asyncio.to_thread(AutoTokenizer.from_pretrained,
                                                            base.weights)
        row = await files.get(who.tenant_id, file_id)
        data = await asyncio.to_thread(files.path(row).read_bytes)
        try:
            examples: list[Any] = await asyncio.to_thread(
                validate_preference_jsonl if method == "dpo" else validate_chat_jsonl, data,
                tokenizer=tokenizers[base.name],
                max_tokens=base.context_length, min_examples=1)
        except InvalidDatasetError:
            return  # the worker refuses it in validation, before any (billed) training
        cfg = settings.finetune
        tokens, cost = estimate_cost(examples, int(hyperparameters.get("n_epochs") or 3),
                                     prices.prices.get(base.name), cfg.device_cost_per_hour_usd,
                                     cfg.estimate_tokens_per_s)
        await limiter.check_budget(
            who, cost, f"This job's estimated cost, {cost:.4f} USD ({tokens} tokens to train "
            "on: the training file's tokens times its epochs),")

    async def owned(request: Request, job_id: str) -> FineTuningJob:
        try:
            return await jobs.get(job_id, request.state.principal.tenant_id)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="fine_tuning_job_id") from None

    @router.post("")
    async def create(request: Request, body: JobIn) -> dict[str, Any]:
        who = request.state.principal
        base = bases.get(body.model)
        if base is None or not who.may_use(body.model):
            raise ModelNotFoundError(body.model)
        if base.weights is None:
            raise BadRequestError(f"The model `{body.model}` cannot be fine-tuned here: no "
                                  "weights are configured for it.", param="model")
        method, hyperparameters = _method(body)
        if body.suffix is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", body.suffix):
            raise BadRequestError("suffix may hold letters, digits, '-' and '_' only.",
                                  param="suffix")
        for param, file_id in (("training_file", body.training_file),
                               ("validation_file", body.validation_file)):
            if file_id is None:
                continue
            try:
                row = await files.get(who.tenant_id, file_id)
            except tenancy.NotFoundError:
                raise BadRequestError(f"File {file_id} not found.", param=param) from None
            if row.purpose != "fine-tune":
                raise BadRequestError(f"File {file_id} has purpose '{row.purpose}', not "
                                      "'fine-tune'.", param=param)
        evaluation = await _evaluation(body, who.tenant_id, evals)
        await check_budget(who, base, body.training_file, method, hyperparameters)
        if body.integrations and settings.finetune.mlflow_tracking_uri is None:
            raise BadRequestError("The `mlflow` integration needs an MLflow tracking server, "
                                  "and none is configured on this gateway "
                                  "(finetune.mlflow_tracking_uri).", param="integrations")
        job = await jobs.create(
            tenant_id=who.tenant_id, key_id=who.key_id, model=body.model,
            training_file=body.training_file, validation_file=body.validation_file,
            suffix=body.suffix, seed=body.seed if body.seed is not None else 0,
            method=method, hyperparameters=hyperparameters, lora=body.lora.model_dump(),
            evaluation=evaluation, integrations=[
                i.model_dump(exclude_none=True) for i in body.integrations or []] or None)
        try:
            await enqueue(celery, FINETUNE_TASK, [job.id])
        except ServiceUnavailableError:
            await jobs.discard(job.id)
            raise
        await jobs.event(job.id, f"Created fine-tuning job: {job.id}")
        return job_out(job)

    @router.get("")
    async def list_jobs(request: Request, limit: int = 20, after: str | None = None
                        ) -> dict[str, Any]:
        try:
            rows, more = await jobs.list_jobs(request.state.principal.tenant_id,
                                              limit=max(1, min(limit, 100)), after=after)
        except tenancy.NotFoundError as exc:
            raise NotFoundError(str(exc), param="after") from None
        return {"object": "list", "data": [job_out(j) for j in rows], "has_more": more}

    @router.get("/{job_id}")
    async def retrieve(request: Request, job_id: str) -> dict[str, Any]:
        return job_out(await owned(request, job_id))

    @router.post("/{job_id}/cancel")
    async def cancel(request: Request, job_id: str) -> dict[str, Any]:
        job = await owned(request, job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            raise BadRequestError(f"Job {job_id} has already {job.status}.", param="job_id")
        return job_out(await jobs.cancel(job_id, job.tenant_id))

    @router.get("/{job_id}/events")
    async def events(request: Request, job_id: str, limit: int = 20,
                     after: str | None = None) -> dict[str, Any]:
        await owned(request, job_id)
        cursor = int(after.removeprefix("ftevent-")) if after and after[8:].isdigit() else None
        rows, more = await jobs.events(job_id, request.state.principal.tenant_id,
                                       limit=max(1, min(limit, 1000)), after=cursor)
        return {"object": "list", "has_more": more, "data": [event_out(e) for e in rows]}

    @router.get("/{job_id}/checkpoints")
    async def checkpoints(request: Request, job_id: str) -> dict[str, Any]:
        job = await owned(request, job_id)
        rows = await jobs.checkpoints(job_id, job.tenant_id)
        data = [{"id": c.id, "object": "fine_tuning.job.checkpoint",
                 "created_at": epoch(c.created_at), "fine_tuning_job_id": job_id,
                 "fine_tuned_model_checkpoint": f"{adapter_name(job)}:ckpt-step-{c.step}",
                 "step_number": c.step, "metrics": {"step": c.step, **c.metrics}}
                for c in rows]
        return page(data, False)

    return router
