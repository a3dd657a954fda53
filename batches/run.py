"""One batch, from claim to its output files: read its input file, send the lines not sent
yet through the gateway (a few at a time, `batches.concurrency`), keep each answer, and write
the answers to an output file (successes) and an error file (failures) of purpose
`batch_output`, in OpenAI's line format
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.

Resumable: a batch whose worker died is claimed by another one, which skips the lines
answered, reports those sent but unanswered as interrupted (never sending a line twice) and
goes on. Cancellable and bounded in time: the lease's heartbeat learns of a cancel, and of the
batch's expiry (`expires_at`), and stops the lines in flight; what was answered is written
out, and the batch ends `cancelled` or `expired`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from batches.client import GatewaySender
from batches.store import Answer, Batches, expired
from batches.validation import BatchLine, parse_lines
from llmops.files import BATCH_OUTPUT, Files
from llmops.settings import BatchesConfig, Settings
from llmops.store import Batch, BatchRequest, Database
from tenancy.tenants import NotFoundError

__all__ = ["BatchOutcome", "Send", "SenderFactory", "execute_batch", "output_line",
           "run_batch"]

log = logging.getLogger(__name__)

BatchOutcome = str  # completed | failed | cancelled | expired | lease lost | deleted | not claimed
Send = Callable[[BatchLine], Awaitable[tuple[Answer, str]]]
SenderFactory = Callable[[Batch, aiohttp.ClientSession], Send]

_INTERRUPTED = ("batch_interrupted", "The worker running this request stopped before its "
                "answer was kept; it was not sent again, so that it cannot run twice.")
_STOPPED = {"cancelled": ("batch_cancelled", "The batch was cancelled while this request "
                          "was in flight."),
            "expired": ("batch_expired", "The batch expired while this request was in "
                        "flight.")}
_PAGE = 1000


class _Failed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def run_batch(batch_id: str, settings: Settings) -> BatchOutcome:
    """Run or resume a batch if no other worker holds it; returns what became of it."""
    db = Database(settings.database_url)
    try:
        return await execute_batch(batch_id, Batches(db),
                                   Files(db, settings.files.root, settings.files.max_bytes),
                                   settings.batches, gateway_sender(settings))
    finally:
        await db.close()


def gateway_sender(settings: Settings) -> SenderFactory:
    """Lines go through the gateway, as the key that created the batch."""
    key = settings.bootstrap_key()
    base = settings.gateway_url()
    attempts = settings.batches.attempts

    def make(batch: Batch, session: aiohttp.ClientSession) -> Send:
        if key is None:
            raise _Failed("server_error", "Workers need the bootstrap admin key to call the "
                          "gateway (admin_key or admin_key_file).")
        return GatewaySender(session, base, key, batch.key_id, batch.endpoint, batch.id,
                             attempts=attempts)
    return make


async def execute_batch(batch_id: str, batches: Batches, files: Files, config: BatchesConfig,
                        sender: SenderFactory) -> BatchOutcome:
    """Claim the batch and take it as far as it goes."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    batch = await batches.claim(batch_id, owner, config.lease_s)
    if batch is None:
        return "not claimed"
    try:
        return await _Run(batch, owner, batches, files, config, sender).execute()
    except _Failed as exc:
        await _fail(batches, batch_id, owner, exc.code, exc.message)
        return "failed"
    except Exception as exc:  # the batch fails; the worker lives on
        log.exception("batch %s failed", batch_id)
        await _fail(batches, batch_id, owner, "server_error", f"The batch failed: {exc}")
        return "failed"


async def _fail(batches: Batches, batch_id: str, owner: str, code: str, message: str) -> None:
    await batches.enter(batch_id, owner, "failed", errors=[
        {"code": code, "message": message[:1000], "param": None, "line": None}])


def output_line(request: BatchRequest) -> bytes:
    """One line of an output or error file, in OpenAI's format."""
    response = None if request.status_code is None else {
        "status_code": request.status_code, "request_id": request.request_id,
        "body": request.body}
    return orjson.dumps({"id": request.id, "custom_id": request.custom_id,
                         "response": response, "error": request.error}) + b"\n"


def _file_id(batch_id: str, kind: str) -> str:
    """The same id at every try of a batch's finish: a retried write replaces its own."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


class _Run:
    def __init__(self, batch: Batch, owner: str, batches: Batches, files: Files,
                 config: BatchesConfig, sender: SenderFactory) -> None:
        self.batch, self.owner, self.batches, self.files = batch, owner, batches, files
        self.config = config
        self.sender = sender
        self.stop = asyncio.Event()

    async def execute(self) -> BatchOutcome:
        batch = self.batch
        lines = await self._lines()
        if batch.status == "validating":
            await self.batches.enter(batch.id, self.owner, "in_progress")
        if batch.status in ("validating", "in_progress") and not expired(batch):
            resumed = await self.batches.interrupt(batch.id, self.owner, *_INTERRUPTED)
            sent = await self.batches.sent(batch.id)
            pending = [line for line in lines if line.custom_id not in sent]
            if sent:
                log.info("batch %s resumes: %d of %d lines were sent (%d interrupted)",
                         batch.id, len(sent), len(lines), resumed)
            await self._send_all(pending)
        return await self._finish(lines)

    async def _lines(self) -> list[BatchLine]:
        try:
            stored = await self.files.get(self.batch.tenant_id, self.batch.input_file_id)
        except NotFoundError:
            raise _Failed("invalid_file", f"The input file {self.batch.input_file_id} was "
                          "deleted.") from None
        data = await asyncio.to_thread(self.files.path(stored).read_bytes)
        return await asyncio.to_thread(parse_lines, data, self.batch.endpoint)

    async def _heartbeat(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.config.heartbeat_s)
            if expired(self.batch) or not await self.batches.heartbeat(
                    self.batch.id, self.owner, self.config.lease_s):
                self.stop.set()

    async def _send_all(self, pending: list[BatchLine]) -> None:
        if not pending:
            return
        queue: asyncio.Queue[BatchLine] = asyncio.Queue()
        for line in pending:
            queue.put_nowait(line)
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            send = self.sender(self.batch, session)

            async def worker() -> None:
                while not queue.empty() and not self.stop.is_set():
                    line = queue.get_nowait()
                    row_id = await self.batches.start(self.batch.id, self.owner,
                                                      line.custom_id, line.line,
                                                      f"{self.batch.id}.{line.line}")
                    if row_id is None:
                        if not await self.batches.heartbeat(self.batch.id, self.owner,
                                                            self.config.lease_s):
                            self.stop.set()  # the lease is gone: another worker or a cancel
                        continue  # else the line was sent before
                    answer, request_id = await send(line)
                    if not await self.batches.finish(self.batch.id, self.owner, row_id,
                                                     request_id, answer):
                        self.stop.set()
                        return

            workers = {asyncio.create_task(worker())
                       for _ in range(min(self.config.concurrency, len(pending)))}
            beating = asyncio.create_task(self._heartbeat())
            stopping = asyncio.create_task(self.stop.wait())
            try:
                running = set(workers)
                while running:
                    done, _ = await asyncio.wait(running | {stopping},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if stopping in done:
                        break  # cancelled, expired or the lease lost: lines in flight dropped
                    for task in done:
                        task.result()  # a worker's unexpected error fails the batch
                    running -= done
            finally:
                tasks: list[asyncio.Task[Any]] = [*workers, beating, stopping]
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*tasks, return_exceptions=True)

    async def _finish(self, lines: list[BatchLine]) -> BatchOutcome:
        current = await self.batches.batch(self.batch.id)
        if current is None:
            return "deleted"
        if current.lease_owner != self.owner:
            return "lease lost"  # another worker holds the batch now
        if current.cancel_requested:
            outcome = "cancelled"
        elif expired(current):
            outcome = "expired"
        else:
            outcome = "completed"
            await self.batches.enter(current.id, self.owner, "finalizing")
        code, message = _STOPPED.get(outcome, _INTERRUPTED)
        await self.batches.interrupt(current.id, self.owner, code, message)
        current = await self.batches.batch(current.id)
        assert current is not None
        unsent: list[BatchLine] = []
        if outcome == "expired":  # OpenAI's way: what never ran is listed as expired
            sent = await self.batches.sent(current.id)
            unsent = [line for line in lines if line.custom_id not in sent]
        output = await self._write(current, "output", ok=True) if current.completed else None
        errors = (await self._write(current, "error", ok=False, unsent=unsent)
                  if current.failed or unsent else None)
        await self.batches.enter(current.id, self.owner, outcome, output_file_id=output,
                                 error_file_id=errors)
        return outcome

    async def _write(self, batch: Batch, kind: str, *, ok: bool,
                     unsent: list[BatchLine] | None = None) -> str:
        """Write the answered (`ok`) or failed lines to a file of the batch's tenant."""
        file_id = _file_id(batch.id, kind)
        with contextlib.suppress(NotFoundError):  # an earlier try's partial write
            await self.files.delete(batch.tenant_id, file_id)

        async def chunks() -> AsyncIterator[bytes]:
            after = 0
            while page := await self.batches.requests(batch.id, after_line=after,
                                                      limit=_PAGE):
                yield b"".join(output_line(r) for r in page
                               if (r.status_code == 200) == ok)
                after = page[-1].line
            for line in unsent or ():
                yield _expired_line(line)

        row = await self.files.create(batch.tenant_id, f"{batch.id}_{kind}.jsonl",
                                      BATCH_OUTPUT, chunks(), file_id=file_id,
                                      max_bytes=self.config.max_output_bytes)
        return row.id


def _expired_line(line: BatchLine) -> bytes:
    error: dict[str, Any] = {"code": "batch_expired", "message": "This line was not executed "
                             "because the batch expired."}
    return orjson.dumps({"id": f"batch_req_expired_{line.line}", "custom_id": line.custom_id,
                         "response": None, "error": error}) + b"\n"
