"""`llmops batches ...`: create a batch from a JSONL file of requests and follow it with a
progress bar of its request counts, then download its output and error files; list, show and
cancel batches. Everything goes through the gateway's Batch and Files APIs, as any client's
calls would."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmops.cli.finetune import openai_client

__all__ = ["add_batches_commands", "follow"]

_TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _counts(batch: Any) -> str:
    c = batch.request_counts
    return f"{c.completed} completed, {c.failed} failed of {c.total}" if c else "-"


def show(batch: Any) -> None:
    print(f"{batch.id}: {batch.status} ({batch.endpoint}, created {_when(batch.created_at)})")
    print(f"  requests: {_counts(batch)}")
    for name in ("output_file_id", "error_file_id"):
        if getattr(batch, name):
            print(f"  {name}: {getattr(batch, name)}")
    for error in (batch.errors.data or []) if batch.errors else []:
        where = f"line {error.line}: " if error.line else ""
        print(f"  {where}{error.code}: {error.message}"
              + (f" ({error.param})" if error.param else ""))


def follow(client: Any, batch_id: str, into: Path, poll_s: float = 1.0) -> int:
    """Show the batch's request counts until it ends, then download its files."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn()) as progress:
        bar = progress.add_task("validating", total=None, failed=0)
        while True:
            batch = client.batches.retrieve(batch_id)
            c = batch.request_counts
            if c is not None:
                progress.update(bar, total=c.total or None, completed=c.completed + c.failed,
                                failed=c.failed, description=batch.status)
            if batch.status in _TERMINAL:
                break
            time.sleep(poll_s)
    show(batch)
    into.mkdir(parents=True, exist_ok=True)
    for kind, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
        if file_id:
            path = into / f"{batch.id}_{kind}.jsonl"
            path.write_bytes(client.files.content(file_id).read())
            print(f"{kind} file: {path}")
    return 0 if batch.status == "completed" else 1


def cmd_create(args: argparse.Namespace) -> int:
    client = openai_client(args)
    with Path(args.file).open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="batch")
    metadata = dict(pair.split("=", 1) for pair in args.metadata or [])
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=args.endpoint,
                                  completion_window="24h", metadata=metadata or None)
    print(f"created {batch.id} (input file {uploaded.id})")
    if args.follow:
        return follow(client, batch.id, Path(args.output_dir))
    show(batch)
    return 1 if batch.status == "failed" else 0


def cmd_list(args: argparse.Namespace) -> int:
    for batch in openai_client(args).batches.list(limit=args.limit).data:
        print(f"{batch.id}  {batch.status:<11} {batch.endpoint:<22} {_counts(batch)}  "
              f"{_when(batch.created_at)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    show(openai_client(args).batches.retrieve(args.batch))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    show(openai_client(args).batches.cancel(args.batch))
    return 0


def add_batches_commands(sub: Any) -> None:
    batches = sub.add_parser("batches", help="batches of requests").add_subparsers(
        dest="batches", required=True)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base-url", help="default: OPENAI_BASE_URL or the local stack")
        p.add_argument("--api-key", help="default: OPENAI_API_KEY or the local admin key")

    create = batches.add_parser("create", help="upload a JSONL file of requests and run it")
    create.add_argument("--file", required=True, help="JSONL: custom_id, method, url, body")
    create.add_argument("--endpoint", required=True, choices=ENDPOINTS)
    create.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    create.add_argument("--follow", action="store_true",
                        help="show progress until it ends, then download its files")
    create.add_argument("--output-dir", default=".", help="where --follow writes the files")
    client_args(create)
    create.set_defaults(func=cmd_create)
    listing = batches.add_parser("list", help="the newest batches")
    listing.add_argument("--limit", type=int, default=20)
    client_args(listing)
    listing.set_defaults(func=cmd_list)
    for name, func, text in (("show", cmd_show, "a batch's status, counts and files"),
                             ("cancel", cmd_cancel, "cancel a batch (finished lines are kept)")):
        command = batches.add_parser(name, help=text)
        command.add_argument("batch")
        client_args(command)
        command.set_defaults(func=func)
