"""Starting runs (`evals.runs`), the one way a client's, a watch's and promotion's runs start,
on SQLite and PostgreSQL: a run is checked, stored and handed over; a hand-over that is
refused leaves nothing behind; a tenant's active runs are bounded; a refusal names the field
as the API does; and which models a run may use is the rule the gateway serves by."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evals.runs import RunStarter, chat_model, parse_run
from evals.store import Evals
from llmops.catalog import Catalog
from llmops.errors import (
    BadRequestError,
    ModelNotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from llmops.files import Files
from llmops.settings import EvalsConfig, ModelConfig
from llmops.store import Database
from tenancy.tenants import Limits, Principal
from tests.evals.test_store import new_eval

CHAT = ModelConfig(name="chat", kind="chat", pools=[{"device": "cpu", "urls": ["http://x"]}])
CANDIDATE = "ft:chat:a:1"
MEMBER = Principal("key_a", "ten_a", "member", None, Limits(), Limits())
JSONL = {"data_source": {"type": "jsonl", "source": {"type": "file_content", "content": [
    {"item": {"question": "France?", "answer": "Paris"}, "sample": {"output_text": "Paris"}}]}}}


def completions(model: str) -> dict[str, Any]:
    return {"data_source": {
        "type": "completions", "model": model,
        "source": {"type": "file_content", "content": [{"item": {"question": "France?"}}]},
        "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "{{item.question}}"}]}}}


def catalog() -> Catalog:
    """The base model, and tenant ten_a's adapter while its evaluation withholds it."""
    out = Catalog([CHAT])
    out.set_adapters("chat", [CANDIDATE])
    out.owners[CANDIDATE] = "ten_a"
    out.withheld.add(CANDIDATE)
    return out


class Queue:
    def __init__(self, down: bool = False) -> None:
        self.sent: list[str] = []
        self.down = down

    async def __call__(self, run_id: str) -> None:
        if self.down:
            raise ServiceUnavailableError("The job queue is unavailable.")
        self.sent.append(run_id)


def starter(db: Database, tmp_path: Path, queue: Queue, max_active_runs: int = 4
            ) -> RunStarter:
    return RunStarter(Evals(db), Files(db, tmp_path, 1 << 20), catalog(),
                      EvalsConfig(max_active_runs=max_active_runs), queue)


async def test_a_run_is_checked_stored_and_handed_over(db: Database, tmp_path: Path) -> None:
    queue = Queue()
    runs = starter(db, tmp_path, queue)
    ev = await new_eval(runs.evals)
    run = await runs.start(MEMBER, ev, parse_run({**JSONL, "name": "mine"}))
    assert queue.sent == [run.id]
    stored = await runs.evals.get_run("ten_a", ev.id, run.id)
    assert (stored.status, stored.name, stored.key_id, stored.items_total) == (
        "queued", "mine", "key_a", 1)

    with pytest.raises(BadRequestError) as bad:  # a sample that breaks the item schema
        await runs.start(MEMBER, ev, parse_run({"data_source": {
            "type": "jsonl", "source": {"type": "file_content", "content": [
                {"item": {"question": 7}}]}}}))
    assert bad.value.param is not None and bad.value.param.startswith("data_source.source")
    assert queue.sent == [run.id]


async def test_a_refused_hand_over_leaves_no_run(db: Database, tmp_path: Path) -> None:
    runs = starter(db, tmp_path, Queue(down=True))
    ev = await new_eval(runs.evals)
    with pytest.raises(ServiceUnavailableError):
        await runs.start(MEMBER, ev, parse_run(JSONL))
    assert (await runs.evals.list_runs("ten_a", ev.id))[0] == []


async def test_a_tenants_active_runs_are_bounded(db: Database, tmp_path: Path) -> None:
    runs = starter(db, tmp_path, Queue(), max_active_runs=1)
    ev = await new_eval(runs.evals)
    await runs.start(MEMBER, ev, parse_run(JSONL))
    with pytest.raises(RateLimitError) as refused:
        await runs.start(MEMBER, ev, parse_run(JSONL))
    assert refused.value.code == "too_many_eval_runs"
    theirs = await new_eval(runs.evals, "ten_b")  # another tenant's runs are its own
    await runs.start(Principal("key_b", "ten_b", "member", None, Limits(), Limits()), theirs,
                     parse_run(JSONL))


def test_a_malformed_request_is_refused_naming_the_field() -> None:
    with pytest.raises(BadRequestError) as refused:
        parse_run({"data_source": {"type": "jsonl", "source": {"type": "bogus"}}})
    assert refused.value.param == "data_source.source.type"
    assert refused.value.message.startswith("data_source.source.type: ")


async def test_only_our_workers_acting_for_the_owner_may_evaluate_a_withheld_candidate(
        db: Database, tmp_path: Path) -> None:
    """The same rule as the gateway's: the key itself does not see its tenant's candidate
    adapter while it is judged, a worker acting for the key does (promotion evaluates it so),
    and one acting for another tenant's key does not."""
    queue = Queue()
    runs = starter(db, tmp_path, queue)
    ev = await new_eval(runs.evals)
    with pytest.raises(ModelNotFoundError) as hidden:
        await runs.start(MEMBER, ev, parse_run(completions(CANDIDATE)))
    assert hidden.value.param == "data_source.model"
    worker = Principal("key_a", "ten_a", "member", None, Limits(), Limits(), delegated=True)
    run = await runs.start(worker, ev, parse_run(completions(CANDIDATE)))
    assert queue.sent == [run.id] and run.model == CANDIDATE
    stranger = Principal("key_b", "ten_b", "member", None, Limits(), Limits(), delegated=True)
    assert not chat_model(runs.catalog, stranger, CANDIDATE)
    assert chat_model(runs.catalog, worker, CANDIDATE)  # a model grader may name it too
    allow_list = Principal("key_a", "ten_a", "member", ("other-*",), Limits(), Limits(),
                           delegated=True)
    assert not chat_model(runs.catalog, allow_list, CANDIDATE)  # the key's allow-list holds
