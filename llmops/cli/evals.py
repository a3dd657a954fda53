"""`llmops evals ...`: list evals and their runs and show a run's counts, through the gateway's
Evals API (as any client would)."""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from llmops.cli.finetune import openai_client

__all__ = ["add_evals_commands"]


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _counts(run: Any) -> str:
    c = run.result_counts
    return f"{c.passed} passed, {c.failed} failed, {c.errored} errored of {c.total}"


def _retrieval(figures: dict[str, Any]) -> list[str]:
    """A retrieval run's figures (its `retrieval` extension), as lines."""
    recall = ", ".join(f"@{k} {v:.2f}" for k, v in figures.get("recall_at", {}).items())
    lines = [f"retrieval over {figures.get('questions', 0)} questions: recall {recall}; "
             f"MRR {float(figures.get('mrr', 0.0)):.3f}"]
    rates = [f"{label} {figures[key]:.0%}" for key, label in (
        ("cited_span_rate", "cited span"), ("answer_match_rate", "answer match"))
        if figures.get(key) is not None]
    if figures.get("search_errors"):
        rates.append(f"{figures['search_errors']} searches failed")
    if rates:
        lines.append("  " + ", ".join(rates))
    return lines


def _served_here(command: Callable[[argparse.Namespace], int]
                 ) -> Callable[[argparse.Namespace], int]:
    """The openai client warns on every Evals call since OpenAI shut its hosted Evals down; the
    gateway serves the API itself, so the warning says nothing true to a user of this CLI."""
    @functools.wraps(command)
    def quiet(args: argparse.Namespace) -> int:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", EVALS_DEPRECATION, DeprecationWarning)
            return command(args)
    return quiet


EVALS_DEPRECATION = "The Evals API is deprecated"


@_served_here
def cmd_list(args: argparse.Namespace) -> int:
    client = openai_client(args)
    print(f"{'id':38} {'created':16} {'criteria':>8}  name")
    for ev in client.evals.list(limit=100, order="desc"):
        print(f"{ev.id:38} {_when(ev.created_at):16} {len(ev.testing_criteria):>8}  {ev.name}")
    return 0


@_served_here
def cmd_runs(args: argparse.Namespace) -> int:
    client = openai_client(args)
    print(f"{'id':41} {'status':11} {'model':32} counts")
    for run in client.evals.runs.list(args.eval_id, limit=100, order="desc"):
        print(f"{run.id:41} {run.status:11} {run.model or '-':32} {_counts(run)}")
    return 0


@_served_here
def cmd_show(args: argparse.Namespace) -> int:
    client = openai_client(args)
    run = client.evals.runs.retrieve(args.run_id, eval_id=args.eval_id)
    print(f"run {run.id} of eval {run.eval_id}: {run.status}")
    print(f"model: {run.model or '(none: samples given with the data, or a search)'}")
    print(f"items: {_counts(run)}")
    if run.error and getattr(run.error, "message", None):
        print(f"error: {run.error.code}: {run.error.message}")
    figures = (run.model_extra or {}).get("retrieval")
    if isinstance(figures, dict):
        print("\n".join(_retrieval(figures)))
    for r in run.per_testing_criteria_results:
        graded = r.passed + r.failed + int(getattr(r, "errored", 0) or 0)
        share = f"{r.passed / graded:.0%}" if graded else "-"
        print(f"  {r.testing_criteria}: {r.passed} passed, {r.failed} failed ({share})")
    for u in run.per_model_usage:
        print(f"  {u.run_model_name}: {u.invocation_count} calls, {u.prompt_tokens} prompt + "
              f"{u.completion_tokens} completion tokens")
    if args.items:
        for item in client.evals.runs.output_items.list(args.run_id, eval_id=args.eval_id,
                                                        limit=100):
            verdicts = ", ".join(f"{r.name}={'pass' if r.passed else 'fail'}"
                                 for r in item.results)
            print(f"  item {item.datasource_item_id}: {item.status} ({verdicts})")
    return 0 if run.status != "failed" else 1


def add_evals_commands(sub: Any) -> None:
    evals = sub.add_parser("evals", help="evals and their runs").add_subparsers(
        dest="evals", required=True)

    def api_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base-url", help="default: OPENAI_BASE_URL or the local stack")
        p.add_argument("--api-key", help="default: OPENAI_API_KEY or the local admin key")

    listing = evals.add_parser("list", help="list evals")
    api_args(listing)
    listing.set_defaults(func=cmd_list)
    runs = evals.add_parser("runs", help="list an eval's runs with their counts")
    runs.add_argument("eval_id")
    api_args(runs)
    runs.set_defaults(func=cmd_runs)
    show = evals.add_parser("show", help="a run's counts, per criterion and per model")
    show.add_argument("eval_id")
    show.add_argument("run_id")
    show.add_argument("--items", action="store_true", help="also list the output items")
    api_args(show)
    show.set_defaults(func=cmd_show)
