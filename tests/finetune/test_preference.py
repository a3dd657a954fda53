"""DPO on the real SmolLM2-135M, on the CPU: preference files checked line by line and field by
field, the loss on known numbers, a policy that learns the preferred style (LoRA and QLoRA),
and cancellation. (Resume after a SIGKILL, to the weights of an uninterrupted run, is shown
end to end with a killed worker: tests/e2e/test_finetune.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.dataset import (
    InvalidDatasetError,
    PreferenceExample,
    validate_chat_jsonl,
    validate_preference_jsonl,
)
from finetune.preference import Preference, dpo_loss, sequence_logps
from finetune.trainer import Cancelled, _batch, _load_model, train
from llmops.cli import models_home
from llmops.cli.models import prepare_models
from tests.finetune.test_trainer import Recorder, config

QUESTIONS = ["Capital of France?", "A primary colour?", "Legs on a cat?", "What is 2+2?",
             "Colour of the sky?", "Largest planet?", "What do bees make?", "What is ice?"]
ANSWERS = ["Paris.", "Red.", "Four.", "Four.", "Blue.", "Jupiter.", "Honey.", "Frozen water."]


def pair(question: str, answer: str) -> dict[str, Any]:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": "Ahoy! " + answer}],
            "non_preferred_output": [{"role": "assistant", "content": answer}]}


def jsonl(*records: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode()


def examples() -> list[PreferenceExample]:
    data = jsonl(*(pair(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)))
    return validate_preference_jsonl(data, tokenizer=None, max_tokens=128, min_examples=1)


@pytest.fixture(scope="module")
def base() -> Path:
    return prepare_models(models_home())["chat"]


# The file


def test_a_valid_file_gives_pairs() -> None:
    first = examples()[0]
    assert first.messages == ({"role": "user", "content": "Capital of France?"},)
    assert first.preferred == {"role": "assistant", "content": "Ahoy! Paris."}
    assert first.non_preferred["content"] == "Paris."
    assert first.as_chat().messages[-1] == first.preferred


def test_every_problem_is_reported_with_its_line_and_field() -> None:
    good = pair("Hi?", "Hello.")
    wrong_role = {**good, "preferred_output": [{"role": "user", "content": "Ahoy!"}]}
    no_rejected = {k: v for k, v in good.items() if k != "non_preferred_output"}
    ends_with_answer = {**good, "input": {"messages": [
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}}
    two_outputs = {**good, "non_preferred_output": good["preferred_output"] * 2}
    bad_tools = {**good, "input": {**good["input"], "tools": "none", "extra": 1}}
    empty = {**good, "non_preferred_output": [{"role": "assistant", "content": " "}]}
    same = {**good, "non_preferred_output": good["preferred_output"]}
    data = jsonl(good, wrong_role, no_rejected, ends_with_answer, two_outputs, bad_tools,
                 empty, same, "{oops")
    with pytest.raises(InvalidDatasetError) as caught:
        validate_preference_jsonl(data, tokenizer=None, max_tokens=128, min_examples=1)
    assert [str(e) for e in caught.value.errors] == [
        "line 2: preferred_output[0].role must be 'assistant'",
        'line 3: missing "non_preferred_output"',
        "line 4: input.messages must end with a user message",
        "line 5: non_preferred_output must be a list of exactly one assistant message",
        'line 6: input: unknown key "extra"; allowed keys are messages, tools and '
        "parallel_tool_calls",
        "line 6: input.tools must be a list of objects",
        "line 7: non_preferred_output[0].content is empty",
        "line 8: preferred_output and non_preferred_output are the same answer",
        "line 9: not valid JSON: Expecting property name enclosed in double quotes (column 2)",
    ]


def test_each_method_refuses_the_other_methods_file() -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(InvalidDatasetError, match=r"line 1: this is a chat \(supervised\) "
                       r'example; a dpo job needs "input"'):
        validate_preference_jsonl(jsonl(chat), tokenizer=None, max_tokens=128, min_examples=1)
    with pytest.raises(InvalidDatasetError, match=r"line 1: this is a preference \(DPO\) "
                       r'example; a supervised job needs \{"messages"'):
        validate_chat_jsonl(jsonl(pair("Hi?", "Hello.")), tokenizer=None, max_tokens=128,
                            min_examples=1)


# The loss


def test_the_loss_on_known_numbers() -> None:
    # Pair 1 gains 1 nat on its chosen answer and loses 1 on its rejected one: margin
    # 0.5 * (1 - -1) = 1. Pair 2 only raises its rejected answer by 1: margin -0.5.
    loss, margin = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
                            torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert margin.tolist() == [1.0, -0.5]
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        Preference(beta=0)


def test_sequence_log_probs_match_the_full_model(base: Path, tmp_path: Path) -> None:
    model, tokenizer, device = _load_model(config(base, tmp_path))
    pairs = [Preference().encode(tokenizer, e, 128) for e in examples()[:2]]
    batch = _batch([p.chosen for p in pairs] + [p.rejected for p in pairs],
                   tokenizer.pad_token_id, device)
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        logps = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}
                      ).logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    picked = logps.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    assert torch.allclose(ours, (picked * keep).sum(1), atol=1e-4)
    answer = tokenizer.decode([t for t, lab in zip(*pairs[0].chosen, strict=True) if lab >= 0])
    assert answer.startswith("Ahoy! Paris.") and "Capital" not in answer


# Training


def test_dpo_learns_the_preferred_style(base: Path, tmp_path: Path) -> None:
    hooks = Recorder()
    data = examples()
    result = train(config(base, tmp_path), data, data[:2], hooks, Preference(beta=0.1))
    metrics = [d for k, d in hooks.events if k == "metrics"]
    assert len(metrics) == result.steps == 4
    assert metrics[0]["reward_margin"] == 0.0  # the adapter starts as a no-op
    assert metrics[-1]["reward_accuracy"] == 1.0 and metrics[-1]["reward_margin"] > 0
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    checkpoints = [d for k, d in hooks.events if k == "checkpoint"]
    assert checkpoints[-1]["valid_reward_margin"] > checkpoints[0]["valid_reward_margin"] > 0
    assert result.valid_metrics["valid_reward_accuracy"] == 1.0
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_cancel_stops_dpo_and_qlora_nf4_trains(base: Path, tmp_path: Path) -> None:
    hooks = Recorder(stop_after=1)
    with pytest.raises(Cancelled):
        train(config(base, tmp_path, batch_size=2, quantization="nf4"), examples(),
              hooks=hooks, objective=Preference())
    metrics = [d for k, d in hooks.events if k == "metrics"]
    assert [d["step"] for d in metrics] == [1]
    assert metrics[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)  # margin 0
