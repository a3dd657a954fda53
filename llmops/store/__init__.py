"""The SQL store: tables, connection and migrations."""

from llmops.store.db import Database, upgrade
from llmops.store.models import (
    ApiKey,
    Base,
    Batch,
    BatchRequest,
    Conversation,
    ConversationItem,
    Eval,
    EvalOutputItem,
    EvalRun,
    EvalWatch,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    ModelPrice,
    StoredFile,
    StoredResponse,
    Tenant,
    UsageRecord,
    VectorStore,
    VectorStoreFile,
    VectorStoreFileBatch,
    aware,
    utcnow,
)

__all__ = ["ApiKey", "Base", "Batch", "BatchRequest", "Conversation", "ConversationItem",
           "Database", "Eval", "EvalOutputItem", "EvalRun", "EvalWatch", "FineTuningCheckpoint",
           "FineTuningEvent", "FineTuningJob", "ModelPrice", "StoredFile", "StoredResponse",
           "Tenant", "UsageRecord", "VectorStore", "VectorStoreFile", "VectorStoreFileBatch",
           "aware", "upgrade", "utcnow"]
