"""One eval run, from claim to result: load the eval's graders and the run's items, sample the
evaluated model for each item (`completions` runs) or take the sample given with it (`jsonl`
runs), grade it with every testing criterion, and store it with the run's tallies. A
`vector_store_search` run searches a vector store for each item instead, and grades what it
found (`evals.retrieval.items`).

Resumable: items already stored are skipped, so a run whose worker died resumes on another
worker where it stopped. Cancellable: the lease's heartbeat learns of a cancel (or of a lost
lease) and stops the items in flight. Items are graded a few at a time, and all the run's
model calls share one concurrency bound (`evals.concurrency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, Literal

import aiohttp

from evals.client import GatewayTransport, ItemClient, ModelCallError
from evals.data import (
    DataError,
    Row,
    given_sample,
    grading_sample,
    item_reference_messages,
    parse_jsonl,
    parse_message_templates,
    render_messages,
    rows_from_content,
    sampling_params,
    wire_sample,
)
from evals.graders import (
    Grader,
    GraderError,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    grade,
    parse_criteria,
)
from evals.retrieval.items import retrieval_item
from evals.retrieval.source import VECTOR_STORE_SEARCH
from evals.runs import Enqueue
from evals.store import Evals, ItemOutcome
from llmops.files import Files
from llmops.settings import Settings
from llmops.store import Database, Eval, EvalRun, utcnow
from tenancy.tenants import NotFoundError

__all__ = ["RunOutcome", "execute_run", "in_process", "run_eval"]

log = logging.getLogger(__name__)

RunOutcome = str  # completed | failed | canceled | lease lost | deleted | not claimed
TransportFactory = Callable[[EvalRun, aiohttp.ClientSession], GatewayTransport]


class _RunFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def run_eval(run_id: str, settings: Settings) -> RunOutcome:
    """Run or resume a run if no other worker holds it; returns what became of it."""
    db = Database(settings.database_url)
    try:
        return await execute_run(run_id, Evals(db),
                                 Files(db, settings.files.root, settings.files.max_bytes),
                                 settings)
    finally:
        await db.close()


def gateway_transport(settings: Settings) -> TransportFactory:
    """Calls through the gateway, as the key that created the run."""
    key = settings.bootstrap_key()
    if key is None:
        raise _RunFailed("server_error", "Workers need the bootstrap admin key to call the "
                         "gateway (admin_key or admin_key_file).")
    embedding = settings.embedding_model()

    def make(run: EvalRun, session: aiohttp.ClientSession) -> GatewayTransport:
        return GatewayTransport(session, settings.gateway_url(), key, run.key_id,
                                concurrency=settings.evals.concurrency,
                                attempts=settings.evals.attempts,
                                embedding_model=embedding.name if embedding else None,
                                request_prefix=run.id)
    return make


def in_process(evals: Evals, files: Files, settings: Settings,
               transport: TransportFactory | None = None) -> Enqueue:
    """An `enqueue` for `evals.runs.RunStarter` that takes the run here and now instead of
    queuing it, for a worker that needs the verdict before it goes on (fine-tune promotion).
    If this worker dies, the gateway queues the run on the `eval` queue, where it resumes."""
    async def run_here(run_id: str) -> None:
        await execute_run(run_id, evals, files, settings, transport)
    return run_here


async def execute_run(run_id: str, evals: Evals, files: Files, settings: Settings,
                      transport: TransportFactory | None = None) -> RunOutcome:
    """Claim the run and take it as far as it goes; `transport` replaces the gateway (for
    tests of the run logic alone)."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    run = await evals.claim(run_id, owner, settings.evals.lease_s)
    if run is None:
        return "not claimed"
    try:
        make = transport or gateway_transport(settings)
        return await _Runner(run, owner, evals, files, settings, make).execute()
    except _RunFailed as exc:
        await _fail(evals, run_id, owner, exc.code, exc.message)
        return "failed"
    except Exception as exc:  # the run fails; the worker lives on
        log.exception("eval run %s failed", run_id)
        await _fail(evals, run_id, owner, "server_error", f"The run failed: {exc}")
        return "failed"


async def _fail(evals: Evals, run_id: str, owner: str, code: str, message: str) -> None:
    await evals.update_run(run_id, owner, status="failed",
                           error={"code": code, "message": message[:1000]})


class _Runner:
    def __init__(self, run: EvalRun, owner: str, evals: Evals, files: Files,
                 settings: Settings, make: TransportFactory) -> None:
        self.run, self.owner, self.evals, self.files = run, owner, evals, files
        self.config = settings.evals
        self.make = make
        self.stop = asyncio.Event()

    async def execute(self) -> RunOutcome:
        run = self.run
        try:
            ev = await self.evals.get(run.tenant_id, run.eval_id)
        except NotFoundError:
            return "deleted"
        schema = ev.data_source_config.get("item_schema")
        try:
            graders = parse_criteria(ev.testing_criteria, schema)
        except GraderError as exc:
            raise _RunFailed("invalid_eval", f"The eval's testing criteria: {exc}") from None
        rows = await self._rows(schema)
        done = await self.evals.done_items(run.id)
        await self.evals.update_run(run.id, self.owner, status="in_progress",
                                    started_at=run.started_at or utcnow(),
                                    items_total=len(rows))
        pending = [(i, row) for i, row in enumerate(rows) if i not in done]
        if done:
            log.info("eval run %s resumes: %d of %d items were done", run.id, len(done),
                     len(rows))
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            transport = self.make(run, session)
            beating = asyncio.create_task(self._heartbeat())
            try:
                await self._grade_all(pending, graders, transport, ev)
            finally:
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beating
        if transport.fatal is not None:
            raise _RunFailed(transport.fatal.code, transport.fatal.message)
        if self.stop.is_set():
            return await self._stopped()
        await self.evals.update_run(run.id, self.owner, status="completed")
        return "completed"

    async def _stopped(self) -> RunOutcome:
        current = await self.evals.run(self.run.id)
        if current is None:
            return "deleted"
        if current.cancel_requested and current.lease_owner == self.owner:
            await self.evals.update_run(self.run.id, self.owner, status="canceled")
            return "canceled"
        return "lease lost"  # another worker holds the run now

    async def _rows(self, schema: dict[str, Any] | None) -> list[Row]:
        source = self.run.data_source["source"]
        try:
            if source["type"] == "file_content":
                return rows_from_content(source["content"], self.config.max_items)
            try:
                stored = await self.files.get(self.run.tenant_id, source["id"])
            except NotFoundError:
                raise _RunFailed("invalid_file", f"The data file {source['id']} was "
                                 "deleted.") from None
            data = await asyncio.to_thread(self.files.path(stored).read_bytes)
            return parse_jsonl(data, self.config.max_items)
        except DataError as exc:
            raise _RunFailed("invalid_file", exc.message) from None

    async def _heartbeat(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.config.heartbeat_s)
            if not await self.evals.heartbeat(self.run.id, self.owner, self.config.lease_s):
                self.stop.set()

    async def _grade_all(self, pending: list[tuple[int, Row]], graders: list[Grader],
                         transport: GatewayTransport, ev: Eval) -> None:
        queue: asyncio.Queue[tuple[int, Row]] = asyncio.Queue()
        for entry in pending:
            queue.put_nowait(entry)
        sampler = self._sampler(ev)

        async def worker() -> None:
            while not queue.empty() and transport.fatal is None:
                index, row = queue.get_nowait()
                outcome = await self._item(index, row, graders, transport, sampler)
                if transport.fatal is not None:
                    return  # the run fails: what this item saw is not its own verdict
                if not await self.evals.record(self.run.id, self.owner, outcome):
                    self.stop.set()  # the lease is gone: another worker or a cancel
                    return

        workers = {asyncio.create_task(worker())
                   for _ in range(min(self.config.concurrency, max(len(pending), 1)))}
        stopping = asyncio.create_task(self.stop.wait())
        try:
            running = set(workers)
            while running:
                done, _ = await asyncio.wait(running | {stopping},
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    break  # canceled, deleted or the lease lost: items in flight are dropped
                for task in done:
                    task.result()  # a worker's unexpected error fails the run
                running -= done
        finally:
            stopping.cancel()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, stopping, return_exceptions=True)

    def _sampler(self, ev: Eval) -> Any:
        """How an item's messages are made: None for jsonl runs (the sample comes with the
        data), else a function of the item."""
        ds = self.run.data_source
        if ds["type"] != "completions":
            return None
        messages = ds["input_messages"]
        if messages["type"] == "item_reference":
            ref = messages["item_reference"]
            return lambda item: item_reference_messages(ref, item)
        templates = parse_message_templates(messages["template"],
                                            ev.data_source_config.get("item_schema"))
        return lambda item: render_messages(templates, item)

    async def _item(self, index: int, row: Row, graders: list[Grader],
                    transport: GatewayTransport, sampler: Any) -> ItemOutcome:
        client = ItemClient(transport, f"{index}")
        ds = self.run.data_source
        if ds["type"] == VECTOR_STORE_SEARCH:
            return await self._retrieval_item(index, row, graders, client)
        if sampler is None:
            given = row.sample or {}
            sample = given_sample(row.sample)
            inputs = given.get("input")
            wire = wire_sample(inputs if isinstance(inputs, list) else [],
                               sample.get("output_text", ""),
                               str(given.get("model", "")),
                               str(given.get("finish_reason", "")), {}, None, {})
        else:
            params = sampling_params(ds.get("sampling_params"))
            messages: list[dict[str, str]] = []
            try:
                messages = sampler(row.item)
                answer = await client.complete(self.run.model, messages, **params)
            except (DataError, ModelCallError) as exc:
                code = exc.code if isinstance(exc, ModelCallError) else "invalid_item"
                error = {"code": code, "message": str(exc)[:1000]}
                wire = wire_sample(messages, "", self.run.model, "", {}, error, params)
                return ItemOutcome(index, row.item, wire, [], "error", client.usage)
            sample = grading_sample(answer.text, answer.tool_calls, answer.choices)
            wire = wire_sample(messages, answer.text, self.run.model, answer.finish_reason,
                               answer.usage, None, params)
        results = await _grade(graders, row.item, sample, client)
        status: Literal["pass", "fail", "error"] = (
            "error" if any(r["error"] for r in results)
            else "pass" if all(r["passed"] for r in results) else "fail")
        return ItemOutcome(index, row.item, wire, results, status, client.usage)

    async def _retrieval_item(self, index: int, row: Row, graders: list[Grader],
                              client: ItemClient) -> ItemOutcome:
        """Search (and ask, with `rag`), score the retrieval, and grade the RAG answer with
        the eval's criteria: the item passes when both pass (`evals.retrieval.items`)."""
        found = await retrieval_item(row.item, self.run.data_source, client)
        graded: list[dict[str, Any]] = []
        if found.answer is not None:  # without `rag` there is no answer to grade
            answer = found.answer
            graded = await _grade(graders, row.item, grading_sample(
                answer.text, answer.tool_calls, answer.choices), client)
        status: Literal["pass", "fail", "error"] = (
            "error" if found.errored or any(r["error"] for r in graded)
            else "pass" if found.passed and all(r["passed"] for r in graded) else "fail")
        return ItemOutcome(index, row.item, found.sample, graded + found.results, status,
                           client.usage)


async def _grade(graders: list[Grader], item: dict[str, Any], sample: dict[str, Any],
                 client: ItemClient) -> list[dict[str, Any]]:
    """Every testing criterion's result for one sample, as output items hold them."""
    grades = await asyncio.gather(*(grade(g, item, sample, client) for g in graders))
    return [{"name": g.name, "type": _grader_type(grader),
             "passed": g.passed and g.error is None,
             "score": g.score if g.score is not None else 0.0,
             "sample": None, "error": g.error, "detail": g.detail}
            for g, grader in zip(grades, graders, strict=True)]


def _grader_type(grader: Grader) -> str:
    """OpenAI's `type` of a grader."""
    if isinstance(grader, StringCheckGrader):
        return "string_check"
    if isinstance(grader, TextSimilarityGrader):
        return "text_similarity"
    return "score_model" if isinstance(grader, ScoreModelGrader) else "label_model"
