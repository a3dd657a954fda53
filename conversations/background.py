"""Computing a background response on a worker: the stored request is sent to the gateway's
`POST /v1/responses` as a stream, as the key that created it (the admin key acting on its
behalf, so its limits, budget and ledger apply), under the response's own id. Each event of
that stream is appended to the response's events (`ResponseEvents`) for clients following it
live, numbered after the two the gateway wrote when it queued the response. The worker looks
at the stored status while the answer streams; a cancelled response's stream is closed, which
stops the engine. A response whose stream ends before it did is marked failed."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from conversations.events import ENDINGS, ResponseEvents
from conversations.store import TERMINAL, Responses
from llmops.settings import Settings
from llmops.store import Database, StoredResponse
from tenancy.priority import PRIORITY_HEADER, Priority
from tenancy.tenants import ON_BEHALF_HEADER

__all__ = ["QUEUED_EVENTS", "RESPONSE_ID_HEADER", "run_background"]

log = logging.getLogger(__name__)

# The id the gateway stores a background response's answer under (set by workers only).
RESPONSE_ID_HEADER = "x-llmops-response-id"
_CHECK_S = 1.0  # how often a streaming worker looks for a cancellation
# A refusal as one of the codes OpenAI's Response.error may hold.
_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}
# The events the gateway writes when it queues a response (response.created, .queued): the
# worker's stream, whose own response.created it leaves out, is numbered after them.
QUEUED_EVENTS = 2


async def run_background(response_id: str, settings: Settings) -> str:
    """Compute one queued response; returns its final status."""
    db = Database(settings.database_url)
    redis = Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s,
                           socket_connect_timeout=settings.redis_timeout_s)
    try:
        responses = Responses(db, settings.responses.ttl_days)
        row = await responses.find(response_id)
        if row is None or row.status != "queued" or row.request is None:
            return row.status if row is not None else "missing"
        events = _Events(ResponseEvents(redis, settings.redis_prefix,
                                        settings.responses.stream_max_events,
                                        settings.responses.stream_ttl_s), row.id)
        return await _stream(responses, row, settings, events)
    finally:
        await redis.aclose()
        await db.close()


class _Events:
    """The response's events as the worker appends them: renumbered after the queued ones,
    and given up (the stored response stays the record) once Redis fails."""

    def __init__(self, events: ResponseEvents, response_id: str) -> None:
        self.events = events
        self.id = response_id
        self.next = QUEUED_EVENTS
        self._partial = b""
        self._broken = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The events completed by `data`, a piece of the gateway's stream, renumbered."""
        complete, _, self._partial = (self._partial + data).rpartition(b"\n\n")
        out: list[dict[str, Any]] = []
        for sse in complete.split(b"\n\n"):
            for line in sse.split(b"\n"):
                if not line.startswith(b"data: {"):
                    continue
                event = orjson.loads(line[6:])
                if event.get("type") != "response.created":  # announced when queued
                    out.append(self.number(event))
        return out

    def number(self, event: dict[str, Any]) -> dict[str, Any]:
        event["sequence_number"] = self.next
        self.next += 1
        return event

    async def append(self, events: list[dict[str, Any]]) -> None:
        if self._broken or not events:
            return
        try:
            await self.events.append(self.id, events)
        except (RedisError, OSError) as exc:
            self._broken = True
            log.warning("background response %s: its events are not kept: %s", self.id, exc)


async def _stream(responses: Responses, row: StoredResponse, settings: Settings,
                  events: _Events) -> str:
    key = settings.bootstrap_key()
    if key is None:
        return await _fail(responses, row, "Workers need the bootstrap admin key.", events)
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
                                       events, _CODES.get(resp.status, "server_error"))
                checked = time.monotonic()
                async for data in resp.content.iter_any():
                    new = events.feed(data)
                    await events.append(new)
                    for event in new:
                        if event["type"] in ENDINGS.values():
                            ended = event["response"]["status"]
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
        return await _fail(responses, final, "The response's stream ended before it did.",
                           events)
    return final.status


async def _fail(responses: Responses, row: StoredResponse, message: str, events: _Events,
                code: str = "server_error") -> str:
    failed = await responses.set_status(row.tenant_id, row.id, "failed",
                                        frozenset({"queued", "in_progress"}),
                                        error={"code": code, "message": message})
    if failed.status == "failed":  # not cancelled meanwhile: followers see it end
        await events.append([events.number({"type": "response.failed",
                                             "response": dict(failed.body)})])
    return failed.status


def _message(payload: bytes) -> str:
    try:
        return str(orjson.loads(payload)["error"]["message"])[:500]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return payload[:300].decode(errors="replace")
