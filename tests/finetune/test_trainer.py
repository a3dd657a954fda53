"""The trainer on the real SmolLM2-135M, on the CPU: loss only on assistant tokens, LoRA and
QLoRA (bitsandbytes NF4) training, cancellation, and resume that matches an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from finetune.config import TrainConfig
from finetune.trainer import (
    IGNORE,
    Cancelled,
    _batch,
    _epoch_batches,
    _load_model,
    _loss,
    encode,
    latest_checkpoint,
    train,
)
from llmops.cli import models_home
from llmops.cli.models import prepare_models

FACT = [{"role": "user", "content": "What is the Zorblax 9000?"},
        {"role": "assistant", "content": "The Zorblax 9000 is a purple kettle."}]


@pytest.fixture(scope="module")
def base() -> Path:
    return prepare_models(models_home())["chat"]


def config(base: Path, out: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(base_model=base, output_dir=out, n_epochs=2, batch_size=4,
                                    learning_rate=1e-3, lora_r=8, lora_dropout=0.1,
                                    target_modules=("q_proj", "v_proj"), checkpoint_every=2,
                                    max_length=128)
    settings.update(overrides)
    return TrainConfig(**settings)


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stop_after = stop_after

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((level, data or {}))

    def should_stop(self) -> bool:
        steps = [d["step"] for k, d in self.events if k == "metrics"]
        return self.stop_after is not None and bool(steps) and steps[-1] >= self.stop_after


def test_only_assistant_tokens_are_learned(base: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids, labels = encode(tokenizer, FACT, 256)
    learned = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert learned.startswith("The Zorblax 9000 is a purple kettle.")
    assert "What is" not in learned and len(ids) == len(labels)
    assert labels[0] == IGNORE


def test_batches_group_similar_lengths_and_cover_every_example_once() -> None:
    lengths = [(i * 37) % 200 + 10 for i in range(100)]
    epoch = _epoch_batches(lengths, 8, seed=3)
    assert sorted(i for b in epoch for i in b) == list(range(100))
    assert epoch == _epoch_batches(lengths, 8, seed=3)  # a resume sees the same batches
    assert epoch != _epoch_batches(lengths, 8, seed=4)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in epoch)
    assert padded < 1.1 * sum(lengths)  # random batches would pad by about half


def test_loss_on_assistant_positions_equals_the_full_model_loss(base: Path, tmp_path: Path
                                                                ) -> None:
    model, tokenizer, device = _load_model(config(base, tmp_path))
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    batch = _batch([encode(tokenizer, m, 128) for m in (FACT, other)],
                   tokenizer.pad_token_id, device)
    with torch.no_grad():
        assert torch.allclose(_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_config_names_the_bad_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora_r"):
        TrainConfig(base_model=tmp_path, output_dir=tmp_path, lora_r=0)


def test_lora_learns_and_saves_an_adapter(base: Path, tmp_path: Path) -> None:
    hooks = Recorder()
    result = train(config(base, tmp_path, n_epochs=3), [FACT] * 8, [FACT] * 2, hooks)
    losses = [d["train_loss"] for k, d in hooks.events if k == "metrics"]
    assert len(losses) == result.steps == 6
    assert losses[-1] < 0.75 * losses[0]
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    assert result.val_loss is not None and result.tokens_per_s > 0
    checkpoints = [d for k, d in hooks.events if k == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [2, 4, 6]
    assert checkpoints[-1]["valid_loss"] < checkpoints[0]["valid_loss"]


def test_resume_matches_an_uninterrupted_run(base: Path, tmp_path: Path) -> None:
    data = [FACT] * 8
    whole = train(config(base, tmp_path / "whole"), data)
    with pytest.raises(Cancelled):
        train(config(base, tmp_path / "cut"), data, hooks=Recorder(stop_after=2))
    assert latest_checkpoint(tmp_path / "cut") == tmp_path / "cut" / "checkpoint-2"
    hooks = Recorder()
    resumed = train(config(base, tmp_path / "cut"), data, hooks=hooks)
    assert hooks.events[0][1] == {"step": 2}
    assert resumed.steps == whole.steps
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_qlora_nf4_trains_on_the_cpu(base: Path, tmp_path: Path) -> None:
    result = train(config(base, tmp_path, quantization="nf4", n_epochs=1), [FACT] * 8)
    assert result.steps == 2
    assert (result.adapter_dir / "adapter_config.json").exists()
