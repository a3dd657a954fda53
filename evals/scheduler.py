"""How regression watches' runs start: as any run does (`evals.runs.RunStarter`: the data read
and checked, the tenant's active-run limit, the `eval` queue), made as the watch's key, as our
eval workers act for it (`tenancy.auth.acting_for`); a revoked or expired key starts nothing.

The scheduler is a gateway chore: every `eval_watches.poll_s` it notes runs that completed
(`EvalWatches.observe`), claims the due watches (one gateway of several gets each) and starts
a run for each, unless the watch's previous run is still queued or in progress: that round is
skipped, and the watch says so. A run that could not be started leaves its reason on the
watch (`last_error`) until one starts.
"""

from __future__ import annotations

import asyncio
import logging

from evals.runs import RunIn, RunStarter, parse_run
from evals.watches import EvalWatches
from llmops.errors import APIError, AuthenticationError, NotFoundError
from llmops.store import Eval, EvalRun, EvalWatch, utcnow
from tenancy import tenants
from tenancy.auth import acting_for
from tenancy.tenants import Principal, Tenancy

__all__ = ["WatchScheduler", "start_watch_run"]

log = logging.getLogger(__name__)


def _run_request(watch: EvalWatch) -> RunIn:
    """The watch's run, as a client would ask for it; metadata names the watch."""
    return parse_run({"name": f"watch {watch.name}",
                      "metadata": {"eval_watch_id": watch.id, "eval_watch": watch.name},
                      "data_source": {**watch.data_source, "type": "completions",
                                      "model": watch.model}})


async def start_watch_run(starter: RunStarter, who: Principal, ev: Eval, watch: EvalWatch
                          ) -> EvalRun:
    """Start the watch's run as `who`. A refusal is the run's, but for the model: a watch's
    `model` is its own field, not its data source's."""
    try:
        return await starter.start(who, ev, _run_request(watch))
    except APIError as exc:
        if exc.param == "data_source.model":
            exc.param = "model"
        raise


class WatchScheduler:
    def __init__(self, watches: EvalWatches, starter: RunStarter, tenancy: Tenancy,
                 timeout_s: float, batch: int = 20) -> None:
        self.watches = watches
        self.starter = starter
        self.tenancy = tenancy
        self.timeout_s = timeout_s  # the longest one start may take (its data read, checked)
        self.batch = batch  # watches started per round, at most: a backlog spreads out

    async def tick(self) -> None:
        await self.watches.observe()
        for watch in await self.watches.claim_due(utcnow(), self.batch):
            await self.start(watch)

    async def start(self, watch: EvalWatch) -> str:
        """Start the claimed watch's run; returns started, skipped, disabled or not started."""
        active = await self.watches.active_run(watch)
        if active is not None:
            await self.watches.skipped(watch.id, f"The previous run {active.id} was still "
                                       f"{active.status} when the next one was due.")
            return "skipped"
        # The previous run is over: note it before the new one replaces it, and start none
        # if the watch was disabled (or deleted) since it was claimed.
        await self.watches.observe(watch.id)
        if not await self.watches.enabled(watch.id):
            return "disabled"
        code: str | None
        try:
            async with asyncio.timeout(self.timeout_s):
                run = await self._start(watch)
        except TimeoutError:
            code, message = "timeout", f"Starting the run took longer than {self.timeout_s:g} s."
        except APIError as exc:
            code, message = exc.code, exc.message
        except Exception:  # one watch's failure must not cost the others their round
            log.exception("eval watch %s: starting its run failed", watch.id)
            code, message = "server_error", "The run could not be started (a server error)."
        else:
            await self.watches.started(watch.id, run.id)
            return "started"
        log.warning("eval watch %s: run not started (%s)", watch.id, code)
        await self.watches.not_started(watch.id, code, message)
        return "not started"

    async def _start(self, watch: EvalWatch) -> EvalRun:
        who = await acting_for(self.tenancy, watch.key_id)
        if who is None:
            raise AuthenticationError("The watch's key is unknown, revoked or expired, or its "
                                      "tenant is disabled.")
        try:
            ev = await self.starter.evals.get(watch.tenant_id, watch.eval_id)
        except tenants.NotFoundError as exc:  # deleted since it was claimed
            raise NotFoundError(str(exc), param="eval_id") from None
        return await start_watch_run(self.starter, who, ev, watch)
