"""A background response's stream events, kept while it is computed so that clients can follow
it live and resume from any `sequence_number`: each event is an entry of a bounded Redis
stream keyed by the response id, whose entry id is `1-<sequence_number>` (so reading after an
entry is reading after a sequence number). The gateway writes the first events when it queues
the response, the worker the rest as its answer streams; the stored Response object stays the
record, and the events expire `ttl_s` after the last one."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

__all__ = ["ENDINGS", "ResponseEvents", "frame"]

# A response's final status -> the event that ends its stream. OpenAI's stream events have
# none for a cancellation (`response.cancelled` is a webhook event): that stream just ends.
ENDINGS = {"completed": "response.completed", "incomplete": "response.incomplete",
           "failed": "response.failed"}
_FIELD = b"e"
_READ_COUNT = 512  # events per read: a slow reader catches up in bounded steps


def frame(event: dict[str, Any]) -> bytes:
    """One event as a server-sent event frame."""
    return (b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event)
            + b"\n\n")


class ResponseEvents:
    """The Redis streams of background responses' events. `redis` must allow reads that block
    for `block_s` (its socket timeout longer than that)."""

    def __init__(self, redis: Redis, prefix: str, max_events: int, ttl_s: int,
                 block_s: float = 1.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_events = max_events
        self.ttl_s = ttl_s
        self.block_s = block_s

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}:response-events:{response_id}"

    async def append(self, response_id: str, events: list[dict[str, Any]]) -> None:
        """Add events (each with its `sequence_number`, increasing) in one round trip."""
        if not events:
            return
        key = self._key(response_id)
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(key, {_FIELD: orjson.dumps(event)}, id=f"1-{event['sequence_number']}",
                      maxlen=self.max_events, approximate=True)
        pipe.expire(key, self.ttl_s)
        await pipe.execute()

    async def read(self, response_id: str, after: int | None, *, wait: bool = True
                   ) -> list[dict[str, Any]]:
        """The events after sequence number `after` (all: None); with `wait`, waiting up to
        `block_s` for the first one."""
        start = "0-0" if after is None or after < 0 else f"1-{after}"
        block = int(self.block_s * 1000) if wait else None
        streams: Any = await self.redis.xread({self._key(response_id): start},
                                              count=_READ_COUNT, block=block)
        return [orjson.loads(fields[_FIELD]) for _, entries in streams or []
                for _, fields in entries]

    async def last(self, response_id: str) -> dict[str, Any] | None:
        """The latest event kept (None: none, or they have expired)."""
        entries: Any = await self.redis.xrevrange(self._key(response_id), count=1)
        return orjson.loads(entries[0][1][_FIELD]) if entries else None
