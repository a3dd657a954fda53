"""The wire model of `POST /v1/responses`. Fields the gateway does not use are allowed and
ignored (clients such as the Agents SDK send several), but those it uses are checked."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmops.wire import Metadata

__all__ = ["INCLUDABLE", "FileSearchTool", "FunctionTool", "ResponsesRequest", "TextFormat"]

# OpenAI's `include` values (its schema's IncludeEnum). Only `file_search_call.results`
# changes our answers: the others name tools or data our engines never produce.
INCLUDABLE = ("file_search_call.results", "web_search_call.results",
              "web_search_call.action.sources", "message.input_image.image_url",
              "computer_call_output.output.image_url", "code_interpreter_call.outputs",
              "reasoning.encrypted_content", "message.output_text.logprobs")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionTool(_Open):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class RankingOptions(_Open):
    ranker: str | None = None
    score_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class FileSearchTool(_Open):
    type: Literal["file_search"]
    vector_store_ids: list[str] = Field(min_length=1, max_length=16)
    max_num_results: Annotated[int, Field(ge=1, le=50)] = 10
    filters: dict[str, Any] | None = None
    ranking_options: RankingOptions | None = None


class TextFormat(_Open):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class TextConfig(_Open):
    format: TextFormat | None = None


class ConversationRef(_Open):
    id: str


Tool = Annotated[FunctionTool | FileSearchTool, Field(discriminator="type")]


class ResponsesRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(...)
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    metadata: Metadata | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    text: TextConfig | None = None
    tools: list[Tool] = Field(default_factory=list, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    truncation: Literal["auto", "disabled"] = "disabled"
    include: list[str] = Field(default_factory=list, max_length=16)
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)

    @field_validator("include")
    @classmethod
    def _includable(cls, include: list[str]) -> list[str]:
        # One error naming `include` (not the item), as for any unknown value of it.
        if unknown := [v for v in include if v not in INCLUDABLE]:
            raise PydanticCustomError(
                "include", "{unknown} is not one of the supported values: {supported}",
                {"unknown": repr(unknown[0]), "supported": ", ".join(INCLUDABLE)})
        return include

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    @property
    def file_search(self) -> FileSearchTool | None:
        return next((t for t in self.tools if isinstance(t, FileSearchTool)), None)

    @property
    def functions(self) -> list[FunctionTool]:
        return [t for t in self.tools if isinstance(t, FunctionTool)]
