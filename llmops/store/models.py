"""SQL tables: tenants, API keys, model prices and the usage ledger (SQLAlchemy 2)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiKey",
    "Base",
    "Batch",
    "BatchRequest",
    "Conversation",
    "ConversationItem",
    "Eval",
    "EvalOutputItem",
    "EvalRun",
    "EvalWatch",
    "FineTuningCheckpoint",
    "FineTuningEvent",
    "FineTuningJob",
    "ModelPrice",
    "StoredFile",
    "StoredResponse",
    "Tenant",
    "UsageRecord",
    "VectorStore",
    "VectorStoreFile",
    "VectorStoreFileBatch",
    "aware",
    "utcnow",
]

Money = Numeric(20, 10)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """A stored time with its zone: every stored time is UTC, and SQLite hands it back naive
    (read as local time, it would be off by the machine's offset)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


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
    # A guardrails policy (guardrails.schema.GuardrailsPolicy as JSON); None: inherited.
    guardrails: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True),
                                                             default=None)
    # Share of a model's replicas while requests queue for them, relative to other tenants.
    weight: Mapped[int] = mapped_column(default=1, server_default="1")


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
    guardrails: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True),
                                                             default=None)


class ModelPrice(Base):
    __tablename__ = "model_prices"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    input_per_mtok: Mapped[Decimal]  # USD per million prompt tokens
    output_per_mtok: Mapped[Decimal]  # USD per million completion tokens
    # USD per million prompt tokens found in the engine's prefix cache; None: input_per_mtok.
    cached_input_per_mtok: Mapped[Decimal | None] = mapped_column(default=None)
    # USD per million tokens trained on (fine-tuning); None: priced by the workers' device time.
    training_per_mtok: Mapped[Decimal | None] = mapped_column(default=None)
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
    cached_tokens: Mapped[int] = mapped_column(default=0)  # of prompt_tokens
    completion_tokens: Mapped[int] = mapped_column(default=0)
    trained_tokens: Mapped[int] = mapped_column(default=0)  # fine-tuning (endpoint: its jobs)
    latency_ms: Mapped[float] = mapped_column(default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(default=None)
    pool: Mapped[str | None] = mapped_column(String(8), default=None)
    cost_usd: Mapped[Decimal] = mapped_column(default=Decimal(0))
    device_seconds: Mapped[float] = mapped_column(default=0.0)
    # What guardrails did: [{stage, category, action, count, rule?}], never the data itself.
    guardrails: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSON(none_as_null=True), default=None)


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
    # "supervised" or "dpo"; the method's hyperparameters (DPO's beta too) are in hyperparameters.
    method: Mapped[str] = mapped_column(String(20), default="supervised",
                                        server_default="supervised")
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lora: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # {eval_id?, data_source?, promote}: evaluate base and adapter after training.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # OpenAI's `integrations` as given ([{type: "mlflow", mlflow: {...}}]).
    integrations: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    # The MLflow run the job logs to ({run_id, experiment_id, url}), kept across resumes.
    tracking: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
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
    # The key that attached the file: ingestion calls the embedding model as this key, so its
    # limits, budget and ledger apply. None for files attached before keys were recorded.
    key_id: Mapped[str | None] = mapped_column(String(40), default=None)
    # The file batch that last attached the file (None: attached alone). A file's ingestion
    # state lives only here; a batch's counts are read from its files' rows.
    batch_id: Mapped[str | None] = mapped_column(String(40), default=None, index=True)


class VectorStoreFileBatch(Base):
    """A batch of files attached to a vector store at once (OpenAI's file batches). Only what
    the files' rows cannot say lives here: when it was made and whether it was cancelled. Its
    files and their progress are the `vector_store_files` rows carrying its id, so that a
    file's ingestion has one state, whichever way it was attached: a second table of batch
    members would be a copy of those statuses to keep in step."""

    __tablename__ = "vector_store_file_batches"
    __table_args__ = (Index("ix_vsbatches_store_time", "store_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)


class Eval(Base):
    """An evaluation (OpenAI's Evals API): the shape of its data items and the testing
    criteria that grade every run of it."""

    __tablename__ = "evals"
    __table_args__ = (Index("ix_evals_tenant_time", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(256), default="")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    data_source_config: Mapped[dict[str, Any]]  # as created: type, item_schema, ...
    testing_criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalRun(Base):
    """One run of an eval over a data source. The running tallies are updated with every
    output item, in the same transaction; the lease works as for fine-tuning jobs, so a run
    whose worker died resumes on another one without grading an item twice."""

    __tablename__ = "eval_runs"
    __table_args__ = (Index("ix_evalruns_eval_time", "eval_id", "created_at"),
                      Index("ix_evalruns_tenant_status", "tenant_id", "status"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id"))
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))  # whose limits and ledger the calls use
    name: Mapped[str] = mapped_column(String(256), default="")
    model: Mapped[str] = mapped_column(String(256), default="")
    data_source: Mapped[dict[str, Any]]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    items_total: Mapped[int] = mapped_column(default=0)
    passed: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    errored: Mapped[int] = mapped_column(default=0)
    per_criteria: Mapped[dict[str, Any]] = mapped_column(default=dict)  # name: counts
    per_model_usage: Mapped[dict[str, Any]] = mapped_column(default=dict)  # model: usage
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class EvalOutputItem(Base):
    """One graded data item of a run; unique per (run, item index), so a resumed run can
    never store an item twice."""

    __tablename__ = "eval_output_items"
    __table_args__ = (UniqueConstraint("run_id", "datasource_item_id",
                                       name="uq_evalitems_run_item"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id"))
    eval_id: Mapped[str] = mapped_column(String(40))
    tenant_id: Mapped[str] = mapped_column(String(40))
    datasource_item_id: Mapped[int]
    datasource_item: Mapped[dict[str, Any]]
    sample: Mapped[dict[str, Any]]
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(8))  # pass | fail | error
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalWatch(Base):
    """A regression watch: an eval run against a model every `interval_s`, its pass rates
    exported as metrics and compared with a threshold and with an accepted (baseline) run.
    Due watches are claimed with a conditional UPDATE of `next_run_at`, so that of several
    gateways one starts each run. The name is unique per tenant: it is the metric label."""

    __tablename__ = "eval_watches"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_evalwatches_tenant_name"),
                      Index("ix_evalwatches_due", "enabled", "next_run_at"),
                      Index("ix_evalwatches_eval", "eval_id"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))  # the runs are made as this key
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(48))
    model: Mapped[str] = mapped_column(String(256))
    data_source: Mapped[dict[str, Any]]  # a `completions` run's, without the model
    interval_s: Mapped[int]
    min_pass_rate: Mapped[float | None] = mapped_column(Float, default=None)
    tolerance: Mapped[float] = mapped_column(Float, default=0.0)
    enabled: Mapped[bool] = mapped_column(default=True)
    enabled_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_run_at: Mapped[datetime]
    last_run_id: Mapped[str | None] = mapped_column(
        ForeignKey("eval_runs.id", ondelete="SET NULL"), default=None)
    last_completed_run_id: Mapped[str | None] = mapped_column(
        ForeignKey("eval_runs.id", ondelete="SET NULL"), default=None)
    accepted_run_id: Mapped[str | None] = mapped_column(
        ForeignKey("eval_runs.id", ondelete="SET NULL"), default=None)
    last_started_at: Mapped[datetime | None] = mapped_column(default=None)
    skipped_runs: Mapped[int] = mapped_column(default=0)
    last_skip_at: Mapped[datetime | None] = mapped_column(default=None)
    last_skip_reason: Mapped[str | None] = mapped_column(String(256), default=None)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Batch(Base):
    """A batch (OpenAI's Batch API): the requests of an input file, run by a worker through
    the gateway as the key that created it. The lease works as for fine-tuning jobs; the
    request counts are updated with every result, in the same transaction. No foreign key to
    the tenant: the bootstrap admin's tenant has no row (`Batches.forget_tenant` removes a
    tenant's batches)."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_time", "tenant_id", "created_at"),
                      Index("ix_batches_status", "status"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))  # whose limits and ledger the lines use
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(8), default="24h")
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, default=None)
    status: Mapped[str] = mapped_column(String(16), default="validating")
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    output_file_id: Mapped[str | None] = mapped_column(String(40), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(40), default=None)
    total: Mapped[int] = mapped_column(default=0)
    completed: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None] = mapped_column(default=None)
    finalizing_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_at: Mapped[datetime | None] = mapped_column(default=None)
    expired_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelling_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)


class BatchRequest(Base):
    """One line of a batch, written when its request is sent and completed with the gateway's
    answer. Unique per (batch, custom_id): a line is sent once, whichever worker runs it; a
    line sent but never answered (its worker died) is reported as interrupted, not sent
    again."""

    __tablename__ = "batch_requests"
    __table_args__ = (UniqueConstraint("batch_id", "custom_id", name="uq_batchreqs_custom_id"),
                      Index("ix_batchreqs_batch_line", "batch_id", "line"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    custom_id: Mapped[str] = mapped_column(String(512))
    line: Mapped[int]  # 1-based line of the input file: the output keeps the input's order
    request_id: Mapped[str] = mapped_column(String(128))
    status_code: Mapped[int | None] = mapped_column(default=None)  # None: sent, unanswered
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
class StoredResponse(Base):
    """A response of the Responses API: the object as last shown to its caller, and the input
    items it was created with (its context is the chain of `previous_response_id`s, each
    contributing its input and its output). Deleted by its owner or after its retention."""

    __tablename__ = "responses"
    __table_args__ = (Index("ix_responses_tenant_time", "tenant_id", "created_at"),
                      Index("ix_responses_expiry", "expires_at"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    key_id: Mapped[str] = mapped_column(String(40))  # a background response runs as this key
    status: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any]]  # the Response object
    input_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # background
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_tenant", "tenant_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConversationItem(Base):
    """One item of a conversation, in order: `position` grows as items are appended."""

    __tablename__ = "conversation_items"
    __table_args__ = (UniqueConstraint("conversation_id", "position",
                                       name="uq_conversationitems_position"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int]
    item: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
