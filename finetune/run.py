"""One fine-tuning job, from claim to published adapter: validate the files, train (resuming
from the newest checkpoint), publish the adapter, and record every step as job events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from evals.store import Evals
from finetune.billing import AttemptBill, training_price
from finetune.config import TrainConfig
from finetune.dataset import (
    Example,
    InvalidDatasetError,
    PreferenceExample,
    validate_chat_jsonl,
    validate_preference_jsonl,
)
from finetune.distributed import train_distributed
from finetune.jobs import FineTuning, adapter_name
from finetune.preference import DEFAULT_BETA, Preference
from finetune.promotion import evaluate
from finetune.serving import NotServedError, announce, wait_until_served
from finetune.tracking import Tracker, run_params, start_tracking
from finetune.trainer import Cancelled, Objective, Supervised, train
from llmops.files import Files
from llmops.settings import ModelConfig, Settings
from llmops.store import Database, FineTuningJob, utcnow
from observability.worker_metrics import METRICS
from tenancy.limits import Limiter
from tenancy.tenants import NotFoundError

__all__ = ["run_job"]

log = logging.getLogger(__name__)
BASE_LEARNING_RATE = 2e-4


class _JobHooks:
    """Trainer hooks called from the training thread; they write through the job's event loop
    and renew the lease at most every `heartbeat_s`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, jobs: FineTuning, job: FineTuningJob,
                 owner: str, settings: Settings, tracker: Tracker | None,
                 bill: AttemptBill) -> None:
        self.loop, self.jobs, self.job_id, self.owner = loop, jobs, job.id, owner
        self.tracker, self.bill = tracker, bill
        self.trained_tokens = 0  # by this attempt
        self.base_model = job.model
        self.lease_s = settings.finetune.lease_s
        self.heartbeat_s = settings.finetune.heartbeat_s
        self.last_beat = time.monotonic()
        self.stop = False

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=60)

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        if level == "metrics" and data is not None:
            METRICS.training_step(self.base_model, int(data["step"]), int(data["total_steps"]),
                                  float(data["train_loss"]), int(data.get("tokens", 0)),
                                  float(data["tokens_per_s"]))
            self.trained_tokens += int(data.get("tokens", 0))
            if self.tracker is not None:  # DPO's reward metrics too
                self.tracker.metrics(int(data["step"]),
                                     _numbers(data, "step", "total_steps", "tokens"))
        if level == "checkpoint" and data is not None:
            metrics = {k: v for k, v in data.items() if k != "step" and v is not None}
            self._run(self.jobs.checkpoint(self.job_id, int(data["step"]), metrics))
            self._run(self.bill.update(self.trained_tokens))  # a killed attempt pays this far
            if self.tracker is not None and data.get("valid_loss") is not None:
                self.tracker.metrics(int(data["step"]), _numbers(data, "step", "train_loss"))
        kind = "metrics" if level == "metrics" else "message"
        self._run(self.jobs.event(self.job_id, message, type_=kind, data=data))

    def should_stop(self) -> bool:
        if time.monotonic() - self.last_beat >= self.heartbeat_s:
            self.last_beat = time.monotonic()
            self.stop = not self._run(self.jobs.heartbeat(self.job_id, self.owner,
                                                          self.lease_s))
        return self.stop


def _numbers(data: dict[str, Any], *leave: str) -> dict[str, float]:
    return {k: float(v) for k, v in data.items()
            if k not in leave and isinstance(v, int | float) and not isinstance(v, bool)}


async def run_job(job_id: str, settings: Settings) -> str:
    """Run or resume a job if no other worker holds it; returns what became of it."""
    db = Database(settings.database_url)
    redis = Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s)
    limiter = Limiter(redis, db, settings.redis_prefix, settings.limits)
    jobs = FineTuning(db)
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        job = await jobs.claim(job_id, owner, settings.finetune.lease_s)
        if job is None:
            return "not claimed"
        try:
            return await _run(job, jobs, Files(db, settings.files.root, settings.files.max_bytes),
                              settings, owner, limiter)
        except Exception as exc:  # the job fails; the worker lives on
            log.exception("fine-tuning job %s failed", job_id)
            await jobs.update(job_id, owner, status="failed",
                              error={"code": "training_failed", "message": str(exc)[:500],
                                     "param": None})
            await jobs.event(job_id, f"The job failed: {exc}"[:1000], level="error")
            return "failed"
    finally:
        await redis.aclose()
        await db.close()


async def _load(files: Files, job: FineTuningJob, file_id: str, base: ModelConfig,
                tokenizer: Any, min_examples: int) -> list[Example] | list[PreferenceExample]:
    row = await files.get(job.tenant_id, file_id)
    data = await asyncio.to_thread(files.path(row).read_bytes)
    validate = validate_preference_jsonl if job.method == "dpo" else validate_chat_jsonl
    return validate(data, tokenizer=tokenizer, max_tokens=base.context_length,
                    min_examples=min_examples)


async def _run(job: FineTuningJob, jobs: FineTuning, files: Files, settings: Settings,
               owner: str, limiter: Limiter) -> str:
    from transformers import AutoTokenizer

    base = next(m for m in settings.models if m.name == job.model)
    assert base.weights is not None  # checked when the job was created
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, base.weights)
    first_run = job.status == "validating_files"
    if first_run:
        await jobs.event(job.id, f"Validating training file: {job.training_file}")
    sets: dict[str, list[Any]] = {}
    for param, file_id, least in (("training_file", job.training_file,
                                   settings.finetune.min_examples),
                                  ("validation_file", job.validation_file, 1)):
        if file_id is None:
            sets[param] = []
            continue
        try:
            sets[param] = await _load(files, job, file_id, base, tokenizer, least)
        except (InvalidDatasetError, NotFoundError) as exc:
            await jobs.update(job.id, owner, status="failed",
                              error={"code": "invalid_file", "message": str(exc),
                                     "param": param})
            await jobs.event(job.id, f"Validation of {file_id} failed: {exc}"[:1000],
                             level="error")
            return "failed"
    train_set, val_set = sets["training_file"], sets["validation_file"]
    if first_run:
        await jobs.update(job.id, owner, status="queued")
        await jobs.event(job.id, "Files validated, moving job to queued state")
    await jobs.update(job.id, owner, status="running", started_at=job.started_at or utcnow())
    await jobs.event(job.id, "Fine-tuning job started" if first_run else
                     f"Fine-tuning job resumed (attempt {job.attempts})")

    config = _train_config(job, base, settings)
    tracker = await _tracking(job, jobs, owner, files, settings, config)
    status: str | None = "FAILED"  # the run's end, unless training gets further
    try:
        bill = AttemptBill(jobs.db, job, await training_price(jobs.db, job.model),
                           settings.finetune.device_cost_per_hour_usd, limiter.charge,
                           devices=_devices(job, settings))
        outcome = await _train(job, jobs, files, settings, owner, config, train_set, val_set,
                               tracker, bill)
        # A lost lease leaves the run open: the worker that took the job over continues it.
        status = {"succeeded": "FINISHED", "cancelled": "KILLED"}.get(outcome)
        return outcome
    finally:
        if tracker is not None:
            await tracker.close(status)


def _train_config(job: FineTuningJob, base: ModelConfig, settings: Settings) -> TrainConfig:
    hp, lora = job.hyperparameters, job.lora
    assert base.weights is not None
    root = Path(settings.finetune.adapters_root) / job.id
    return TrainConfig(
        base_model=Path(base.weights), output_dir=root / "work",
        n_epochs=int(hp.get("n_epochs") or 3), batch_size=int(hp.get("batch_size") or 4),
        learning_rate=BASE_LEARNING_RATE * float(hp.get("learning_rate_multiplier") or 1.0),
        lora_r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)),
        lora_dropout=float(lora.get("dropout", 0.05)),
        target_modules=tuple(lora.get("target_modules") or TrainConfig.target_modules),
        quantization=lora.get("quantization") or "none",
        gradient_checkpointing=bool(lora.get("gradient_checkpointing", False)),
        checkpoint_every=int(lora.get("checkpoint_every", 10)),
        max_length=base.context_length, seed=job.seed)


def _devices(job: FineTuningJob, settings: Settings) -> int:
    return int(job.lora.get("devices") or settings.finetune.devices)


async def _tracking(job: FineTuningJob, jobs: FineTuning, owner: str, files: Files,
                    settings: Settings, config: TrainConfig) -> Tracker | None:
    """The job's MLflow run, when it asked for one: created with its parameters on the first
    attempt, reopened on a resume; None (after a warning event) when it cannot be used."""
    spec = next((i["mlflow"] for i in job.integrations or [] if i.get("type") == "mlflow"),
                None)
    if spec is None:
        return None
    cfg = settings.finetune

    async def warn(message: str) -> None:
        await jobs.event(job.id, message, level="warn")

    if cfg.mlflow_tracking_uri is None:  # configured when the job was created, not now
        await warn("Experiment tracking is unavailable: no MLflow tracking server is "
                   "configured. The job goes on without it.")
        return None
    tracker = await start_tracking(
        cfg.mlflow_tracking_uri, spec, job.tracking, job.id,
        {"llmops.job_id": job.id, "llmops.base_model": job.model,
         "llmops.tenant_id": job.tenant_id},
        timeout_s=cfg.mlflow_timeout_s, artifact_timeout_s=cfg.mlflow_artifact_timeout_s,
        queue_size=cfg.mlflow_queue_size, warn=warn)
    if tracker is None:
        return None
    ref = tracker.ref
    link = {"run_id": ref.run_id, "experiment_id": ref.experiment_id, "url": ref.url}
    if job.tracking is None:
        await jobs.update(job.id, owner, tracking=asdict(ref))
        await jobs.event(job.id, f"Tracking in MLflow run {ref.run_id}: {ref.url}", data=link)
    else:
        await jobs.event(job.id, f"Resumed MLflow run {ref.run_id}: {ref.url}", data=link)
    # Every attempt logs them (the same values again: MLflow accepts that), in case the
    # first one died before it could.
    sha = {f"{param}_sha256": (await files.get(job.tenant_id, file_id)).sha256
           for param, file_id in (("training_file", job.training_file),
                                  ("validation_file", job.validation_file)) if file_id}
    await tracker.log(params=run_params(config, {
        "base_model": job.model, "method": job.method, "job_id": job.id,
        "training_file": job.training_file, "validation_file": job.validation_file,
        "learning_rate_multiplier": job.hyperparameters.get("learning_rate_multiplier"),
        **sha}))
    return tracker


async def _train(job: FineTuningJob, jobs: FineTuning, files: Files, settings: Settings,
                 owner: str, config: TrainConfig,
                 train_set: list[Example] | list[PreferenceExample],
                 val_set: list[Example] | list[PreferenceExample], tracker: Tracker | None,
                 bill: AttemptBill) -> str:
    """Train, publish the adapter, evaluate it if asked; returns what became of the job."""
    hp, lora = job.hyperparameters, job.lora
    root = Path(settings.finetune.adapters_root) / job.id
    hooks = _JobHooks(asyncio.get_running_loop(), jobs, job, owner, settings, tracker, bill)
    objective: Objective
    examples: list[Any]
    val_examples: list[Any]
    if job.method == "dpo":
        objective = Preference(float(hp.get("beta") or DEFAULT_BETA))
        examples, val_examples = list(train_set), list(val_set)
        # Promotion's default eval asks the validation questions and compares each answer
        # with the preferred output.
        chats = [e.as_chat() for e in val_set if isinstance(e, PreferenceExample)]
    else:
        objective = Supervised()
        examples = [list(e.messages) for e in train_set]
        val_examples = [list(e.messages) for e in val_set]
        chats = [e for e in val_set if isinstance(e, Example)]
    devices = _devices(job, settings)
    fit = partial(train, objective=objective) if devices == 1 else partial(
        train_distributed, devices=devices, restarts=settings.finetune.restarts,
        timeout_s=settings.finetune.group_timeout_s, objective=objective)
    try:
        with METRICS.training(job.model):
            result = await asyncio.to_thread(fit, config, examples, val_examples, hooks)
    except Cancelled:
        await bill.update(hooks.trained_tokens, ended=True)
        if (await jobs.get(job.id)).cancel_requested:
            await jobs.update(job.id, owner, status="cancelled")
            await jobs.event(job.id, "The job was cancelled.")
            return "cancelled"
        return "lease lost"  # another worker holds the job now

    except BaseException:
        await asyncio.shield(bill.update(hooks.trained_tokens, ended=True))
        raise
    await bill.update(hooks.trained_tokens, ended=True)

    published = root / "adapter"
    staging = root / "adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(result.adapter_dir, staging)
    shutil.rmtree(published, ignore_errors=True)
    os.replace(staging, published)
    if tracker is not None:
        final = {"final_train_loss": result.train_loss, "trained_tokens": result.trained_tokens}
        if result.val_loss is not None:
            final["final_valid_loss"] = result.val_loss
        await tracker.log(metrics=final, step=result.steps)
        await tracker.upload(published, "adapter")
    name = adapter_name(job)
    training_file = await files.get(job.tenant_id, job.training_file)
    lineage = {"base_model": job.model, "method": job.method,
               "training_file_sha256": training_file.sha256, "hyperparameters": hp,
               "lora": lora, "adapter_path": str(published),
               "train_loss": result.train_loss, "valid_loss": result.val_loss,
               "steps": result.steps, "tokens_per_s": result.tokens_per_s, "published": True}
    # Published: the gateways may load it now (a candidate, withheld, while it is evaluated).
    await jobs.update(job.id, owner, fine_tuned_model=name, result={
        **lineage, **({"evaluation": {"state": "evaluating"}} if job.evaluation else {})})
    await announce(settings, name)
    promoted = True
    if job.evaluation is not None:
        async with _leased(jobs, job.id, owner, settings):
            verdict = await evaluate(job, name, chats, jobs, Evals(jobs.db), files, settings)
        lineage["evaluation"] = verdict
        promoted = bool(verdict["promoted"])
        await jobs.event(job.id, f"Evaluation: {verdict['reason']} The adapter is "
                         + ("served." if promoted else "held back."),
                         level="info" if promoted else "warn", data=verdict)
        await jobs.update(job.id, owner, result=lineage)
        if promoted:
            await announce(settings, name)  # the gateways serve it to its owner now
    if promoted:
        # `succeeded` means servable: the gateway answers with the adapter before the job
        # says so. Engines that cannot take it in time do not hold the job (nor lose it).
        async with _leased(jobs, job.id, owner, settings):
            try:
                await wait_until_served(name, job, settings, settings.finetune.ready_timeout_s)
            except NotServedError as exc:
                await jobs.event(job.id, f"{exc} It is served once a replica of {job.model} "
                                 "can load it.", level="warn")
    await jobs.update(job.id, owner, status="succeeded", fine_tuned_model=name,
                      trained_tokens=result.trained_tokens, result=lineage)
    if not promoted:
        await announce(settings, name)  # held back: the gateways unload it
    await jobs.event(job.id, f"New fine-tuned model created: {name}")
    await jobs.event(job.id, "The job has successfully completed")
    return "succeeded"


@contextlib.asynccontextmanager
async def _leased(jobs: FineTuning, job_id: str, owner: str, settings: Settings
                  ) -> AsyncIterator[None]:
    """Keep the job's lease while something other than training takes time."""
    async def beat() -> None:
        while await jobs.heartbeat(job_id, owner, settings.finetune.lease_s):
            await asyncio.sleep(settings.finetune.heartbeat_s)

    task = asyncio.get_running_loop().create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
