"""The bases of request bodies in OpenAI's API shape, for the gateway's routes and for the
domain code that checks the same bodies when it starts work itself (`evals.runs`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Metadata", "Open", "Wire"]

# OpenAI's `metadata`: at most 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)],
                          Annotated[str, Field(max_length=512)]], Field(max_length=16)]


class Wire(BaseModel):
    """A request body: a field the API does not know is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """A body whose unknown fields are let through: a variant we refuse by name keeps its
    fields, so that the refusal can say why."""

    model_config = ConfigDict(extra="allow")
