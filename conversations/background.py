"""Computing a background response on a worker: the stored request is sent to the gateway's
`POST /v1/responses` as a stream, as the key that created it (the admin key acting on its
behalf, so its limits, budget and ledger apply), under the response's own id. The worker
looks at the stored status while the answer streams; a cancelled response's stream is closed,
which stops the engine. A response whose stream ends before it did is marked failed."""

from __future__ import annotations

import logging
import time

import aiohttp
import orjson

from conversations.store import TERMINAL, Responses
from llmops.settings import Settings
from llmops.store import Database, StoredResponse
from tenancy.priority import PRIORITY_HEADER, Priority
from tenancy.tenants import ON_BEHALF_HEADER

__all__ = ["RESPONSE_ID_HEADER", "run_background"]

log = logging.getLogger(__name__)

# The id the gateway stores a background response's answer under (set by workers only).
RESPONSE_ID_HEADER = "x-llmops-response-id"
_CHECK_S = 1.0  # how often a streaming worker looks for a cancellation
# A refusal as one of the codes OpenAI's Response.error may hold.
_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}
_ENDINGS = {"completed": "completed", "incomplete": "incomplete", "failed": "failed"}


async def run_background(response_id: str, settings: Settings) -> str:
    """Compute one queued response; returns its final status."""
    db = Database(settings.database_url)
    try:
        responses = Responses(db, settings.responses.ttl_days)
        row = await responses.find(response_id)
        if row is None or row.status != "queued" or row.request is None:
            return row.status if row is not None else "missing"
        return await _stream(responses, row, settings)
    finally:
        await db.close()


async def _stream(responses: Responses, row: StoredResponse, settings: Settings) -> str:
    key = settings.bootstrap_key()
    if key is None:
        return await _fail(responses, row, "Workers need the bootstrap admin key.")
    body = {**row.request, "background": False, "stream": True} if row.request else {}
    headers = {"authorization": f"Bearer {key}", ON_BEHALF_HEADER: row.key_id,
               RESPONSE_ID_HEADER: row.id, "content-type": "application/json",
               PRIORITY_HEADER: Priority.BACKGROUND.label,  # nobody waits on it
               "x-request-id": f"{row.id}.{int(time.time())}"}
    ended: str | None = None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                    sock_read=settings.routing.read_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.post(settings.gateway_url() + "/v1/responses",
                                    data=orjson.dumps(body), headers=headers) as resp:
                if resp.status != 200:
                    return await _fail(responses, row, _message(await resp.read()),
                                       _CODES.get(resp.status, "server_error"))
                checked = time.monotonic()
                async for line in resp.content:
                    if line.startswith(b"event: response.") and \
                            (kind := line[16:].strip().decode()) in _ENDINGS:
                        ended = _ENDINGS[kind]
                    if time.monotonic() - checked >= _CHECK_S:
                        checked = time.monotonic()
                        current = await responses.find(row.id)
                        if current is None or current.status == "cancelled":
                            return "cancelled"  # leaving closes the stream: the engine stops
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("background response %s: %s", row.id, exc)
    if ended is not None:  # the gateway stores it as it has ended, right after the stream
        return ended
    final = await responses.find(row.id)
    if final is None:
        return "missing"
    if final.status not in TERMINAL:
        return await _fail(responses, final, "The response's stream ended before it did.")
    return final.status


async def _fail(responses: Responses, row: StoredResponse, message: str,
                code: str = "server_error") -> str:
    await responses.set_status(row.tenant_id, row.id, "failed",
                               frozenset({"queued", "in_progress"}),
                               error={"code": code, "message": message})
    return "failed"


def _message(payload: bytes) -> str:
    try:
        return str(orjson.loads(payload)["error"]["message"])[:500]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return payload[:300].decode(errors="replace")
