"""One job on two processes (gloo, on the CPU) with the real SmolLM2-135M: the same losses and
adapter as one process (supervised and DPO), a killed rank that resumes the whole group from its
checkpoint, and a cancel that stops both ranks at the same step."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from finetune.config import TrainConfig
from finetune.distributed import train_distributed
from finetune.preference import Preference
from finetune.trainer import Cancelled, TrainResult, latest_checkpoint, train
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from tests.finetune.test_preference import examples

# Tolerances against one process: the per-rank batches are padded to their own longest and
# summed in another order, so the arithmetic differs in the last bits, no more.
LOSS_RTOL = 1e-3
ADAPTER_ATOL = 2.5e-4  # measured: 7.3e-5, on weights of up to 0.044

# Nine conversations of different lengths: with a batch of 4, each epoch ends with a batch of
# one, so one rank has nothing to train on in that step.
DATA = [[{"role": "user", "content": f"Which colour is the Zorblax {n}?"},
         {"role": "assistant", "content": f"The Zorblax {n} is {'very ' * (n % 5)}purple."}]
        for n in range(9)]


@pytest.fixture(scope="module")
def base() -> Path:
    return prepare_models(models_home())["chat"]


def config(base: Path, out: Path) -> TrainConfig:
    # No dropout: its masks are drawn per rank, so runs would agree only statistically.
    return TrainConfig(base_model=base, output_dir=out, n_epochs=2, batch_size=4,
                       learning_rate=1e-3, lora_r=8, lora_dropout=0.0,
                       target_modules=("q_proj", "v_proj"), checkpoint_every=2, max_length=64)


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.stop_after = stop_after

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((level, message, data or {}))

    def of(self, level: str) -> list[dict[str, Any]]:
        return [d for k, _, d in self.events if k == level]

    def should_stop(self) -> bool:
        steps = [d["step"] for d in self.of("metrics")]
        return self.stop_after is not None and bool(steps) and steps[-1] >= self.stop_after


class KillRankOne(Recorder):
    """SIGKILLs rank 1 when the first checkpoint is relayed, once."""

    def __init__(self, spec: Path) -> None:
        super().__init__()
        self.spec, self.killed = str(spec), False

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().event(level, message, data)
        if level == "checkpoint" and not self.killed:
            ranks = [p for p in psutil.process_iter(["cmdline"])
                     if "finetune.distributed" in (p.info["cmdline"] or [])
                     and self.spec in p.info["cmdline"]]
            victim = next(p for p in ranks if p.environ().get("RANK") == "1")
            os.kill(victim.pid, signal.SIGKILL)
            self.killed = True


def adapter(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def solo(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Recorder]:
    hooks = Recorder()
    return train(config(base, tmp_path_factory.mktemp("solo")), DATA, hooks=hooks), hooks


@pytest.fixture(scope="module")
def pair(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Recorder]:
    hooks = Recorder()
    out = tmp_path_factory.mktemp("pair")
    return train_distributed(config(base, out), DATA, DATA[:2], hooks, devices=2), hooks


def test_two_ranks_train_as_one_process(solo: tuple[TrainResult, Recorder],
                                        pair: tuple[TrainResult, Recorder]) -> None:
    (one, one_hooks), (two, two_hooks) = solo, pair
    assert two.steps == one.steps == 6
    assert two.trained_tokens == one.trained_tokens  # counted over both ranks
    expected = [d["train_loss"] for d in one_hooks.of("metrics")]
    got = [d["train_loss"] for d in two_hooks.of("metrics")]  # relayed from rank 0, in order
    assert got == pytest.approx(expected, rel=LOSS_RTOL)
    assert max_diff(adapter(one), adapter(two)) < ADAPTER_ATOL
    assert [d["step"] for d in two_hooks.of("checkpoint")] == [2, 3, 4, 6]  # and epoch ends
    assert two.val_loss is not None and two_hooks.of("checkpoint")[-1]["valid_loss"] > 0


def test_a_killed_rank_resumes_the_group_from_its_checkpoint(
        base: Path, tmp_path: Path, pair: tuple[TrainResult, Recorder]) -> None:
    hooks = KillRankOne(tmp_path / "ranks" / "spec.json")
    result = train_distributed(config(base, tmp_path), DATA, DATA[:2], hooks, devices=2)
    assert hooks.killed
    resumed = [d["step"] for _, m, d in hooks.events if m.startswith("Resumed")]
    assert resumed and resumed[0] in (2, 4)
    assert result.steps == 6
    assert max_diff(adapter(pair[0]), adapter(result)) < ADAPTER_ATOL
    assert not (tmp_path / "ranks" / "spec.json").exists()  # the data's copy is gone


def test_cancel_stops_both_ranks_at_the_same_step(base: Path, tmp_path: Path) -> None:
    with pytest.raises(Cancelled):
        train_distributed(config(base, tmp_path), DATA, hooks=Recorder(stop_after=1),
                          devices=2)
    outcomes = [json.loads((tmp_path / "ranks" / f"result-{r}.json").read_text())
                for r in (0, 1)]
    assert outcomes[0] == outcomes[1] and "cancelled" in outcomes[0]
    stopped = int(outcomes[0]["cancelled"].rsplit(" ", 1)[1])
    assert 1 <= stopped < 6
    assert latest_checkpoint(tmp_path) in (None, tmp_path / f"checkpoint-{stopped // 2 * 2}")


def test_dpo_on_two_ranks_matches_one_process(base: Path, tmp_path: Path) -> None:
    """The preference objective too: each rank's pairs weigh by their share of the batch, and
    the reward metrics are those of the whole batch."""
    pairs = [e for e in examples() if e.preferred["content"] != "Ahoy! Four."][:5]  # 2+2+1
    runs = []
    for devices in (1, 2):
        hooks = Recorder()
        cfg = replace(config(base, tmp_path / str(devices)), n_epochs=1, batch_size=2)
        result = (train(cfg, pairs, hooks=hooks, objective=Preference()) if devices == 1 else
                  train_distributed(cfg, pairs, hooks=hooks, devices=2,
                                    objective=Preference()))
        runs.append((result, hooks.of("metrics")))
    (one, one_steps), (two, two_steps) = runs
    assert [m["step"] for m in two_steps] == [1, 2, 3]
    for name in ("train_loss", "reward_margin", "reward_accuracy"):
        assert [m[name] for m in two_steps] == pytest.approx([m[name] for m in one_steps],
                                                             rel=LOSS_RTOL, abs=1e-6)
    # The update (lora_B starts at zero) agrees as a whole (measured: 4e-6 relative). Single
    # weights may not: Adam's first steps move a weight whose gradient is near zero by about
    # the learning rate whatever its sign, and the last bits of such a gradient differ.
    a, b = adapter(one), adapter(two)
    update = [k for k in a if "lora_B" in k]
    drift = sum(float((a[k] - b[k]).abs().sum()) for k in update)
    assert drift / sum(float(a[k].abs().sum()) for k in update) < 1e-3
