"""Training throughput and peak memory of our trainer against a plain transformers + PEFT
`Trainer` baseline: same model (SmolLM2-135M), data, batch size, epochs and LoRA settings, on
this machine. Each run is its own process, so peak RSS is its own.

    .venv/bin/python -m bench.finetune_throughput [--quantization none|nf4] [--rounds 2]
    .venv/bin/python -m bench.finetune_throughput --method dpo [--rounds 2]

Runs alternate (baseline, ours, baseline, ours...) and medians are reported, as this machine is
shared and noisy.

Throughput is useful tokens (every example's real tokens, each epoch) per second of the training
loop, for both; the baseline pads every batch to the longest example in the data and computes
loss on prompt tokens too, as a stock Trainer setup does. Both adapters are then scored the same
way, by their loss per assistant token on held-out conversations, so that a faster run is only
a win if it learnt as much.

With `--method dpo` the baseline is TRL's `DPOTrainer` (sigmoid loss, the reference being the
base with the adapter disabled, as ours) on the same preference pairs, LoRA settings, beta,
batch size and epochs. Throughput counts both sequences of every pair, each epoch; both adapters
are scored by the same held-out preference accuracy (the share of held-out pairs whose preferred
answer gains more log-probability over the base than the other answer).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune.config import ALL_LINEAR, TrainConfig
from finetune.dataset import PreferenceExample, validate_preference_jsonl
from finetune.trainer import assistant_loss, encode
from llmops.cli import models_home
from llmops.cli.models import prepare_models

WORDS = ("kettle", "warranty", "support", "order", "refund", "shipping", "battery", "screen",
         "firmware", "update", "account", "password", "invoice", "delivery", "return", "policy")


def examples(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Support conversations of varied length (up to about 192 tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=rng.randint(4, 30))) + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(8, 110))) + "."
        out.append([{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}])
    return out


Data = list[list[dict[str, str]]]
BETA = 0.1


def pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs in OpenAI's format: the preferred answer opens with "Ahoy!", the other
    is a different answer of its own length."""
    chats = examples(2 * n, seed)
    return [{"input": {"messages": chats[i][:1]},
             "preferred_output": [{"role": "assistant",
                                   "content": "Ahoy! " + chats[i][1]["content"]}],
             "non_preferred_output": [chats[n + i][1]]} for i in range(n)]


def _preference_set(records: list[dict[str, Any]]) -> list[PreferenceExample]:
    data = "\n".join(json.dumps(r) for r in records).encode()
    return validate_preference_jsonl(data, tokenizer=None, max_tokens=1 << 20,
                                          min_examples=1)


def run_ours_dpo(cfg: dict[str, Any], data: list[dict[str, Any]],
                 heldout: list[dict[str, Any]]) -> dict[str, float]:
    from finetune.preference import Preference
    from finetune.trainer import train

    with tempfile.TemporaryDirectory() as out:
        paths = {"base_model": Path(str(cfg["base_model"])), "output_dir": Path(out)}
        config = TrainConfig(**{**cfg, **paths})
        result = train(config, _preference_set(data), _preference_set(heldout),
                       objective=Preference(BETA))
    return {"seconds": result.seconds,
            "heldout_accuracy": result.valid_metrics["valid_reward_accuracy"]}


def run_trl_dpo(cfg: dict[str, Any], data: list[dict[str, Any]],
                heldout: list[dict[str, Any]]) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from finetune.preference import Preference

    base = str(cfg["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = Dataset.from_list([{"prompt": r["input"]["messages"],
                               "chosen": r["preferred_output"],
                               "rejected": r["non_preferred_output"]} for r in data])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=int(cfg["lora_r"]), lora_alpha=int(cfg["lora_alpha"]),
                      lora_dropout=float(cfg["lora_dropout"]),
                      target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=int(
            cfg["batch_size"]), num_train_epochs=int(cfg["n_epochs"]),
            learning_rate=float(cfg["learning_rate"]), beta=BETA,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            max_length=int(cfg["max_length"]))
        trainer = DPOTrainer(model=model, args=args, train_dataset=rows,
                             processing_class=tokenizer, peft_config=lora)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        objective = Preference(BETA)
        held = [objective.encode(tokenizer, e, 1 << 20) for e in _preference_set(heldout)]
        scores = objective.evaluate(trainer.model, held, int(cfg["batch_size"]),
                                    tokenizer.pad_token_id, "cpu")
    return {"seconds": seconds, "heldout_accuracy": scores["valid_reward_accuracy"]}


def run_ours(cfg: dict[str, Any], data: Data, heldout: Data) -> dict[str, float]:
    from finetune.trainer import train

    with tempfile.TemporaryDirectory() as out:  # empty: nothing to resume from
        paths = {"base_model": Path(str(cfg["base_model"])), "output_dir": Path(out)}
        config = TrainConfig(**{**cfg, **paths})
        result = train(config, data, heldout)
    assert result.val_loss is not None
    return {"seconds": result.seconds, "heldout_loss": result.val_loss}


def run_baseline(cfg: dict[str, Any], data: Data, heldout: Data) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
    )

    base = str(cfg["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in data]
    enc = tokenizer(texts, padding="longest", return_tensors="pt")  # pad all to the longest
    rows = [{"input_ids": i, "attention_mask": a, "labels": i.clone()}
            for i, a in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    if cfg["quantization"] == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant,
                                                     device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=int(cfg["lora_r"]),
                                             lora_alpha=int(cfg["lora_alpha"]),
                                             target_modules=list(ALL_LINEAR),
                                             task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(
            cfg["batch_size"]), num_train_epochs=int(cfg["n_epochs"]),
            learning_rate=float(cfg["learning_rate"]), logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        rows = [encode(tokenizer, m, 1 << 20) for m in heldout]
        loss = assistant_loss(trainer.model, rows, int(cfg["batch_size"]),
                              tokenizer.pad_token_id, "cpu")
    return {"seconds": seconds, "heldout_loss": loss}


def child(which: str, spec: Path) -> None:
    payload = json.loads(spec.read_text())
    dpo = payload.get("method") == "dpo"
    run = {("ours", False): run_ours, ("baseline", False): run_baseline,
           ("ours", True): run_ours_dpo, ("baseline", True): run_trl_dpo}[(which, dpo)]
    out = run(payload["config"], payload["data"], payload["heldout"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("supervised", "dpo"), default="supervised")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.spec)
        return

    from transformers import AutoTokenizer

    base = prepare_models(models_home())["chat"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    if args.method == "dpo":
        dpo(args, base, tokenizer)
        return
    data = examples(args.examples)
    useful = sum(len(encode(tokenizer, m, 1 << 20)[0]) for m in data)
    cfg = {"base_model": str(base),
           "n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": 2e-4,
           "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "quantization":
           args.quantization, "checkpoint_every": 10_000, "max_length": 2048}
    medians = _alternate(args.rounds, {"config": cfg, "data": data,
                                       "heldout": examples(16, seed=1)})
    print(f"SmolLM2-135M, {args.examples} examples ({useful} tokens), batch {args.batch_size}, "
          f"{args.epochs} epochs, r=16 on all linear layers, {args.quantization}, CPU, "
          f"median of {args.rounds}")
    for which, r in medians.items():
        rate = useful * args.epochs / r["seconds"]
        print(f"  {which:8} {rate:7.1f} useful tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"held-out assistant loss {r['heldout_loss']:.3f}  ({r['seconds']:.1f} s)")
    speedup = medians["baseline"]["seconds"] / medians["ours"]["seconds"]
    print(f"  ours / baseline throughput: {speedup:.2f}x")


def _alternate(rounds: int, payload: dict[str, object]) -> dict[str, dict[str, float]]:
    """Run baseline and ours alternately, each in its own process; their medians."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(payload))
        results: dict[str, list[dict[str, float]]] = {"baseline": [], "ours": []}
        for _ in range(rounds):
            for which in results:
                done = subprocess.run([sys.executable, "-m", "bench.finetune_throughput",
                                       "--child", which, "--spec", str(spec)],
                                      capture_output=True, text=True, check=True)
                line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
                results[which].append(json.loads(line[7:]))
    return {which: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for which, runs in results.items()}


def dpo(args: argparse.Namespace, base: Path, tokenizer: Any) -> None:
    from finetune.preference import Preference

    data, heldout = pairs(args.examples), pairs(16, seed=1)
    useful = 0
    for example in _preference_set(data):
        pair = Preference().encode(tokenizer, example, 1 << 20)
        useful += len(pair.chosen[0]) + len(pair.rejected[0])
    cfg = {"base_model": str(base), "n_epochs": args.epochs, "batch_size": args.batch_size,
           "learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
           "quantization": "none", "checkpoint_every": 10_000, "max_length": 2048}
    medians = _alternate(args.rounds, {"method": "dpo", "config": cfg, "data": data,
                                       "heldout": heldout})
    print(f"DPO, SmolLM2-135M, {args.examples} pairs ({useful} tokens), batch "
          f"{args.batch_size}, {args.epochs} epochs, beta {BETA}, r=16 on all linear layers, "
          f"CPU, median of {args.rounds}")
    for which, r in medians.items():
        name = "TRL" if which == "baseline" else which
        rate = useful * args.epochs / r["seconds"]
        print(f"  {name:8} {rate:7.1f} tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"held-out preference accuracy {r['heldout_accuracy']:.3f}  "
              f"({r['seconds']:.1f} s)")
    speedup = medians["baseline"]["seconds"] / medians["ours"]["seconds"]
    print(f"  ours / TRL throughput: {speedup:.2f}x")


if __name__ == "__main__":
    main()
