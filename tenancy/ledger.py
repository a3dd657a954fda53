"""The usage ledger: one record per request, durable without a database round trip on the
request path.

A request that passes admission publishes a `start` event before it reaches a model (status
0: not finished), and every request publishes an `end` event when it ends, which replaces the
start. A gateway killed mid-request therefore still leaves exactly one record, with status 0.

Gateways append each record to a Redis stream (`<prefix>:usage`); while Redis is unreachable
they append to a local spool file and re-publish it later. A writer (a task in each gateway
process, in a consumer group) reads the stream in batches, inserts into `usage_records` with
`ON CONFLICT (request_id) DO NOTHING`, and only then acknowledges. A crash between insert and
acknowledgement makes another writer re-take the batch after `claim_idle_s`; the request id
makes the second insert a no-op. So a gateway restart or a database outage loses nothing and
counts nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from llmops.settings import LedgerConfig
from llmops.store import Database, UsageRecord

__all__ = ["LedgerPublisher", "LedgerWriter", "UsageEvent", "last_used", "record_usage",
           "spend_by", "spend_since", "usage_report"]

log = logging.getLogger(__name__)
GROUP = "ledger-writers"


@dataclass
class UsageEvent:
    request_id: str
    tenant_id: str
    key_id: str
    endpoint: str
    model: str
    status: int
    adapter: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the engine's prefix cache held
    completion_tokens: int = 0
    trained_tokens: int = 0  # fine-tuning: tokens trained on
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    pool: str | None = None
    cost_usd: float = 0.0
    device_seconds: float = 0.0
    created_at: float = field(default_factory=lambda: datetime.now(UTC).timestamp())
    final: bool = True  # False for the start event
    # What guardrails did: [{stage, category, action, count, rule?}], never the data itself.
    guardrails: list[dict[str, Any]] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively, fast

    @classmethod
    def from_json(cls, data: bytes) -> UsageEvent:
        # Across a rolling upgrade writers read records of older gateways (a field missing
        # takes its default) and of newer ones (a field unknown here is left out).
        return cls(**{k: v for k, v in orjson.loads(data).items() if k in _FIELDS})

    def row(self) -> dict[str, Any]:
        row = dict(vars(self))
        del row["final"]
        row["created_at"] = datetime.fromtimestamp(self.created_at, UTC)
        row["cost_usd"] = Decimal(repr(self.cost_usd))
        return row


_FIELDS = frozenset(f.name for f in fields(UsageEvent))


def stream_name(prefix: str) -> str:
    return f"{prefix}:usage"


class LedgerPublisher:
    """Appends records to the stream, pipelined: records submitted while a batch is in flight
    go out together in the next one. Under load a record costs a fraction of a round trip, and
    at one connection nothing waits for a batch to fill."""

    def __init__(self, redis: Redis, prefix: str, spool: Path) -> None:
        self.redis = redis
        self.stream = stream_name(prefix)
        self.spool = spool
        self._spool_lock = asyncio.Lock()
        self._batch: list[bytes] = []
        self._sent: asyncio.Future[None] | None = None  # resolves when `_batch` is durable
        self._sender: asyncio.Task[None] | None = None  # the batch in flight

    async def publish(self, event: UsageEvent) -> None:
        """Return once the record is in Redis, or in the spool while Redis is unreachable."""
        await asyncio.shield(self.submit(event))

    def submit(self, event: UsageEvent) -> asyncio.Future[None]:
        """Queue the record for the next batch; the future resolves as `publish` returns."""
        self._batch.append(event.to_json())
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
            if self._sender is None:
                asyncio.get_running_loop().call_soon(self._flush)
        return self._sent

    def _flush(self) -> None:
        if self._sender is not None or self._sent is None:
            return
        batch, sent = self._batch, self._sent
        self._batch, self._sent = [], None
        self._sender = asyncio.get_running_loop().create_task(self._send(batch, sent))

    async def _send(self, batch: list[bytes], sent: asyncio.Future[None]) -> None:
        try:
            await self._append(batch)
        except (RedisError, OSError):
            # Some may have landed: the writer's ON CONFLICT makes a second copy harmless.
            log.warning("Redis unreachable: %d usage records spooled to %s", len(batch),
                        self.spool)
            try:
                async with self._spool_lock:
                    _append_lines(self.spool, batch)
            except OSError as exc:
                sent.set_exception(exc)
            else:
                sent.set_result(None)
        except asyncio.CancelledError:  # shutdown
            sent.cancel()
            raise
        else:
            sent.set_result(None)
        finally:
            self._sender = None
        self._flush()  # what arrived meanwhile

    async def _append(self, batch: list[bytes]) -> None:
        # One pipelined write on a pooled connection: the client's per-command path costs
        # twice the CPU, and this runs for every request.
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(conn.pack_commands(
                [("XADD", self.stream, "*", "r", data) for data in batch]))
            for _ in batch:
                await conn.read_response()
        except BaseException:
            await conn.disconnect()  # replies may be pending: never reuse it half-read
            raise
        finally:
            await pool.release(conn)

    async def drain_spool(self) -> int:
        """Re-publish spooled records; returns how many went out."""
        async with self._spool_lock:
            if not self.spool.exists():
                return 0
            lines = [ln for ln in self.spool.read_bytes().splitlines() if ln.strip()]
            sent = 0
            try:
                for line in lines:
                    await self.redis.xadd(self.stream, {"r": line})
                    sent += 1
            except (RedisError, OSError):
                pass
            rest = lines[sent:]
            if rest:
                tmp = self.spool.with_suffix(".tmp")
                tmp.write_bytes(b"\n".join(rest) + b"\n")
                os.replace(tmp, self.spool)
            else:
                self.spool.unlink()
            return sent


def _append_lines(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"".join(line + b"\n" for line in lines))
        os.fsync(fd)
    finally:
        os.close(fd)


class LedgerWriter:
    def __init__(self, redis: Redis, db: Database, prefix: str, config: LedgerConfig) -> None:
        self.redis = redis  # its socket timeout must exceed config.block_ms
        self.db = db
        self.stream = stream_name(prefix)
        self.config = config
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self.step()
                backoff = 0.5
            except (RedisError, OSError, SQLAlchemyError) as exc:
                log.warning("ledger writer: %s; retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def step(self) -> int:
        """Move one batch from the stream to the database; returns its size."""
        await self._ensure_group()
        batch = await self._claim_stale() or await self._read_new()
        if batch:
            await self._insert([UsageEvent.from_json(data) for _, data in batch])
            ids = [msg_id for msg_id, _ in batch]
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.stream, GROUP, *ids)
                pipe.xdel(self.stream, *ids)  # acknowledged records leave the stream
                await pipe.execute()
        return len(batch)

    async def flush(self) -> None:
        """Write everything published so far (tests and shutdown)."""
        while await self.step():
            pass

    async def _ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)

    async def _claim_stale(self) -> list[tuple[bytes, bytes]]:
        idle_ms = int(self.config.claim_idle_s * 1000)
        result: Any = await self.redis.xautoclaim(self.stream, GROUP, self.consumer, idle_ms,
                                                  start_id="0-0", count=self.config.batch_size)
        return [(mid, fields[b"r"]) for mid, fields in result[1] if fields]

    async def _read_new(self) -> list[tuple[bytes, bytes]]:
        result: Any = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: ">"},
                                             count=self.config.batch_size,
                                             block=self.config.block_ms)
        return [(mid, fields[b"r"]) for _, messages in result or [] for mid, fields in messages]

    async def _insert(self, events: list[UsageEvent]) -> None:
        """Start events only create a record; end events create or complete it. Both are
        idempotent, and a start arriving late never overwrites an end."""
        dialect = postgresql if self.db.engine.dialect.name == "postgresql" else sqlite
        table = UsageRecord.__table__  # Core inserts: no ORM bookkeeping per row
        starts = [e.row() for e in events if not e.final]
        ends = list({e.request_id: e.row() for e in events if e.final}.values())
        async with self.db.engine.begin() as conn:
            if starts:
                statement: Any = dialect.insert(table).on_conflict_do_nothing(
                    index_elements=["request_id"])
                await conn.execute(statement, starts)
            if ends:
                statement = dialect.insert(table)
                statement = statement.on_conflict_do_update(
                    index_elements=["request_id"],
                    set_={c: statement.excluded[c] for c in ends[0] if c != "request_id"})
                await conn.execute(statement, ends)


async def record_usage(db: Database, event: UsageEvent) -> None:
    """Write one record straight to the database, replacing an earlier version of it (same
    request id): for workers, whose records grow as their work goes on (training) and whose
    path has no request waiting on it."""
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    row = event.row()
    statement: Any = dialect.insert(UsageRecord.__table__)
    statement = statement.on_conflict_do_update(
        index_elements=["request_id"],
        set_={c: statement.excluded[c] for c in row if c not in ("request_id", "created_at")})
    async with db.engine.begin() as conn:
        await conn.execute(statement, [row])


def _bucket(db: Database, period: str) -> Any:
    column = UsageRecord.created_at
    if db.engine.dialect.name == "postgresql":
        fmt = "YYYY-MM-DD" if period == "day" else "YYYY-MM"
        return func.to_char(func.timezone("UTC", column), fmt)
    return func.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", column)


async def usage_report(
    db: Database,
    *,
    group_by: tuple[str, ...] = ("tenant_id",),
    period: str | None = None,
    tenant_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[dict[str, Any]]:
    """Requests (of those, `rejected`: refused by a limit or budget, status 429; `errors`:
    every other status of 400 or more), tokens (prompt, of those cached, completion, and
    trained on by fine-tuning jobs), cost and device seconds, summed per group (and per day or
    month)."""
    columns: list[Any] = [getattr(UsageRecord, g).label(g) for g in group_by]
    if period is not None:
        columns.append(_bucket(db, period).label("period"))
    query = select(
        *columns,
        func.count().label("requests"),
        # Started but not (yet) finished: in flight, or cut off by a gateway that died.
        func.coalesce(func.sum(case((UsageRecord.status == 0, 1), else_=0)), 0
                      ).label("unfinished"),
        func.coalesce(func.sum(case((UsageRecord.status == 429, 1), else_=0)), 0
                      ).label("rejected"),
        func.coalesce(func.sum(case(((UsageRecord.status >= 400) & (UsageRecord.status != 429),
                                     1), else_=0)), 0).label("errors"),
        func.coalesce(func.sum(UsageRecord.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(UsageRecord.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(UsageRecord.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(UsageRecord.trained_tokens), 0).label("trained_tokens"),
        func.coalesce(func.sum(UsageRecord.cost_usd), 0).label("cost_usd"),
        func.coalesce(func.sum(UsageRecord.device_seconds), 0).label("device_seconds"),
    ).group_by(*columns).order_by(*columns)
    for column, value in (("tenant_id", tenant_id), ("key_id", key_id), ("model", model)):
        if value is not None:
            query = query.where(getattr(UsageRecord, column) == value)
    if start is not None:
        query = query.where(UsageRecord.created_at >= start)
    if end is not None:
        query = query.where(UsageRecord.created_at < end)
    async with db.session() as session:
        rows = (await session.execute(query)).mappings().all()
    return [{**row, "cost_usd": float(row["cost_usd"]),
             "device_seconds": float(row["device_seconds"])} for row in rows]


async def spend_since(db: Database, column: str, value: str, start: datetime) -> float:
    """What a key or tenant has spent since `start`, from the ledger."""
    query = select(func.coalesce(func.sum(UsageRecord.cost_usd), 0)).where(
        getattr(UsageRecord, column) == value, UsageRecord.created_at >= start)
    async with db.session() as session:
        return float(await session.scalar(query) or 0)


async def spend_by(db: Database, column: str, start: datetime,
                   owners: list[str] | None = None) -> dict[str, float]:
    """What each key or tenant (`column`: key_id or tenant_id) has spent since `start`, in one
    grouped query; `owners`: only these."""
    owner = getattr(UsageRecord, column)
    query = select(owner, func.coalesce(func.sum(UsageRecord.cost_usd), 0)).where(
        UsageRecord.created_at >= start).group_by(owner)
    if owners is not None:
        query = query.where(owner.in_(owners))
    async with db.session() as session:
        return {row[0]: float(row[1]) for row in await session.execute(query)}


async def last_used(db: Database, key_ids: list[str]) -> dict[str, datetime]:
    """When each of these keys last made a request, in one grouped query (keys never used are
    left out)."""
    if not key_ids:
        return {}
    query = select(UsageRecord.key_id, func.max(UsageRecord.created_at)).where(
        UsageRecord.key_id.in_(key_ids)).group_by(UsageRecord.key_id)
    async with db.session() as session:
        return {key: at if at.tzinfo else at.replace(tzinfo=UTC)
                for key, at in await session.execute(query)}
