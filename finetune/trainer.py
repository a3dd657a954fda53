"""LoRA and QLoRA fine-tuning with PEFT, in a loop of our own: supervised here, preference
(DPO) through the `Objective` in `finetune.preference`.

Why not `transformers.Trainer`: we batch examples of similar length together and pad each batch
only to its own longest, project to the vocabulary only the positions that carry a label (the
assistant's tokens), checkpoint everything a resume needs (adapter, optimizer, scheduler, RNG)
atomically, and stop cooperatively when asked, all with a small surface that a Celery task or a
notebook can drive through `Hooks`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finetune.config import TrainConfig

__all__ = ["Cancelled", "Hooks", "Objective", "Ranks", "Supervised", "TrainResult",
           "assistant_loss", "encode", "latest_checkpoint", "train"]

IGNORE = -100
Messages = Sequence[Mapping[str, Any]]
Row = tuple[list[int], list[int]]  # token ids and labels


class Cancelled(Exception):
    """Training stopped because `Hooks.should_stop` said so."""


class Hooks(Protocol):
    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None: ...

    def should_stop(self) -> bool: ...


class _Quiet:
    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class Ranks(Protocol):
    """The processes a job trains in, data parallel (finetune.distributed); one by default."""

    rank: int
    world: int

    def shard(self, batch: list[int]) -> list[int]:
        """This rank's part of a global batch (may be empty)."""
        ...

    def wrap(self, model: Any, loss: Callable[[], Any]) -> Callable[[], Any]:
        """`loss` computed so that its backward pass averages gradients across ranks."""
        ...

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over all ranks."""
        ...


class _Solo:
    rank, world = 0, 1

    def shard(self, batch: list[int]) -> list[int]:
        return batch

    def wrap(self, model: Any, loss: Callable[[], Any]) -> Callable[[], Any]:
        return loss

    def sum(self, values: list[float]) -> list[float]:
        return values


class Objective(Protocol):
    """What the loop minimises: how an example becomes a row, and a batch of rows' loss."""

    def encode(self, tokenizer: Any, example: Any, max_length: int) -> Any: ...

    def length(self, row: Any) -> int:
        """The row's length in tokens, to batch rows of similar length together."""

    def loss(self, model: Any, rows: Sequence[Any], pad_id: int, device: str
             ) -> tuple[Any, dict[str, float], int]:
        """The batch's loss (a tensor to backpropagate), metrics to report with it, and the
        real tokens it trained on."""

    def weight(self, rows: Sequence[Any]) -> int:
        """What the loss of `rows` is a mean over (labelled tokens, pairs): on several ranks
        each rank's loss counts by its share of it."""

    def evaluate(self, model: Any, rows: Sequence[Any], batch_size: int, pad_id: int,
                 device: str) -> dict[str, float]:
        """Held-out metrics, `valid_loss` among them, without updating anything."""


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    train_loss: float
    val_loss: float | None
    trained_tokens: int  # real tokens, padding excluded
    seconds: float  # in training steps; loading, evaluation and checkpoints excluded
    tokens_per_s: float
    valid_metrics: dict[str, float] = field(default_factory=dict)  # the objective's, at the end


def _ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a list of ids or a BatchEncoding, depending on the version.
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def encode(tokenizer: Any, messages: Messages, max_length: int,
           tools: Sequence[Mapping[str, Any]] = ()) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the assistant replies (with their end of
    turn, so the model learns to stop) and nothing else; everything else is IGNORE."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    template = {"tools": list(tools)} if tools else {}
    ids = _ids(tokenizer.apply_chat_template(msgs, tokenize=True, **template))
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        start = len(_ids(tokenizer.apply_chat_template(msgs[:i], tokenize=True,
                                                       add_generation_prompt=True, **template)))
        end = len(_ids(tokenizer.apply_chat_template(msgs[: i + 1], tokenize=True, **template)))
        labels[start:end] = ids[start:end]
    return ids[:max_length], labels[:max_length]


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = [p for p in output_dir.glob("checkpoint-*") if (p / "state.json").exists()
            and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _load_model(config: TrainConfig) -> tuple[Any, Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        # Compute in bf16 on GPUs; on CPUs without AMX bf16 matmuls are many times slower
        # than fp32, and the 4-bit weights are the memory saving either way.
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            config.base_model, quantization_config=quant,
            device_map={"": torch.cuda.current_device()} if device == "cuda" else "cpu")
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        # fp32 on the CPU (bf16 matmuls are slow without AMX), bf16 on GPUs.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=dtype)
        model = model.to(device)
        if config.gradient_checkpointing:
            # Non-reentrant (here and above): reentrant checkpointing breaks DDP's hooks.
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer, device


def _batch(rows: Sequence[Row], pad_id: int, device: str) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)  # pad to this batch's longest only
    ids = [r[0] + [pad_id] * (width - len(r[0])) for r in rows]
    labels = [r[1] + [IGNORE] * (width - len(r[1])) for r in rows]
    mask = [[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows]
    return {"input_ids": torch.tensor(ids, device=device),
            "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device)}


def _epoch_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """One epoch's batches: shuffled, then sorted by length within windows of 64 batches so
    that a batch holds examples of similar length (little padding), in shuffled order. Depends
    only on the seed, so a resumed run sees exactly the batches an uninterrupted one would."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(lengths))]
    window = 64 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: -lengths[i])
        batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[int(i)] for i in rng.permutation(len(batches))]


def _loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over labelled tokens, projecting only those positions to the
    vocabulary: the LM head and its softmax are a large share of a small model's compute, and
    most positions (prompt, padding) carry no label."""
    import torch

    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    if logits.shape[0] == 0:  # nothing to learn from in this batch
        return hidden.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def assistant_loss(model: Any, rows: Sequence[Row], batch_size: int, pad_id: int,
                   device: str) -> float:
    """Mean loss per assistant token over `rows`, without updating anything."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            n = sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in chunk)
            total += float(_loss(model, _batch(chunk, pad_id, device))) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


class Supervised:
    """Supervised fine-tuning: cross-entropy on the assistant's tokens of conversations."""

    def encode(self, tokenizer: Any, example: Messages, max_length: int) -> Row:
        return encode(tokenizer, example, max_length)

    def length(self, row: Row) -> int:
        return len(row[0])

    def loss(self, model: Any, rows: Sequence[Row], pad_id: int, device: str
             ) -> tuple[Any, dict[str, float], int]:
        batch = _batch(rows, pad_id, device)
        return _loss(model, batch), {}, int(batch["attention_mask"].sum())

    def weight(self, rows: Sequence[Row]) -> int:
        return sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in rows)

    def evaluate(self, model: Any, rows: Sequence[Row], batch_size: int, pad_id: int,
                 device: str) -> dict[str, float]:
        return {"valid_loss": assistant_loss(model, rows, batch_size, pad_id, device)}


def train(config: TrainConfig, train_set: Sequence[Any], val_set: Sequence[Any] = (),
          hooks: Hooks | None = None, objective: Objective | None = None,
          ranks: Ranks | None = None) -> TrainResult:
    """Train a LoRA adapter; resumes from the newest checkpoint in `config.output_dir`.
    Examples are conversations (`Supervised`, the default) or what `objective` encodes.
    With `ranks`, this process trains its shard of every batch and only rank 0 writes."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_linear_schedule_with_warmup

    hooks = hooks or _Quiet()
    objective = objective or Supervised()
    ranks = ranks or _Solo()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer, device = _load_model(config)
    try:
        rows = [objective.encode(tokenizer, m, config.max_length) for m in train_set]
        val_rows = [objective.encode(tokenizer, m, config.max_length) for m in val_set]
        steps_per_epoch = math.ceil(len(rows) / config.batch_size)
        total_steps = steps_per_epoch * config.n_epochs
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(config.warmup_ratio * total_steps), total_steps)

        step = 0
        if (ckpt := latest_checkpoint(config.output_dir)) is not None:
            set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
            rng = torch.load(ckpt / "rng.pt", weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            step = json.loads((ckpt / "state.json").read_text())["step"]
            hooks.event("info", f"Resumed from checkpoint at step {step}.", {"step": step})

        model.train()
        pad_id = tokenizer.pad_token_id
        out: dict[str, Any] = {}  # the step's rows in, its metrics and tokens out

        def batch_loss() -> Any:  # called through DDP, whose backward syncs the gradients
            loss, out["metrics"], out["tokens"] = objective.loss(model, out["rows"], pad_id,
                                                                 device)
            return loss

        step_loss: Any = ranks.wrap(model, batch_loss)
        losses: list[float] = []
        trained_tokens = 0
        seconds = 0.0
        lengths = [objective.length(r) for r in rows]
        while step < total_steps:
            epoch, index = divmod(step, steps_per_epoch)
            t0 = time.perf_counter()
            chosen = _epoch_batches(lengths, config.batch_size, config.seed + epoch)[index]
            mine = ranks.shard(chosen)
            # A rank without examples (a short last batch) still joins the gradient
            # exchange, with a copy that weighs nothing.
            out["rows"] = [rows[i] for i in mine or chosen[:1]]
            loss = step_loss()
            weight = objective.weight(out["rows"]) if mine else 0
            metrics = {k: v * weight for k, v in out["metrics"].items()}
            summed = ranks.sum([weight, out["tokens"] if mine else 0, *metrics.values()])
            all_weight, tokens = max(summed[0], 1), int(summed[1])
            metrics = dict(zip(metrics, (v / all_weight for v in summed[2:]), strict=True))
            # Gradients are averaged over ranks: weigh each rank's mean by its share, so the
            # update is the one a single process would make on the whole batch.
            loss = loss * (weight * ranks.world / all_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trained_tokens += tokens
            losses.append(ranks.sum([loss.item() / ranks.world])[0])
            took = time.perf_counter() - t0
            seconds += took
            hooks.event("metrics", f"Step {step}/{total_steps}: training loss={losses[-1]:.4f}",
                        {"step": step, "total_steps": total_steps, "train_loss": losses[-1],
                         "learning_rate": scheduler.get_last_lr()[0], **metrics,
                         "tokens": tokens, "tokens_per_s": tokens / took})
            if ranks.rank == 0 and (step % config.checkpoint_every == 0
                                    or step % steps_per_epoch == 0):
                valid = (objective.evaluate(model, val_rows, config.batch_size, pad_id, device)
                         if val_rows else {"valid_loss": None})
                _save_checkpoint(model, optimizer, scheduler, config, step, losses[-1],
                                 valid["valid_loss"])
                hooks.event("checkpoint", f"Checkpoint at step {step}.",
                            {"step": step, "train_loss": losses[-1], **valid})
            if hooks.should_stop():
                raise Cancelled(f"stopped at step {step}")

        adapter_dir = config.output_dir / "adapter"
        final: dict[str, float] = {}
        if ranks.rank == 0:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(adapter_dir)
            model.save_pretrained(adapter_dir)
            if val_rows:
                final = objective.evaluate(model, val_rows, config.batch_size, pad_id, device)
        tail = losses[-steps_per_epoch:] or [float("nan")]
        return TrainResult(adapter_dir, step, sum(tail) / len(tail), final.get("valid_loss"),
                           trained_tokens, seconds,
                           trained_tokens / seconds if seconds > 0 else 0.0, final)
    finally:
        # Free the model now, not at the next collection: a worker trains many jobs.
        model = step_loss = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _save_checkpoint(model: Any, optimizer: Any, scheduler: Any, config: TrainConfig,
                     step: int, train_loss: float, valid_loss: float | None) -> None:
    import torch

    final = config.output_dir / f"checkpoint-{step}"
    tmp = config.output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(
        {"step": step, "train_loss": train_loss, "valid_loss": valid_loss}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint is complete or absent
    done = sorted((p for p in config.output_dir.glob("checkpoint-*")
                   if not p.name.endswith(".tmp")), key=lambda p: int(p.name.split("-")[1]))
    for old in done[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
