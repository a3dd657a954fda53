"""How a batch's worker sends its lines: through the gateway's OpenAI API, with the bootstrap
admin key acting for the key that created the batch (`x-llmops-on-behalf-of`), so that each
line counts against that key's limits and budgets, passes its guardrails and lands in its
usage ledger.

A line is tried again only when the gateway cannot have served it: a refusal for now (429,
or 503, which the gateway answers before any engine saw the request: no healthy replica, its
key store or limiter unreachable) or a connection that was never made. Any other outcome, an
error answer, a broken connection or a timeout included, is the line's result: sending it
again could serve it twice.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import orjson

from batches.store import Answer
from batches.validation import BatchLine
from tenancy.priority import PRIORITY_HEADER, Priority
from tenancy.tenants import ON_BEHALF_HEADER

__all__ = ["GatewaySender"]

_MAX_WAIT_S = 30.0
_NOT_SERVED = (429, 503)


class GatewaySender:
    """Sends one batch's lines to its endpoint; each try has its own request id (the ledger
    keeps the first record of an id), `{batch_id}.{line}.{random}`, so that the ledger's
    records of a batch are found by its id."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, admin_key: str,
                 key_id: str, endpoint: str, batch_id: str, *, attempts: int) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + endpoint
        self.headers = {"authorization": f"Bearer {admin_key}",
                        "content-type": "application/json", ON_BEHALF_HEADER: key_id,
                        PRIORITY_HEADER: Priority.BATCH.label}  # after interactive callers
        self.batch_id = batch_id
        self.attempts = attempts

    async def __call__(self, line: BatchLine) -> tuple[Answer, str]:
        """The line's answer and the request id it was served under."""
        rid = ""
        for attempt in range(1, self.attempts + 1):
            rid = f"{self.batch_id}.{line.line}.{uuid.uuid4().hex[:8]}"
            wait = min(1.0 * 2 ** (attempt - 1), _MAX_WAIT_S)
            try:
                async with self.session.post(self.url, data=line.body,
                                             headers={**self.headers, "x-request-id": rid}
                                             ) as resp:
                    payload = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("retry-after", "")
            except aiohttp.ClientConnectorError:  # never connected: nothing was sent
                if attempt == self.attempts:
                    return Answer(None, None, {
                        "code": "gateway_unreachable",
                        "message": f"The gateway could not be reached in {attempt} tries."}), rid
                await asyncio.sleep(wait)
                continue
            except TimeoutError:
                return Answer(None, None, {"code": "timeout", "message": "The gateway did not "
                                           "answer in time."}), rid
            except aiohttp.ClientError as exc:
                return Answer(None, None, {"code": "request_failed",
                                           "message": f"The request failed: {exc}"[:500]}), rid
            if status in _NOT_SERVED and attempt < self.attempts:
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), _MAX_WAIT_S)
                await asyncio.sleep(wait)
                continue
            return Answer(status, _body(payload)), rid
        raise AssertionError("unreachable")


def _body(payload: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        return body
    return {"error": {"message": payload[:500].decode(errors="replace"), "type": "server_error",
                      "param": None, "code": None}}
