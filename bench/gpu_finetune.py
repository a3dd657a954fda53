"""Our LoRA/QLoRA trainer against a plain transformers + PEFT `Trainer`, on one CUDA GPU.

    PYTHONPATH=<repo> python -m bench.gpu_finetune --model DIR [--examples 512] [--epochs 1]

Both train the same model (bf16; and, where bitsandbytes imports, a QLoRA NF4 job too) on the
same synthetic chat data, with the same LoRA settings, batch size, learning-rate schedule and
steps. Each run is its own process, so its peak GPU memory (`torch.cuda.max_memory_allocated`)
is its own. Printed for each: useful tokens/s (every example's real tokens, each epoch, over
the training loop's seconds), peak GPU memory, and held-out loss per assistant token (both
adapters scored by the same function), then ours/baseline ratios.

The baseline is a stock setup: random batches padded to their longest by
`DataCollatorForSeq2Seq`, the loss on the same assistant tokens, `Trainer` with `bf16=True`.

Needs only PyTorch, transformers, PEFT and accelerate (bitsandbytes for QLoRA): no network,
no vLLM, none of llmops' services; it imports `finetune.config` and `finetune.trainer`, which
import nothing else of ours. `--model` is any Hugging Face model folder, such as the one
`llmops models` builds from the offline GGUF (`~/.cache/llmops/models/SmolLM2-135M-Instruct`);
see docs/benchmarks.md for carrying it to a GPU machine. Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune.config import ALL_LINEAR, TrainConfig
from finetune.trainer import assistant_loss, encode

Conversation = list[dict[str, str]]

PRODUCTS = ("the Zorblax 9000 kettle", "the Aurora X2 router", "the Nimbus air purifier",
            "the Vela e-bike", "the Quill smart pen", "the Tern robot vacuum",
            "the Halcyon standing desk", "the Fjord espresso machine")
ISSUES = ("does not turn on", "keeps disconnecting from the Wi-Fi", "makes a clicking noise",
          "shows error E42", "drains its battery overnight", "will not pair with the phone app",
          "arrived with a cracked panel", "stopped charging after the last update")
STEPS = ("Unplug it for thirty seconds, then plug it back in.",
         "Hold the reset button for ten seconds until the light blinks twice.",
         "Check that the firmware is current in the companion app under Settings > Device.",
         "Make sure the outlet works by plugging in another appliance.",
         "Remove the battery, clean the contacts with a dry cloth and reinsert it.",
         "Move it within five metres of the router and retry the pairing.",
         "Take a photo of the damage and the box label for the claim.",
         "Run the self-test from the menu and note the code it shows.")
CLOSINGS = ("If that does not help, reply here and we will arrange a replacement.",
            "Your warranty covers this, so a repair costs you nothing.",
            "I have opened a ticket for you; you will get an email within a day.",
            "Let me know how it goes and I will follow up.")
SYSTEM = "You are a concise, friendly support agent for an electronics shop."


def conversations(n: int, seed: int) -> list[Conversation]:
    """Support chats of varied length (one to three turns, short to long answers); the same
    for a given seed on every machine."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        product = rng.choice(PRODUCTS)
        chat = [{"role": "system", "content": SYSTEM}]
        for turn in range(rng.randint(1, 3)):
            issue = rng.choice(ISSUES)
            question = (f"Hi, my {product.removeprefix('the ')} {issue}." if turn == 0
                        else f"I tried that, but it still {issue}. What now?")
            steps = rng.sample(STEPS, k=rng.randint(1, 5))
            answer = " ".join([f"Sorry to hear that {product} {issue}.",
                               *(f"{i + 1}. {s}" for i, s in enumerate(steps)),
                               rng.choice(CLOSINGS)])
            chat += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
        out.append(chat)
    return out


def run_ours(spec: dict[str, Any]) -> dict[str, float]:
    import torch

    from finetune.trainer import train

    with tempfile.TemporaryDirectory() as out:  # empty: nothing to resume from
        config = TrainConfig(base_model=Path(spec["model"]), output_dir=Path(out),
                             target_modules=ALL_LINEAR, **spec["config"])
        result = train(config, spec["data"], spec["heldout"])
    assert result.val_loss is not None
    return {"seconds": result.seconds, "heldout_loss": result.val_loss,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_baseline(spec: dict[str, Any]) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    cfg = spec["config"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = []
    for m in spec["data"]:
        ids, labels = encode(tokenizer, m, cfg["max_length"])
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if cfg["quantization"] == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant,
                                                     device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16)
        model = model.to("cuda")
    model = get_peft_model(model, LoraConfig(
        r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
        target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"))
    # Our trainer's warmup, in whole steps (a float here would be rounded up instead).
    warmup = int(cfg["warmup_ratio"] * math.ceil(len(rows) / cfg["batch_size"]) * cfg["n_epochs"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg["batch_size"],
            num_train_epochs=cfg["n_epochs"], learning_rate=cfg["learning_rate"],
            lr_scheduler_type="linear", warmup_steps=warmup, weight_decay=0.0,
            max_grad_norm=1.0, bf16=True, logging_steps=50, save_strategy="no", report_to=[],
            seed=cfg["seed"], remove_unused_columns=False, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    heldout = [encode(tokenizer, m, cfg["max_length"]) for m in spec["heldout"]]
    loss = assistant_loss(trainer.model, heldout, cfg["batch_size"], tokenizer.pad_token_id,
                          "cuda")
    return {"seconds": seconds, "heldout_loss": loss,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def child(which: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    out = (run_ours if which == "ours" else run_baseline)(spec)
    print("RESULT " + json.dumps(out), flush=True)


def _measure(which: str, spec: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "bench.gpu_finetune", "--child", which,
                           "--spec", str(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{which} run failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, float] = json.loads(line[7:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--child", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.spec)
        return

    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_finetune needs a CUDA GPU (torch.cuda.is_available() is False); "
              "see docs/benchmarks.md for running it on a GPU machine.", file=sys.stderr)
        sys.exit(2)
    if args.model is None or not (args.model / "config.json").exists():
        parser.error("--model must be a Hugging Face model folder (with config.json)")
    from transformers import AutoTokenizer

    try:
        import bitsandbytes  # noqa: F401
        quantizations = ["none", "nf4"]
    except ImportError:
        quantizations = ["none"]
        print("bitsandbytes is not importable: the QLoRA (nf4) comparison is skipped.")

    data, heldout = conversations(args.examples, seed=0), conversations(64, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    useful = sum(len(encode(tokenizer, m, args.max_length)[0]) for m in data) * args.epochs
    print(f"{args.model.name} on {torch.cuda.get_device_name(0)}, torch {torch.__version__}: "
          f"{args.examples} conversations ({useful // args.epochs} tokens), batch "
          f"{args.batch_size}, {args.epochs} epoch(s), LoRA r={args.lora_r} on all linear "
          f"layers, bf16 compute")
    for quantization in quantizations:
        config = {"n_epochs": args.epochs, "batch_size": args.batch_size,
                  "learning_rate": 2e-4, "warmup_ratio": 0.05, "lora_r": args.lora_r,
                  "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.05,
                  "quantization": quantization, "checkpoint_every": 1_000_000,
                  "max_length": args.max_length, "seed": 0}
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "spec.json"
            spec.write_text(json.dumps({"model": str(args.model.resolve()), "config": config,
                                        "data": data, "heldout": heldout}))
            results = {which: _measure(which, spec) for which in ("baseline", "ours")}
        print(f"  {'QLoRA nf4' if quantization == 'nf4' else 'LoRA bf16'}:")
        for which, r in results.items():
            print(f"    {which:8} {useful / r['seconds']:9.0f} useful tokens/s  peak GPU "
                  f"{r['peak_gib']:6.2f} GiB  held-out assistant loss {r['heldout_loss']:.3f}"
                  f"  ({r['seconds']:.1f} s)")
        ours, base = results["ours"], results["baseline"]
        print(f"    ours / baseline: throughput {base['seconds'] / ours['seconds']:.2f}x, "
              f"peak memory {ours['peak_gib'] / base['peak_gib']:.2f}x, held-out loss "
              f"{ours['heldout_loss'] - base['heldout_loss']:+.3f}")


if __name__ == "__main__":
    main()
