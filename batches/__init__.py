"""Batches (OpenAI's Batch API): a file of requests to one endpoint, validated line by line
before anything runs, then sent by a worker through the gateway as the key that created it,
each line once, with its answers written to output and error files."""

from batches.service import BatchIn, BatchService
from batches.store import ACTIVE, TERMINAL, Answer, Batches
from batches.validation import ENDPOINTS, BatchLine, EndpointRule, LineError, validate

__all__ = [
    "ACTIVE",
    "ENDPOINTS",
    "TERMINAL",
    "Answer",
    "BatchIn",
    "BatchLine",
    "BatchService",
    "Batches",
    "EndpointRule",
    "LineError",
    "validate",
]
