"""Following a background response as it is computed: the stream of `POST /v1/responses` with
`background` and `stream`, and of `GET /v1/responses/{id}?stream=true[&starting_after=N]`.
Both relay the response's kept events (`ResponseEvents`: written by the gateway when it queues
the response, then by the worker as the answer streams) from after `starting_after` until the
event that ends it. A client that leaves stops its relay only, never the background work.

The stored response is looked at whenever no event came for a while: a cancelled one ends the
stream (OpenAI's stream has no event for it), one that has ended but whose last event never
came (a worker gone) gets it from the stored object, and one whose events have expired is
replayed from the stored object."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import StreamingResponse

import tenancy
from conversations import Responses
from conversations.events import ENDINGS, ResponseEvents, frame
from conversations.store import TERMINAL
from gateway.inference.sse import SSE_HEADERS
from gateway.responses.replay import replay
from llmops.store import StoredResponse

__all__ = ["LiveStreams"]

log = logging.getLogger(__name__)


class LiveStreams:
    """`idle_s`: how long a stream waits with no event from a response that has not ended
    before it closes (the client may reconnect with `starting_after`)."""

    def __init__(self, events: ResponseEvents, responses: Responses, idle_s: float) -> None:
        self.events = events
        self.responses = responses
        self.idle_s = idle_s

    async def announce(self, queued: dict[str, Any]) -> None:
        """The first events of a response just queued (the worker numbers its own after
        them); without Redis the response is still computed and stored, only not followed."""
        shown = {"response": queued}
        try:
            await self.events.append(queued["id"], [
                {"type": "response.created", "sequence_number": 0, **shown},
                {"type": "response.queued", "sequence_number": 1, **shown}])
        except (RedisError, OSError) as exc:
            log.warning("background response %s: its events are not kept: %s",
                        queued["id"], exc)

    def stream(self, request: Request, tenant_id: str, response_id: str,
               starting_after: int | None) -> StreamingResponse:
        async def stored() -> StoredResponse | None:
            try:
                return await self.responses.get(tenant_id, response_id)
            except tenancy.NotFoundError:
                return None  # deleted meanwhile

        return StreamingResponse(
            self.follow(response_id, starting_after, stored, request.is_disconnected),
            media_type="text/event-stream", headers=SSE_HEADERS)

    async def follow(self, response_id: str, starting_after: int | None,
                     stored: Callable[[], Awaitable[StoredResponse | None]],
                     left: Callable[[], Awaitable[bool]]) -> AsyncIterator[bytes]:
        first = last = -1 if starting_after is None else starting_after
        heard = time.monotonic()  # when the last event came
        while True:
            try:
                batch = await self.events.read(response_id, last)
            except (RedisError, OSError) as exc:  # the stored response still ends it
                log.warning("background response %s: events unreadable: %s", response_id, exc)
                batch = []
                await asyncio.sleep(self.events.block_s)  # as long as a read would wait
            for event in batch:
                last = event["sequence_number"]
                yield frame(event)
                if event["type"] in ENDINGS.values():
                    return
            if batch:
                heard = time.monotonic()
                continue
            if await left():
                return
            row = await stored()
            if row is None:
                return
            if row.status not in TERMINAL:
                if time.monotonic() - heard >= self.idle_s:
                    return
                continue
            try:
                kept = await self.events.last(response_id)
            except (RedisError, OSError):
                kept = None
            if kept is None:  # expired or never kept: rebuilt from the stored response
                if last == first:  # (not after live events: their numbers differ)
                    for chunk in replay(row.body, starting_after):
                        yield chunk
                return
            if kept["sequence_number"] > last:
                continue  # written since the read
            if kept["type"] in ENDINGS.values() or row.status not in ENDINGS:
                return  # everything was sent, or cancelled
            if time.monotonic() - heard >= 2 * self.events.block_s:  # its writer has stopped
                yield frame({"type": ENDINGS[row.status], "response": row.body,
                             "sequence_number": kept["sequence_number"] + 1})
                return
