"""Stored responses and conversations on SQLite and PostgreSQL: tenants never see each
other's, written-later responses are read back at once, a cancelled response stays
cancelled, appends keep their order, and an item id is held by one conversation only."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from conversations import Conversations, DuplicateItemError, Responses, normalize_input
from llmops.store import Conversation, ConversationItem, Database, StoredResponse, utcnow
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


async def test_an_item_id_the_conversation_holds_is_refused_whole(db: Database) -> None:
    conversations = Conversations(db, max_items=10)
    conv = await conversations.create("t1", {}, normalize_input("one"))
    [first] = (await conversations.items("t1", conv.id))[0]
    again = normalize_input([{"role": "user", "content": "two"},
                             {"id": first.id, "role": "user", "content": "one, again"}])
    with pytest.raises(DuplicateItemError) as err:
        await conversations.append("t1", conv.id, again)
    assert err.value.item == first.id and f"Duplicate item found with id {first.id}" in str(
        err.value)
    twice = normalize_input([{"id": "msg_twice", "role": "user", "content": "a"},
                             {"id": "msg_twice", "role": "user", "content": "b"}])
    with pytest.raises(DuplicateItemError):
        await conversations.append("t1", conv.id, twice)
    # Nothing of a refused append was kept, and the next turn is appended.
    await conversations.append("t1", conv.id, normalize_input("three"))
    rows, _ = await conversations.items("t1", conv.id)
    assert [r.item["content"][0]["text"] for r in rows] == ["one", "three"]


async def test_an_item_id_another_conversation_holds_gets_a_fresh_one(db: Database) -> None:
    conversations = Conversations(db, max_items=10)
    theirs = await conversations.create(
        "t2", {}, normalize_input([{"id": "msg_shared", "role": "user", "content": "theirs"}]))
    mine = await conversations.create("t1", {}, [])
    sent = normalize_input([{"id": "msg_shared", "role": "user", "content": "mine"},
                            {"id": "msg_mine", "role": "user", "content": "mine too"}])
    added = await conversations.append("t1", mine.id, sent)
    assert added[0].id != "msg_shared" and added[0].id.startswith("msg_")
    assert added[0].item["id"] == added[0].id and added[1].id == "msg_mine"
    rows, _ = await conversations.items("t1", mine.id)
    assert [(r.id, r.item["content"][0]["text"]) for r in rows] == [
        (added[0].id, "mine"), ("msg_mine", "mine too")]
    kept = await conversations.item("t2", theirs.id, "msg_shared")
    assert kept.item["content"][0]["text"] == "theirs"
    with pytest.raises(NotFoundError):
        await conversations.item("t1", mine.id, "msg_shared")
    # The same id twice across conversations still refuses a repeat within one.
    with pytest.raises(DuplicateItemError):
        await conversations.append("t1", mine.id, normalize_input(
            [{"id": added[0].id, "role": "user", "content": "again"}]))


async def test_a_deleted_tenants_responses_and_conversations_go(db: Database) -> None:
    responses, conversations = Responses(db, ttl_days=None), Conversations(db, max_items=10)
    responses.save_later("t1", "k1", body("resp_pending"), [])  # not written yet
    await responses.save("t1", "k1", body("resp_bg", "in_progress"), [], {"model": "m"})
    assert await responses.stop_tenant("t1") == 1  # a background one: cancelled
    assert (await responses.get("t1", "resp_bg")).status == "cancelled"
    await responses.save("t2", "k2", body("resp_kept"), [])
    conv = await conversations.create("t1", {}, normalize_input("one"))
    conversations.append_later("t1", conv.id, normalize_input("two"))
    kept = await conversations.create("t2", {}, normalize_input("mine"))
    assert await responses.forget_tenant("t1") == 2  # the pending write is done, then gone
    assert await conversations.forget_tenant("t1") == 1
    for response_id in ("resp_pending", "resp_bg"):
        with pytest.raises(NotFoundError):
            await responses.get("t1", response_id)
    with pytest.raises(NotFoundError):
        await conversations.get("t1", conv.id)
    async with db.session() as session:
        left = set(await session.scalars(select(ConversationItem.conversation_id)))
    assert left == {kept.id}
    assert (await responses.get("t2", "resp_kept")).id == "resp_kept"
    assert await responses.forget_tenant("t1") == 0 and await conversations.forget_tenant(
        "t1") == 0


async def test_retention_expires_responses_but_not_conversations(db: Database) -> None:
    """A response older than `responses.ttl_days` is missing at once and purged by the
    gateway's chore; a conversation has no retention: it lives until it (or its tenant) is
    deleted."""
    responses, conversations = Responses(db, ttl_days=30), Conversations(db, max_items=10)
    await responses.save("t1", "k1", body("resp_old"), [])
    await responses.save("t1", "k1", body("resp_new"), [])
    conv = await conversations.create("t1", {}, normalize_input("one"))
    long_ago = utcnow() - timedelta(days=31)
    async with db.session() as session:  # made 31 days ago, with the expiry saving set then
        await session.execute(update(StoredResponse).where(StoredResponse.id == "resp_old")
                              .values(created_at=long_ago,
                                      expires_at=long_ago + timedelta(days=30)))
        await session.execute(update(Conversation).where(Conversation.id == conv.id)
                              .values(created_at=long_ago))
        await session.commit()
    with pytest.raises(NotFoundError):
        await responses.get("t1", "resp_old")  # expired: missing before any purge
    assert await responses.purge_expired() == 1
    assert await responses.find("resp_old") is None
    assert (await responses.get("t1", "resp_new")).id == "resp_new"
    assert await responses.purge_expired() == 0
    assert (await conversations.get("t1", conv.id)).id == conv.id
    assert [r.item["content"][0]["text"] for r in (await conversations.items("t1", conv.id))[0]
            ] == ["one"]
