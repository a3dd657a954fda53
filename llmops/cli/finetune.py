"""`llmops finetune create`: upload a dataset, start a job through the gateway's API (as any
client would), and follow it with a progress bar and live loss; on success print the model
name and write a loss-curve PNG."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_finetune_commands", "openai_client"]

_TERMINAL = ("succeeded", "failed", "cancelled")


def openai_client(args: argparse.Namespace) -> Any:
    """The official client for the gateway named by --base-url, OPENAI_BASE_URL or the local
    stack, with the key from --api-key, OPENAI_API_KEY or the local stack's admin key."""
    from openai import OpenAI

    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    local = Path(args.state_dir) / "admin_key"
    if not key and local.exists():
        key = local.read_text().strip()
    if not key:
        raise SystemExit("no API key: pass --api-key or set OPENAI_API_KEY")
    base = args.base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1"
    return OpenAI(base_url=base, api_key=key, max_retries=2, timeout=120)


def cmd_create(args: argparse.Namespace) -> int:
    client = openai_client(args)
    with Path(args.file).open("rb") as fh:
        training = client.files.create(file=fh, purpose="fine-tune")
    validation = None
    if args.validation:
        with Path(args.validation).open("rb") as fh:
            validation = client.files.create(file=fh, purpose="fine-tune").id
    hyperparameters = {k: v for k, v in (("n_epochs", args.epochs),
                                         ("batch_size", args.batch_size),
                                         ("learning_rate_multiplier", args.lr_multiplier))
                       if v is not None}
    if args.beta is not None:
        hyperparameters["beta"] = args.beta
    method = {"type": args.method, args.method: {"hyperparameters": hyperparameters}}
    lora: dict[str, Any] = {"r": args.lora_r, "quantization": args.quantization}
    if args.devices is not None:  # unset: as many as the worker trains on
        lora["devices"] = args.devices
    extra: dict[str, Any] = {"lora": lora}
    if args.eval or args.promote:
        extra["evaluation"] = {"eval_id": args.eval, "promote": args.promote or "always"}
    job = client.fine_tuning.jobs.create(
        model=args.model, training_file=training.id, validation_file=validation,
        suffix=args.suffix, method=method, extra_body=extra)
    print(f"created {job.id} (training file {training.id})")
    return follow(client, job.id, Path(args.plot or f"{job.id}-loss.png")) if args.follow else 0


def follow(client: Any, job_id: str, plot: Path) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    seen: set[str] = set()
    losses: list[tuple[int, float]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"
                  "/{task.total} steps"), TimeElapsedColumn()) as progress:
        bar = progress.add_task("validating files", total=None)
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            events = client.fine_tuning.jobs.list_events(job_id, limit=200).data
            for event in reversed(events):
                if event.id in seen:
                    continue
                seen.add(event.id)
                data = event.data or {}
                if event.type == "metrics" and "step" in data:
                    losses.append((data["step"], data["train_loss"]))
                    progress.update(bar, total=data["total_steps"], completed=data["step"],
                                    description=f"training loss {data['train_loss']:.4f}")
                else:
                    progress.console.print(event.message)
            if job.status in _TERMINAL:
                break
            time.sleep(1.0)
    if job.status != "succeeded":
        print(f"job {job.status}: {job.error.message if job.error else ''}", file=sys.stderr)
        return 1
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
    valid = sorted((c.step_number, c.metrics.valid_loss) for c in checkpoints
                   if c.metrics.valid_loss is not None)
    _plot(plot, sorted(losses), valid, job.fine_tuned_model)
    show(job)
    print(f"loss curve: {plot}")
    return 0


def show(job: Any) -> None:
    """A job's outcome: its model and, when it was evaluated, the verdict."""
    print(f"{job.id}: {job.status}")
    if job.fine_tuned_model:
        print(f"fine-tuned model: {job.fine_tuned_model}")
    verdict = ((job.model_extra or {}).get("result") or {}).get("evaluation")
    if verdict:
        if "promoted" in verdict:
            print(f"evaluation ({verdict.get('eval_id')}): "
                  + ("promoted" if verdict["promoted"] else "held back")
                  + f" - {verdict.get('reason', '')}")
        else:
            print(f"evaluation: {verdict.get('state', 'pending')}")
        for role in ("base", "adapter"):
            if isinstance(verdict.get(role), dict):
                r = verdict[role]
                print(f"  {role:<8} {r['pass_rate']:6.1%} of {r['items']} items passed "
                      f"(run {r['run_id']})")


def cmd_show(args: argparse.Namespace) -> int:
    show(openai_client(args).fine_tuning.jobs.retrieve(args.job))
    return 0


def _plot(path: Path, train: list[tuple[int, float]], valid: list[tuple[int, float]],
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if valid:
        ax.plot(*zip(*valid, strict=True), marker="o", label="validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_finetune_commands(sub: Any) -> None:
    finetune = sub.add_parser("finetune", help="fine-tuning jobs").add_subparsers(
        dest="finetune", required=True)
    create = finetune.add_parser("create", help="upload a dataset and start a job")
    create.add_argument("--model", required=True)
    create.add_argument("--file", required=True,
                        help="JSONL training data: chats, or preference pairs with --method dpo")
    create.add_argument("--validation", help="JSONL validation data, in the same format")
    create.add_argument("--method", choices=("supervised", "dpo"), default="supervised")
    create.add_argument("--beta", type=float, help="DPO only: how far from the base it may move")
    create.add_argument("--suffix")
    create.add_argument("--epochs", type=int)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--lr-multiplier", type=float)
    create.add_argument("--lora-r", type=int, default=16)
    create.add_argument("--devices", type=int,
                        help="processes (GPUs) to train on (default: the worker's setting)")
    create.add_argument("--quantization", choices=("none", "nf4"), default="none",
                        help="nf4: QLoRA")
    create.add_argument("--eval", help="evaluate base and adapter on this eval after training")
    create.add_argument("--promote", choices=("always", "if_better"),
                        help="if_better: serve the adapter only if it beats the base")
    create.add_argument("--follow", action="store_true", help="show progress until it ends")
    create.add_argument("--plot", help="where to write the loss-curve PNG")
    create.add_argument("--base-url", help="default: OPENAI_BASE_URL or the local stack")
    create.add_argument("--api-key", help="default: OPENAI_API_KEY or the local admin key")
    create.set_defaults(func=cmd_create)
    show_job = finetune.add_parser("show", help="a job's status, model and evaluation")
    show_job.add_argument("job")
    show_job.add_argument("--base-url", help="default: OPENAI_BASE_URL or the local stack")
    show_job.add_argument("--api-key", help="default: OPENAI_API_KEY or the local admin key")
    show_job.set_defaults(func=cmd_show)
