"""Stored responses and conversations on SQLite and PostgreSQL: tenants never see each
other's, written-later responses are read back at once, a cancelled response stays
cancelled, and appends keep their order."""

from __future__ import annotations

from typing import Any

import pytest

from conversations import Conversations, Responses, normalize_input
from llmops.store import Database
from tenancy.tenants import ConflictError, NotFoundError


def body(response_id: str, status: str = "completed", previous: str | None = None
         ) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "status": status, "output": [],
            "previous_response_id": previous}


async def test_a_response_written_later_is_read_back_at_once(db: Database) -> None:
    responses = Responses(db, ttl_days=1)
    responses.save_later("t1", "k1", body("resp_a"), normalize_input("hi"))
    responses.save_later("t1", "k1", body("resp_b", previous="resp_a"), [])
    chain = await responses.chain("t1", "resp_b", most=10)
    assert [r.id for r in chain] == ["resp_a", "resp_b"]
    with pytest.raises(NotFoundError):
        await responses.get("t2", "resp_a")  # another tenant's is missing
    with pytest.raises(ConflictError):
        await responses.chain("t1", "resp_b", most=1)
    await responses.drain()


async def test_a_cancelled_response_stays_cancelled(db: Database) -> None:
    responses = Responses(db, ttl_days=None)
    await responses.save("t1", "k1", body("resp_c", "queued"), [])
    cancelled = await responses.set_status("t1", "resp_c", "cancelled",
                                           frozenset({"queued", "in_progress"}))
    assert cancelled.status == "cancelled"
    await responses.save("t1", "k1", body("resp_c", "completed"), [])  # the worker finished
    assert (await responses.get("t1", "resp_c")).status == "cancelled"
    stopped = {**body("resp_c", "cancelled"), "output": [{"type": "message"}]}
    await responses.save("t1", "k1", stopped, [])  # the stopped answer, as far as it went
    assert (await responses.get("t1", "resp_c")).body["output"] == [{"type": "message"}]


async def test_conversation_items_keep_their_order_and_bound(db: Database) -> None:
    conversations = Conversations(db, max_items=3)
    conv = await conversations.create("t1", {"a": "b"}, normalize_input("one"))
    conversations.append_later("t1", conv.id, normalize_input("two"))
    conversations.append_later("t1", conv.id, normalize_input("three"))
    rows, more = await conversations.items("t1", conv.id)
    assert [r.item["content"][0]["text"] for r in rows] == ["one", "two", "three"]
    assert not more
    with pytest.raises(ConflictError):
        await conversations.append("t1", conv.id, normalize_input("four"))
    with pytest.raises(NotFoundError):
        await conversations.items("t2", conv.id)
    await conversations.delete("t1", conv.id)
    with pytest.raises(NotFoundError):
        await conversations.get("t1", conv.id)
