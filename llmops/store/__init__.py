"""The SQL store: tables, connection and migrations."""

from llmops.store.db import Database, upgrade
from llmops.store.models import (
    ApiKey,
    Base,
    Eval,
    EvalOutputItem,
    EvalRun,
    EvalWatch,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    ModelPrice,
    StoredFile,
    Tenant,
    UsageRecord,
    VectorStore,
    VectorStoreFile,
    VectorStoreFileBatch,
    aware,
    utcnow,
)

__all__ = ["ApiKey", "Base", "Database", "Eval", "EvalOutputItem", "EvalRun", "EvalWatch",
           "FineTuningCheckpoint", "FineTuningEvent",
           "FineTuningJob", "ModelPrice", "StoredFile", "Tenant", "UsageRecord", "VectorStore",
           "VectorStoreFile", "VectorStoreFileBatch", "aware", "upgrade", "utcnow"]
