"""SQL tables: tenants, API keys, model prices and the usage ledger (SQLAlchemy 2)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiKey",
    "Base",
    "FineTuningCheckpoint",
    "FineTuningEvent",
    "FineTuningJob",
    "ModelPrice",
    "StoredFile",
    "Tenant",
    "UsageRecord",
    "VectorStore",
    "VectorStoreFile",
    "utcnow",
]

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


class FineTuningJob(Base):
    """A fine-tuning job. Its lease (owner + expiry, renewed by heartbeats) makes sure only one
    worker trains it at a time; an expired lease lets another worker resume it."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (Index("ix_ftjobs_tenant_time", "tenant_id", "created_at"),
                      Index("ix_ftjobs_status", "status"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int] = mapped_column(default=0)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lora: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="validating_files")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), default=None)
    trained_tokens: Mapped[int | None] = mapped_column(default=None)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class FineTuningEvent(Base):
    __tablename__ = "fine_tuning_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(String(1000))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class FineTuningCheckpoint(Base):
    __tablename__ = "fine_tuning_checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    step: Mapped[int]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class VectorStore(Base):
    """A tenant's collection of searchable files (OpenAI's vector stores). Its chunks live in
    the vector index, tagged with the tenant and this id."""

    __tablename__ = "vector_stores"
    __table_args__ = (Index("ix_vstores_tenant_time", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str | None] = mapped_column(String(256), default=None)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_active_at: Mapped[datetime] = mapped_column(default=utcnow)


class VectorStoreFile(Base):
    """A file attached to a vector store, and the state of its ingestion."""

    __tablename__ = "vector_store_files"
    __table_args__ = (Index("ix_vsfiles_store_time", "store_id", "created_at"),)

    store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id"), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), default="in_progress")
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    chunking: Mapped[dict[str, Any]] = mapped_column(default=dict)  # max_tokens, overlap
    content_sha256: Mapped[str] = mapped_column(String(64))
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    chunks: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
