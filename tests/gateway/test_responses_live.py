"""Following background responses live (real Redis, real store): events relayed as they are
written, resumed after a sequence number, a cancelled response's stream ending without a
terminal event, a missing last event taken from the stored response, and expired events
replayed from it. And the worker's side: the gateway's stream renumbered after the queued
events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

import tenancy
from conversations import Responses
from conversations.background import QUEUED_EVENTS, _Events
from conversations.events import ResponseEvents, frame
from gateway.responses.answer import response_object
from gateway.responses.live import LiveStreams
from gateway.responses.protocol import ResponsesRequest
from llmops.store import Database, StoredResponse
from tests.conformance import assert_conforms


def body(response_id: str, status: str) -> dict[str, Any]:
    req = ResponsesRequest.model_validate({"model": "m", "input": "Hi", "background": True})
    return response_object(req, response_id, 1, status=status)


def delta(seq: int, text: str) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "sequence_number": seq, "item_id": "msg_1",
            "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}


@pytest.fixture
async def live(db: Database, redis: Redis, prefix: str) -> AsyncIterator[LiveStreams]:
    yield LiveStreams(ResponseEvents(redis, prefix, max_events=1000, ttl_s=60, block_s=0.2),
                      Responses(db, ttl_days=None), idle_s=5)


async def follow(live: LiveStreams, response_id: str, after: int | None = None
                 ) -> AsyncIterator[dict[str, Any]]:
    async def stored() -> StoredResponse | None:
        try:
            return await live.responses.get("t1", response_id)
        except tenancy.NotFoundError:
            return None

    async def left() -> bool:
        return False

    async for chunk in live.follow(response_id, after, stored, left):
        for sse in chunk.split(b"\n\n"):
            if sse:
                yield orjson.loads(sse.split(b"data: ", 1)[1])


async def test_events_are_relayed_as_written_and_resumed(live: LiveStreams) -> None:
    queued = body("resp_a", "queued")
    await live.responses.save("t1", "k1", queued, [])
    await live.announce(queued)
    seen: list[dict[str, Any]] = []

    async def read_all() -> None:
        async for event in follow(live, "resp_a"):
            seen.append(event)

    reader = asyncio.create_task(read_all())
    await asyncio.wait_for(_until(lambda: len(seen) == 2), 5)  # queued, nothing more yet
    assert [e["type"] for e in seen] == ["response.created", "response.queued"]
    for seq, text in enumerate(("Par", "is"), start=QUEUED_EVENTS):
        await live.events.append("resp_a", [delta(seq, text)])
        await asyncio.wait_for(_until(lambda s=seq: len(seen) == s + 1), 5)  # as they come
    done = body("resp_a", "completed")
    await live.events.append("resp_a", [{"type": "response.completed", "sequence_number": 4,
                                         "response": done}])
    await asyncio.wait_for(reader, 5)
    assert [e["sequence_number"] for e in seen] == [0, 1, 2, 3, 4]
    for event in seen:
        assert_conforms(event, "ResponseStreamEvent")
    assert [e async for e in follow(live, "resp_a", after=2)] == seen[3:]


async def test_a_cancelled_response_stream_ends_without_a_terminal_event(
        live: LiveStreams) -> None:
    await live.responses.save("t1", "k1", body("resp_c", "cancelled"), [])
    await live.events.append("resp_c", [delta(2, "Once")])
    assert [e["type"] async for e in follow(live, "resp_c")] == ["response.output_text.delta"]


async def test_a_missing_last_event_comes_from_the_stored_response(live: LiveStreams) -> None:
    done = body("resp_d", "failed")
    await live.responses.save("t1", "k1", done, [])
    await live.events.append("resp_d", [delta(2, "Once")])  # and then its worker was gone
    seen = [e async for e in follow(live, "resp_d")]
    assert [(e["type"], e["sequence_number"]) for e in seen] == [
        ("response.output_text.delta", 2), ("response.failed", 3)]
    assert seen[-1]["response"] == done


async def test_expired_events_are_replayed_from_the_stored_response(live: LiveStreams
                                                                    ) -> None:
    await live.responses.save("t1", "k1", body("resp_e", "completed"), [])
    kinds = [e["type"] async for e in follow(live, "resp_e")]
    assert kinds == ["response.created", "response.in_progress", "response.completed"]


def test_the_workers_events_are_numbered_after_the_queued_ones() -> None:
    events = _Events(ResponseEvents(Redis(), "p", 10, 60), "resp_w")
    stream = b"".join(frame(e) for e in [
        {"type": "response.created", "sequence_number": 0, "response": {}},
        {"type": "response.in_progress", "sequence_number": 1, "response": {}},
        delta(2, "Hi")])
    first, second = events.feed(stream[:70]), events.feed(stream[70:])
    assert first == []  # nothing whole yet
    assert [(e["type"], e["sequence_number"]) for e in second] == [
        ("response.in_progress", QUEUED_EVENTS), ("response.output_text.delta", 3)]


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.01)
