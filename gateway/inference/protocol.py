"""Wire models of the OpenAI-compatible endpoints.

They validate what the gateway must understand (model, stream, the shape of messages and the
types and ranges of common parameters) and allow every other field: the gateway forwards the
client's original bytes, so any parameter vLLM supports passes through unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "OpenAIRequest",
    "RetrievalOptions",
]

_Probability = Annotated[float, Field(ge=0.0, le=1.0)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
_Stop = str | Annotated[list[str], Field(max_length=16)] | None
_TokenIds = list[Annotated[int, Field(ge=0)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = None


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Sampling(OpenAIRequest):
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: _Probability | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    seed: int | None = None
    stop: _Stop = None
    logit_bias: dict[str, float] | None = None


class RetrievalOptions(BaseModel):
    """Our extension of chat completions: answer from these vector stores, with citations."""

    model_config = ConfigDict(extra="forbid", strict=True)

    vector_store_ids: list[str] = Field(min_length=1, max_length=16)
    max_num_results: Annotated[int, Field(ge=1, le=50)] = 5
    score_threshold: _Probability | None = None
    filters: dict[str, Any] | None = None
    search_mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    # Answer only from the sources: with none relevant the gateway says so itself. False: the
    # model answers without sources then.
    required: bool = True


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    retrieval: RetrievalOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | _TokenIds | list[_TokenIds] = Field(...)
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None


class EmbeddingRequest(OpenAIRequest):
    input: str | list[str] | _TokenIds | list[_TokenIds] = Field(...)
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
