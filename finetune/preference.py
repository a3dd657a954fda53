"""Preference tuning (DPO, sigmoid loss) as an `Objective` of the trainer's loop.

Each pair becomes two rows, the conversation answered with the preferred and with the
non-preferred output, labelled on the answer only. A batch runs its pairs' 2B rows through the
model once, projecting to the vocabulary only the answers' positions. The reference model is the
base with the adapter disabled (no second copy of the weights); it is fixed, so each pair's
reference log-probabilities are computed once, under no_grad, the first time the pair is
batched, and reused in later epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune.dataset import PreferenceExample
from finetune.trainer import IGNORE, Row, _batch, encode

__all__ = ["Pair", "Preference", "dpo_loss", "sequence_logps"]

DEFAULT_BETA = 0.1


@dataclass
class Pair:
    chosen: Row
    rejected: Row
    # The reference model's log-probabilities of the two answers, once computed.
    reference: tuple[float, float] | None = None


def sequence_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Each row's summed log-probability of its labelled tokens, shape (rows,)."""
    import torch

    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    token_logps = -torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    return torch.zeros(keep.shape[0], dtype=token_logps.dtype,
                       device=token_logps.device).index_add(0, rows, token_logps)


def dpo_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any,
             beta: float) -> tuple[Any, Any]:
    """Sigmoid DPO: mean of -log sigmoid(margin), where a pair's margin is its chosen reward
    minus its rejected reward, a reward being beta * (policy - reference) log-probability.
    Returns the loss and the margins (detached)."""
    import torch

    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -torch.nn.functional.logsigmoid(margin).mean(), margin.detach()


class Preference:
    """The DPO objective; `beta` weighs how far the policy may move from the reference."""

    def __init__(self, beta: float = DEFAULT_BETA) -> None:
        if not 0 < beta <= 2:
            raise ValueError(f"invalid beta: {beta!r}")
        self.beta = beta

    def encode(self, tokenizer: Any, example: PreferenceExample, max_length: int) -> Pair:
        # Earlier assistant turns are context: only the final answer is compared.
        context = [{**m, "weight": 0} if m["role"] == "assistant" else m
                   for m in example.messages]
        chosen, rejected = (encode(tokenizer, [*context, answer], max_length, example.tools)
                            for answer in (example.preferred, example.non_preferred))
        return Pair(chosen, rejected)

    def length(self, row: Pair) -> int:
        return max(len(row.chosen[0]), len(row.rejected[0]))

    def loss(self, model: Any, rows: Sequence[Pair], pad_id: int, device: str
             ) -> tuple[Any, dict[str, float], int]:
        batch = _batch([p.chosen for p in rows] + [p.rejected for p in rows], pad_id, device)
        reference = self._reference(model, rows, batch)
        policy = sequence_logps(model, batch)
        n = len(rows)
        loss, margin = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:],
                                self.beta)
        return loss, _summary(margin), int(batch["attention_mask"].sum())

    def weight(self, rows: Sequence[Pair]) -> int:
        return len(rows)  # the loss is a mean over pairs

    def evaluate(self, model: Any, rows: Sequence[Pair], batch_size: int, pad_id: int,
                 device: str) -> dict[str, float]:
        import torch

        was_training = model.training
        model.eval()
        totals = {"valid_loss": 0.0, "valid_reward_margin": 0.0, "valid_reward_accuracy": 0.0}
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                chunk = rows[i: i + batch_size]
                loss, metrics, _ = self.loss(model, chunk, pad_id, device)
                for name, value in (("valid_loss", float(loss)),
                                    ("valid_reward_margin", metrics["reward_margin"]),
                                    ("valid_reward_accuracy", metrics["reward_accuracy"])):
                    totals[name] += value * len(chunk)  # weighted: the last chunk is short
        model.train(was_training)
        return {name: total / max(len(rows), 1) for name, total in totals.items()}

    def _reference(self, model: Any, rows: Sequence[Pair], batch: dict[str, Any]) -> Any:
        import torch

        if any(p.reference is None for p in rows):
            with torch.no_grad(), model.disable_adapter():
                logps = sequence_logps(model, batch).tolist()
            n = len(rows)
            for i, p in enumerate(rows):
                if p.reference is None:
                    p.reference = (logps[i], logps[n + i])
        chosen = [p.reference[0] for p in rows if p.reference is not None]
        rejected = [p.reference[1] for p in rows if p.reference is not None]
        return torch.tensor(chosen + rejected, device=batch["input_ids"].device)


def _summary(margin: Any) -> dict[str, float]:
    """The step's metrics: mean reward margin, and the share of pairs it ranks right."""
    return {"reward_margin": float(margin.mean()),
            "reward_accuracy": float((margin > 0).float().mean())}
