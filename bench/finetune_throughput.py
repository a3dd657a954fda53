"""Training throughput and peak memory of our trainer against a plain transformers + PEFT
`Trainer` baseline: same model (SmolLM2-135M), data, batch size, epochs and LoRA settings, on
this machine. Each run is its own process, so peak RSS is its own.

    .venv/bin/python -m bench.finetune_throughput [--quantization none|nf4] [--rounds 2]

Runs alternate (baseline, ours, baseline, ours...) and medians are reported, as this machine is
shared and noisy.

Throughput is useful tokens (every example's real tokens, each epoch) per second of the training
loop, for both; the baseline pads every batch to the longest example in the data and computes
loss on prompt tokens too, as a stock Trainer setup does. Both adapters are then scored the same
way, by their loss per assistant token on held-out conversations, so that a faster run is only
a win if it learnt as much.
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

from finetune.config import ALL_LINEAR, TrainConfig
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


def run_ours(cfg: dict[str, object], data: Data, heldout: Data) -> dict[str, float]:
    from finetune.trainer import train

    with tempfile.TemporaryDirectory() as out:  # empty: nothing to resume from
        paths = {"base_model": Path(str(cfg["base_model"])), "output_dir": Path(out)}
        config = TrainConfig(**{**cfg, **paths})  # type: ignore[arg-type]
        result = train(config, data, heldout)
    assert result.val_loss is not None
    return {"seconds": result.seconds, "heldout_loss": result.val_loss}


def run_baseline(cfg: dict[str, object], data: Data, heldout: Data) -> dict[str, float]:
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
    model = get_peft_model(model, LoraConfig(r=int(cfg["lora_r"]),  # type: ignore[arg-type]
                                             lora_alpha=int(cfg["lora_alpha"]),  # type: ignore[arg-type]
                                             target_modules=list(ALL_LINEAR),
                                             task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(
            cfg["batch_size"]), num_train_epochs=int(cfg["n_epochs"]),  # type: ignore[arg-type]
            learning_rate=float(cfg["learning_rate"]), logging_steps=1,  # type: ignore[arg-type]
            save_strategy="no", report_to=[], use_cpu=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        rows = [encode(tokenizer, m, 1 << 20) for m in heldout]
        loss = assistant_loss(trainer.model, rows, int(cfg["batch_size"]),  # type: ignore[arg-type]
                              tokenizer.pad_token_id, "cpu")
    return {"seconds": seconds, "heldout_loss": loss}


def child(which: str, spec: Path) -> None:
    payload = json.loads(spec.read_text())
    run = run_ours if which == "ours" else run_baseline
    out = run(payload["config"], payload["data"], payload["heldout"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    data = examples(args.examples)
    tokenizer = AutoTokenizer.from_pretrained(base)
    useful = sum(len(encode(tokenizer, m, 1 << 20)[0]) for m in data)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"base_model": str(base),
               "n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": 2e-4,
               "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "quantization":
               args.quantization, "checkpoint_every": 10_000, "max_length": 2048}
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"config": cfg, "data": data,
                                    "heldout": examples(16, seed=1)}))
        results: dict[str, list[dict[str, float]]] = {"baseline": [], "ours": []}
        for _ in range(args.rounds):
            for which in results:
                done = subprocess.run([sys.executable, "-m", "bench.finetune_throughput",
                                       "--child", which, "--spec", str(spec)],
                                      capture_output=True, text=True, check=True)
                line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
                results[which].append(json.loads(line[7:]))
    print(f"SmolLM2-135M, {args.examples} examples ({useful} tokens), batch {args.batch_size}, "
          f"{args.epochs} epochs, r=16 on all linear layers, {args.quantization}, CPU, "
          f"median of {args.rounds}")
    medians = {which: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for which, runs in results.items()}
    for which, r in medians.items():
        rate = useful * args.epochs / r["seconds"]
        print(f"  {which:8} {rate:7.1f} useful tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"held-out assistant loss {r['heldout_loss']:.3f}  ({r['seconds']:.1f} s)")
    speedup = medians["baseline"]["seconds"] / medians["ours"]["seconds"]
    print(f"  ours / baseline throughput: {speedup:.2f}x")


if __name__ == "__main__":
    main()
