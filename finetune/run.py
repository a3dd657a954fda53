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
from pathlib import Path
from typing import Any

from evals.store import Evals
from finetune.config import TrainConfig
from finetune.dataset import (
    Example,
    InvalidDatasetError,
    PreferenceExample,
    validate_chat_jsonl,
    validate_preference_jsonl,
)
from finetune.jobs import FineTuning, adapter_name
from finetune.preference import DEFAULT_BETA, Preference
from finetune.promotion import evaluate
from finetune.trainer import Cancelled, Objective, Supervised, train
from llmops.files import Files
from llmops.settings import ModelConfig, Settings
from llmops.store import Database, FineTuningJob, utcnow
from observability.worker_metrics import METRICS
from tenancy.tenants import NotFoundError

__all__ = ["run_job"]

log = logging.getLogger(__name__)
BASE_LEARNING_RATE = 2e-4


class _JobHooks:
    """Trainer hooks called from the training thread; they write through the job's event loop
    and renew the lease at most every `heartbeat_s`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, jobs: FineTuning, job: FineTuningJob,
                 owner: str, settings: Settings) -> None:
        self.loop, self.jobs, self.job_id, self.owner = loop, jobs, job.id, owner
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
        if level == "checkpoint" and data is not None:
            metrics = {k: v for k, v in data.items() if k != "step" and v is not None}
            self._run(self.jobs.checkpoint(self.job_id, int(data["step"]), metrics))
        kind = "metrics" if level == "metrics" else "message"
        self._run(self.jobs.event(self.job_id, message, type_=kind, data=data))

    def should_stop(self) -> bool:
        if time.monotonic() - self.last_beat >= self.heartbeat_s:
            self.last_beat = time.monotonic()
            self.stop = not self._run(self.jobs.heartbeat(self.job_id, self.owner,
                                                          self.lease_s))
        return self.stop


async def run_job(job_id: str, settings: Settings) -> str:
    """Run or resume a job if no other worker holds it; returns what became of it."""
    db = Database(settings.database_url)
    jobs = FineTuning(db)
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        job = await jobs.claim(job_id, owner, settings.finetune.lease_s)
        if job is None:
            return "not claimed"
        try:
            return await _run(job, jobs, Files(db, settings.files.root, settings.files.max_bytes),
                              settings, owner)
        except Exception as exc:  # the job fails; the worker lives on
            log.exception("fine-tuning job %s failed", job_id)
            await jobs.update(job_id, owner, status="failed",
                              error={"code": "training_failed", "message": str(exc)[:500],
                                     "param": None})
            await jobs.event(job_id, f"The job failed: {exc}"[:1000], level="error")
            return "failed"
    finally:
        await db.close()


async def _load(files: Files, job: FineTuningJob, file_id: str, base: ModelConfig,
                tokenizer: Any, min_examples: int) -> list[Example] | list[PreferenceExample]:
    row = await files.get(job.tenant_id, file_id)
    data = await asyncio.to_thread(files.path(row).read_bytes)
    validate = validate_preference_jsonl if job.method == "dpo" else validate_chat_jsonl
    return validate(data, tokenizer=tokenizer, max_tokens=base.context_length,
                    min_examples=min_examples)


async def _run(job: FineTuningJob, jobs: FineTuning, files: Files, settings: Settings,
               owner: str) -> str:
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

    hp, lora = job.hyperparameters, job.lora
    root = Path(settings.finetune.adapters_root) / job.id
    config = TrainConfig(
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
    hooks = _JobHooks(asyncio.get_running_loop(), jobs, job, owner, settings)
    objective: Objective = Supervised()
    if job.method == "dpo":
        objective = Preference(float(hp.get("beta") or DEFAULT_BETA))
        # Promotion's default eval asks the validation questions and compares each answer
        # with the preferred output.
        examples, val_examples = train_set, val_set
        val_set = [e.as_chat() for e in val_examples]
    else:
        examples = [list(e.messages) for e in train_set]
        val_examples = [list(e.messages) for e in val_set]
    try:
        with METRICS.training(job.model):
            result = await asyncio.to_thread(train, config, examples, val_examples, hooks,
                                             objective)
    except Cancelled:
        if (await jobs.get(job.id)).cancel_requested:
            await jobs.update(job.id, owner, status="cancelled")
            await jobs.event(job.id, "The job was cancelled.")
            return "cancelled"
        return "lease lost"  # another worker holds the job now

    published = root / "adapter"
    staging = root / "adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(result.adapter_dir, staging)
    shutil.rmtree(published, ignore_errors=True)
    os.replace(staging, published)
    name = adapter_name(job)
    training_file = await files.get(job.tenant_id, job.training_file)
    lineage = {"base_model": job.model, "method": job.method,
               "training_file_sha256": training_file.sha256, "hyperparameters": hp,
               "lora": lora, "adapter_path": str(published),
               "train_loss": result.train_loss, "valid_loss": result.val_loss,
               "steps": result.steps, "tokens_per_s": result.tokens_per_s}
    if job.evaluation is not None:
        # A candidate until judged: the gateway loads it but serves it to the evaluation only.
        await jobs.update(job.id, owner, fine_tuned_model=name,
                          result={**lineage, "evaluation": {"state": "evaluating"}})
        async with _leased(jobs, job.id, owner, settings):
            verdict = await evaluate(job, name, val_set, jobs, Evals(jobs.db), files, settings)
        lineage["evaluation"] = verdict
        await jobs.event(job.id, f"Evaluation: {verdict['reason']} The adapter is "
                         + ("served." if verdict["promoted"] else "held back."),
                         level="info" if verdict["promoted"] else "warn", data=verdict)
    await jobs.update(job.id, owner, status="succeeded", fine_tuned_model=name,
                      trained_tokens=result.trained_tokens, result=lineage)
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
