"""How regression watches' runs start: through the gateway's own `POST /v1/evals/{id}/runs`,
called in process, so that a scheduled run is checked, limited and queued exactly as one a
client asks for (the data read and checked, the tenant's active-run limit, the `eval` queue).
A scheduled run is made as the watch's key: the bootstrap admin key acting for it
(`x-llmops-on-behalf-of`), as our eval workers call models; a revoked key starts nothing.

The scheduler is a gateway chore: every `eval_watches.poll_s` it notes runs that completed
(`EvalWatches.observe`), claims the due watches (one gateway of several gets each) and starts
a run for each, unless the watch's previous run is still queued or in progress: that round is
skipped, and the watch says so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import httpx
from starlette.types import ASGIApp

from evals.watches import EvalWatches
from llmops.errors import APIError
from llmops.store import EvalWatch, utcnow
from tenancy.auth import BOOTSTRAP_ADMIN
from tenancy.tenants import ON_BEHALF_HEADER

__all__ = ["RunNotStarted", "RunStarter", "WatchScheduler", "run_request"]

log = logging.getLogger(__name__)

_BASE_URL = "http://gateway.internal"
_RELAYED = ("authorization", ON_BEHALF_HEADER)


class RunNotStarted(APIError):
    """The gateway refused the run: its error, relayed with its status. A watch's model is
    its own field, not its data source's."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        param = error.get("param")
        super().__init__(str(error.get("message") or f"The run was refused ({status})."),
                         param="model" if param == "data_source.model" else param,
                         code=error.get("code"), type_=error.get("type"))
        self.status = status


def run_request(watch: EvalWatch) -> dict[str, Any]:
    """The body of the watch's run, as a client would send it; metadata names the watch."""
    return {"name": f"watch {watch.name}",
            "metadata": {"eval_watch_id": watch.id, "eval_watch": watch.name},
            "data_source": {**watch.data_source, "type": "completions", "model": watch.model}}


class RunStarter:
    def __init__(self, app: ASGIApp, admin_key: str | None, timeout_s: float) -> None:
        self.app = app
        self.admin_key = admin_key
        self.timeout_s = timeout_s

    @staticmethod
    def relayed(headers: Any) -> dict[str, str]:
        """A caller's credentials, for a run made as that caller."""
        return {name: headers[name] for name in _RELAYED if name in headers}

    def acting_for(self, key_id: str) -> dict[str, str]:
        """Credentials of the bootstrap admin acting for `key_id`."""
        if self.admin_key is None:
            raise RunNotStarted(503, {"message": "Scheduled eval runs need the bootstrap "
                                      "admin key (admin_key or admin_key_file).",
                                      "type": "server_error", "code": "service_unavailable"})
        headers = {"authorization": f"Bearer {self.admin_key}"}
        if key_id != BOOTSTRAP_ADMIN.key_id:
            headers[ON_BEHALF_HEADER] = key_id
        return headers

    async def start(self, eval_id: str, body: dict[str, Any], headers: dict[str, str]
                    ) -> dict[str, Any]:
        """The created run (OpenAI's `eval.run`), or RunNotStarted with the API's error."""
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url=_BASE_URL) as client:
            try:
                async with asyncio.timeout(self.timeout_s):
                    resp = await client.post(f"/v1/evals/{quote(eval_id, safe='')}/runs",
                                             json=body, headers=headers)
            except TimeoutError:
                raise RunNotStarted(504, {"message": "Starting the run took longer than "
                                          f"{self.timeout_s:g} s.", "type": "timeout_error",
                                          "code": "timeout"}) from None
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        if resp.status_code != 200 or not isinstance(payload, dict):
            error = payload.get("error") if isinstance(payload, dict) else None
            raise RunNotStarted(resp.status_code, error if isinstance(error, dict) else {})
        return dict(payload)


class WatchScheduler:
    def __init__(self, watches: EvalWatches, starter: RunStarter, batch: int = 20) -> None:
        self.watches = watches
        self.starter = starter
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
        try:
            run = await self.starter.start(watch.eval_id, run_request(watch),
                                           self.starter.acting_for(watch.key_id))
        except RunNotStarted as exc:
            log.warning("eval watch %s: run not started (%s %s)", watch.id, exc.status,
                        exc.code)
            await self.watches.not_started(watch.id, exc.code, exc.message)
            return "not started"
        await self.watches.started(watch.id, str(run["id"]))
        return "started"
