"""Stored responses and conversations in the SQL store. Another tenant's object is reported
exactly as a missing one.

A finished response is written after its answer has gone out (`save_later`): the caller does
not wait for the database. Reads in this process wait for that write first, so a client that
chains `previous_response_id` right after an answer always finds it."""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from conversations.items import duplicate_id, duplicate_message, item_id
from llmops.store import (
    Conversation,
    ConversationItem,
    Database,
    StoredResponse,
    aware,
    utcnow,
)
from tenancy.tenants import ConflictError, NotFoundError

__all__ = ["TERMINAL", "Conversations", "DuplicateItemError", "Responses"]

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "failed", "cancelled", "incomplete"})


class Responses:
    def __init__(self, db: Database, ttl_days: float | None, flush_s: float = 0.05) -> None:
        self.db = db
        self.ttl = timedelta(days=ttl_days) if ttl_days is not None else None
        self.flush_s = flush_s
        self._buffer: list[dict[str, Any]] = []  # rows waiting for the next batch
        self._pending: dict[str, asyncio.Future[None]] = {}  # id -> its batch's commit
        self._flusher: asyncio.Task[None] | None = None

    async def save(self, tenant_id: str, key_id: str, body: dict[str, Any],
                   input_items: list[dict[str, Any]], request: dict[str, Any] | None = None
                   ) -> None:
        """Insert the response, or update it unless it was cancelled meanwhile (a background
        response that finishes after its cancellation stays cancelled)."""
        await self._write([self._row(tenant_id, key_id, body, input_items, request)])

    def save_later(self, tenant_id: str, key_id: str, body: dict[str, Any],
                   input_items: list[dict[str, Any]]) -> None:
        """`save`, off the caller's path: finished responses are written in batches every
        `flush_s`, one transaction each; reads of a pending id in this process wait for it."""
        self._buffer.append(self._row(tenant_id, key_id, body, input_items, None))
        self._pending[body["id"]] = asyncio.get_running_loop().create_future()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._buffer:
            await asyncio.sleep(self.flush_s)
            rows, self._buffer = self._buffer, []
            try:
                await self._write(rows)
            except Exception as exc:
                log.error("could not store %d responses: %s", len(rows), exc)
            for row in rows:
                waiting = self._pending.pop(row["id"], None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)

    def _row(self, tenant_id: str, key_id: str, body: dict[str, Any],
             input_items: list[dict[str, Any]], request: dict[str, Any] | None
             ) -> dict[str, Any]:
        created = utcnow()
        return {"id": body["id"], "tenant_id": tenant_id, "key_id": key_id,
                "status": body["status"], "body": body, "input_items": input_items,
                "request": request, "created_at": created,
                "expires_at": created + self.ttl if self.ttl is not None else None}

    async def _write(self, rows: list[dict[str, Any]]) -> None:
        """Upsert `rows` in one statement; a cancelled response keeps its state (what its
        stopped answer had produced may still be written, as cancelled)."""
        insert = pg_insert if self.db.engine.dialect.name == "postgresql" else sqlite_insert
        stmt = insert(StoredResponse)
        stmt = stmt.on_conflict_do_update(
            index_elements=[StoredResponse.id],
            set_={"status": stmt.excluded.status, "body": stmt.excluded.body},
            where=(StoredResponse.status != "cancelled") | (stmt.excluded.status == "cancelled"))
        async with self.db.session() as session:
            await session.execute(stmt, rows)
            await session.commit()

    async def drain(self) -> None:
        """Every pending write done (at shutdown)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def get(self, tenant_id: str, response_id: str) -> StoredResponse:
        if (pending := self._pending.get(response_id)) is not None:
            await asyncio.shield(pending)
        async with self.db.session() as session:
            row = await session.get(StoredResponse, response_id)
        if row is None or row.tenant_id != tenant_id or self._expired(row):
            raise NotFoundError(f"Response with id '{response_id}' not found.")
        return row

    async def find(self, response_id: str) -> StoredResponse | None:
        """The response whoever owns it (for workers, which act for its owner)."""
        async with self.db.session() as session:
            return await session.get(StoredResponse, response_id)

    async def chain(self, tenant_id: str, response_id: str, most: int
                    ) -> list[StoredResponse]:
        """The response and those it continues, oldest first."""
        rows: list[StoredResponse] = []
        next_id: str | None = response_id
        while next_id is not None:
            if len(rows) == most:
                raise ConflictError(f"The chain of previous responses is longer than {most}.")
            row = await self.get(tenant_id, next_id)
            rows.append(row)
            next_id = row.body.get("previous_response_id")
        return rows[::-1]

    async def delete(self, tenant_id: str, response_id: str) -> None:
        await self.get(tenant_id, response_id)
        async with self.db.session() as session:
            await session.execute(delete(StoredResponse).where(StoredResponse.id == response_id))
            await session.commit()

    async def set_status(self, tenant_id: str, response_id: str, status: str,
                         only_from: frozenset[str], **fields: Any) -> StoredResponse:
        """Move a response to `status` if it is in one of `only_from`; the row as it is now."""
        row = await self.get(tenant_id, response_id)
        if row.status in only_from:
            body = {**row.body, "status": status, **fields}
            async with self.db.session() as session:
                await session.execute(update(StoredResponse).where(
                    StoredResponse.id == response_id,
                    StoredResponse.status.in_(only_from)).values(status=status, body=body))
                await session.commit()
        return await self.get(tenant_id, response_id)

    async def stop_tenant(self, tenant_id: str) -> int:
        """Cancel a tenant's unfinished background responses (before it is deleted): their
        workers close the stream within a second, which stops the engine. Returns how many."""
        unfinished = frozenset({"queued", "in_progress"})
        query = select(StoredResponse.id).where(StoredResponse.tenant_id == tenant_id,
                                                StoredResponse.status.in_(unfinished),
                                                StoredResponse.request.is_not(None))
        async with self.db.session() as session:
            ids = list(await session.scalars(query))
        for response_id in ids:
            await self.set_status(tenant_id, response_id, "cancelled", unfinished)
        return len(ids)

    async def forget_tenant(self, tenant_id: str) -> int:
        """Remove every response of a deleted tenant, once this process's pending writes are
        done (so none lands after); returns how many. A background response still computing
        finds its row gone and stops."""
        await self.drain()
        async with self.db.session() as session:
            gone = await session.execute(delete(StoredResponse)
                                         .where(StoredResponse.tenant_id == tenant_id))
            await session.commit()
        return int(getattr(gone, "rowcount", 0) or 0)

    async def purge_expired(self) -> int:
        async with self.db.session() as session:
            result = await session.execute(
                delete(StoredResponse).where(StoredResponse.expires_at < utcnow()))
            await session.commit()
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def _expired(row: StoredResponse) -> bool:
        return row.expires_at is not None and aware(row.expires_at) < utcnow()


class DuplicateItemError(ConflictError):
    """An item whose id its conversation already holds (or that the same request repeats)."""

    def __init__(self, item: str) -> None:
        super().__init__(duplicate_message(item))
        self.item = item


class Conversations:
    def __init__(self, db: Database, max_items: int) -> None:
        self.db = db
        self.max_items = max_items
        self._pending: dict[str, asyncio.Task[None]] = {}  # conversation id -> last append

    def append_later(self, tenant_id: str, conversation_id: str,
                     items: list[dict[str, Any]]) -> None:
        """`append` off the caller's path, after any earlier one of the same conversation;
        reads of the conversation in this process wait for it."""
        before = self._pending.get(conversation_id)

        async def write() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            await self.append(tenant_id, conversation_id, items)

        task = asyncio.get_running_loop().create_task(write())
        self._pending[conversation_id] = task
        task.add_done_callback(lambda t: self._written(conversation_id, t))

    def _written(self, conversation_id: str, task: asyncio.Task[None]) -> None:
        if self._pending.get(conversation_id) is task:
            del self._pending[conversation_id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("could not append to conversation %s: %s", conversation_id, exc)

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)

    async def create(self, tenant_id: str, metadata: dict[str, str],
                     items: list[dict[str, Any]]) -> Conversation:
        row = Conversation(id="conv_" + secrets.token_hex(24), tenant_id=tenant_id,
                           metadata_=metadata)
        async with self.db.session() as session:
            session.add(row)
            await session.flush()
            await self._add(session, row.id, 0, items)
            await session.commit()
        return row

    async def get(self, tenant_id: str, conversation_id: str, *, settled: bool = True
                  ) -> Conversation:
        """The conversation; `settled`: once this process's appends to it are written."""
        pending = self._pending.get(conversation_id) if settled else None
        if pending is not None:
            await asyncio.gather(asyncio.shield(pending), return_exceptions=True)
        async with self.db.session() as session:
            row = await session.get(Conversation, conversation_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFoundError(f"Conversation with id '{conversation_id}' not found.")
        return row

    async def update(self, tenant_id: str, conversation_id: str, metadata: dict[str, str]
                     ) -> Conversation:
        await self.get(tenant_id, conversation_id)
        async with self.db.session() as session:
            await session.execute(update(Conversation).where(
                Conversation.id == conversation_id).values(metadata_=metadata))
            await session.commit()
        return await self.get(tenant_id, conversation_id)

    async def delete(self, tenant_id: str, conversation_id: str) -> None:
        await self.get(tenant_id, conversation_id)
        async with self.db.session() as session:
            await session.execute(delete(ConversationItem).where(
                ConversationItem.conversation_id == conversation_id))
            await session.execute(delete(Conversation).where(
                Conversation.id == conversation_id))
            await session.commit()

    async def forget_tenant(self, tenant_id: str) -> int:
        """Remove every conversation of a deleted tenant with its items, once this process's
        pending appends are done; returns how many."""
        await self.drain()
        mine = select(Conversation.id).where(Conversation.tenant_id == tenant_id)
        async with self.db.session() as session:
            await session.execute(delete(ConversationItem).where(
                ConversationItem.conversation_id.in_(mine.scalar_subquery())))
            gone = await session.execute(delete(Conversation)
                                         .where(Conversation.tenant_id == tenant_id))
            await session.commit()
        return int(getattr(gone, "rowcount", 0) or 0)

    async def append(self, tenant_id: str, conversation_id: str,
                     items: list[dict[str, Any]]) -> list[ConversationItem]:
        """Append items (each with its `id`) at the end, all or none; DuplicateItemError
        when the conversation already holds one of their ids."""
        await self.get(tenant_id, conversation_id, settled=False)  # called by a pending one
        async with self.db.session() as session:
            last = await session.scalar(select(func.max(ConversationItem.position)).where(
                ConversationItem.conversation_id == conversation_id))
            start = -1 if last is None else last
            if start + 1 + len(items) > self.max_items:
                raise ConflictError(f"A conversation holds at most {self.max_items} items.")
            rows = await self._add(session, conversation_id, start + 1, items)
            await session.commit()
        return rows

    async def _add(self, session: Any, conversation_id: str, start: int,
                   items: list[dict[str, Any]]) -> list[ConversationItem]:
        """Rows for `items`. Item ids are unique across the store: an id that another
        conversation (perhaps another tenant's) holds is not the caller's to learn or block,
        so that item is stored under a fresh id."""
        ids = {item["id"] for item in items}
        found = await session.execute(
            select(ConversationItem.id, ConversationItem.conversation_id).where(
                ConversationItem.id.in_(ids)))
        taken: dict[str, str] = {row[0]: row[1] for row in found}
        held = [i for i, owner in taken.items() if owner == conversation_id]
        if (duplicate := duplicate_id(items, held)) is not None:
            raise DuplicateItemError(duplicate)
        items = [{**item, "id": item_id(item["type"])} if item["id"] in taken else item
                 for item in items]
        rows = [ConversationItem(id=item["id"], conversation_id=conversation_id,
                                 position=start + i, item=item)
                for i, item in enumerate(items)]
        session.add_all(rows)
        return rows

    async def items(self, tenant_id: str, conversation_id: str, *, limit: int | None = None,
                    after: str | None = None, order: str = "asc"
                    ) -> tuple[list[ConversationItem], bool]:
        await self.get(tenant_id, conversation_id)
        query = select(ConversationItem).where(
            ConversationItem.conversation_id == conversation_id)
        if after is not None:
            cursor = await self.item(tenant_id, conversation_id, after)
            query = query.where(ConversationItem.position > cursor.position if order == "asc"
                                else ConversationItem.position < cursor.position)
        by = (ConversationItem.position.asc() if order == "asc"
              else ConversationItem.position.desc())
        query = query.order_by(by)
        if limit is not None:
            query = query.limit(limit + 1)
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        if limit is None:
            return rows, False
        return rows[:limit], len(rows) > limit

    async def item(self, tenant_id: str, conversation_id: str, item_id: str
                   ) -> ConversationItem:
        await self.get(tenant_id, conversation_id)
        async with self.db.session() as session:
            row = await session.get(ConversationItem, item_id)
        if row is None or row.conversation_id != conversation_id:
            raise NotFoundError(f"Item with id '{item_id}' not found.")
        return row

    async def delete_item(self, tenant_id: str, conversation_id: str, item_id: str) -> None:
        await self.item(tenant_id, conversation_id, item_id)
        async with self.db.session() as session:
            await session.execute(delete(ConversationItem).where(
                ConversationItem.id == item_id))
            await session.commit()
