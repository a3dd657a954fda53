"""Training configuration: hyperparameters and LoRA/QLoRA settings, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ALL_LINEAR", "TrainConfig"]

# Every linear layer of a Llama-style decoder (SmolLM2 included).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    base_model: Path  # a Hugging Face model folder
    output_dir: Path  # checkpoints and the final adapter go here
    n_epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.05
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_LINEAR
    quantization: Literal["none", "nf4"] = "none"  # nf4: QLoRA with double quantization
    gradient_checkpointing: bool = False
    checkpoint_every: int = 20  # steps; a checkpoint is also written at the end of each epoch
    keep_checkpoints: int = 2
    max_length: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "n_epochs": 1 <= self.n_epochs <= 100,
            "batch_size": 1 <= self.batch_size <= 256,
            "learning_rate": 0 < self.learning_rate < 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "lora_r": 1 <= self.lora_r <= 256,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0 <= self.lora_dropout < 1,
            "target_modules": bool(self.target_modules),
            "quantization": self.quantization in ("none", "nf4"),
            "checkpoint_every": self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "max_length": self.max_length >= 16,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")
