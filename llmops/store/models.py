"""SQL tables: tenants, API keys, model prices and the usage ledger (SQLAlchemy 2)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["ApiKey", "Base", "ModelPrice", "StoredFile", "Tenant", "UsageRecord", "utcnow"]

Money = Numeric(20, 10)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it from the class)
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
        Decimal: Money,
    }


class _Limits:
    """Limits a tenant or a key may carry; None means no limit at this level."""

    rpm_limit: Mapped[int | None] = mapped_column(default=None)
    tpm_limit: Mapped[int | None] = mapped_column(default=None)
    budget_usd: Mapped[Decimal | None] = mapped_column(default=None)
    budget_period: Mapped[str] = mapped_column(String(8), default="month")  # day | month


class Tenant(_Limits, Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(_Limits, Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(24))  # shown in listings to recognise a key
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the key
    role: Mapped[str] = mapped_column(String(8), default="member")  # admin | member
    models: Mapped[list[str] | None] = mapped_column(JSON, default=None)  # None: every model
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelPrice(Base):
    __tablename__ = "model_prices"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    input_per_mtok: Mapped[Decimal]  # USD per million prompt tokens
    output_per_mtok: Mapped[Decimal]  # USD per million completion tokens
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UsageRecord(Base):
    """One row per request, written by the ledger writer; the request id makes it idempotent.
    No foreign keys: the ledger must accept every record, whatever happened to keys since."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_tenant_time", "tenant_id", "created_at"),
        Index("ix_usage_key_time", "key_id", "created_at"),
    )

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime]
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    adapter: Mapped[str | None] = mapped_column(String(256), default=None)
    status: Mapped[int]
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    latency_ms: Mapped[float] = mapped_column(default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(default=None)
    pool: Mapped[str | None] = mapped_column(String(8), default=None)
    cost_usd: Mapped[Decimal] = mapped_column(default=Decimal(0))
    device_seconds: Mapped[float] = mapped_column(default=0.0)


class StoredFile(Base):
    """An uploaded file (Files API). The bytes live in the file store under `id`."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_time", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
