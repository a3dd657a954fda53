"""A response request as the chat request the engines are sent: instructions first, then the
replayed context (a stored chain or a conversation) and the new input as chat messages; the
Responses API's tools, tool choice and text format in their chat shapes. The built-in
`file_search` tool becomes the chat pipeline's `retrieval` option, so grounding, source
screening and the not-in-the-documents answer are the ones chat answers have."""

from __future__ import annotations

from typing import Any

from conversations import messages_from_items
from gateway.responses.protocol import ResponsesRequest
from llmops.errors import BadRequestError

__all__ = ["chat_request", "searches_first"]


def searches_first(req: ResponsesRequest) -> bool:
    """Whether the gateway searches the caller's vector stores before the model answers. The
    engines behind the gateway call no built-in tools themselves, so a `file_search` tool is
    always searched with the input; with `tool_choice` "required" or `{"type":
    "file_search"}` the answer must come from the documents (nothing found: the gateway says
    so), with "auto" the model answers anyway when nothing relevant is found."""
    return req.file_search is not None and req.tool_choice != "none"


def _search_required(req: ResponsesRequest) -> bool:
    choice = req.tool_choice
    return (choice == "required" and not req.functions) or (
        isinstance(choice, dict) and choice.get("type") == "file_search")


def chat_request(req: ResponsesRequest, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completions body for `req`, given every item of its context, oldest first."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages += messages_from_items(items)
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p")):
        if (value := getattr(req, ours)) is not None:
            body[theirs] = value
    if user := req.safety_identifier or req.user:
        body["user"] = user
    if req.prompt_cache_key is not None:  # Chat Completions takes it too; routing reads it
        body["prompt_cache_key"] = req.prompt_cache_key
    if req.text is not None and req.text.format is not None:
        body["response_format"] = _response_format(req)
    if req.functions and req.tool_choice != "none":
        body["tools"] = [{"type": "function", "function": {
            k: v for k, v in (("name", t.name), ("description", t.description),
                              ("parameters", t.parameters or {"type": "object",
                                                              "properties": {}}),
                              ("strict", t.strict)) if v is not None}}
            for t in req.functions]
        body["tool_choice"] = _tool_choice(req)
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if searches_first(req):
        tool = req.file_search
        assert tool is not None
        options: dict[str, Any] = {"vector_store_ids": tool.vector_store_ids,
                                   "max_num_results": tool.max_num_results,
                                   "required": _search_required(req)}
        if tool.filters is not None:
            options["filters"] = tool.filters
        if tool.ranking_options is not None and tool.ranking_options.score_threshold:
            options["score_threshold"] = tool.ranking_options.score_threshold
        body["retrieval"] = options
    return body


def _response_format(req: ResponsesRequest) -> dict[str, Any]:
    assert req.text is not None and req.text.format is not None
    fmt = req.text.format
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def _tool_choice(req: ResponsesRequest) -> str | dict[str, Any]:
    choice = req.tool_choice
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        if choice["name"] not in {t.name for t in req.functions}:
            raise BadRequestError(f"tool_choice names the function {choice['name']!r}, which "
                                  "is not among the tools.", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") == "file_search":
        return "auto"  # the search is the gateway's; the functions stay the model's choice
    raise BadRequestError("tool_choice must be none, auto, required, {\"type\": \"function\", "
                          "\"name\": ...} or {\"type\": \"file_search\"}.", param="tool_choice")
