"""Items of the Responses API (what a response takes as input and gives as output, and what
a conversation holds) and their translation into the chat messages an engine is sent."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

__all__ = ["InvalidItemError", "duplicate_id", "duplicate_message", "item_id",
           "messages_from_items", "normalize_input", "output_as_input"]

_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
_ROLES = {"user", "assistant", "system", "developer"}
_TEXT_PARTS = {"input_text", "output_text"}


class InvalidItemError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def item_id(kind: str) -> str:
    return f"{_PREFIX.get(kind, 'item')}_{secrets.token_hex(24)}"


def duplicate_id(items: list[dict[str, Any]], held: Iterable[str] = ()) -> str | None:
    """The first id of `items` that a conversation already holds (`held`) or an earlier item
    repeats: as OpenAI's, a conversation's item ids are unique, and a duplicate is refused
    rather than appended twice."""
    seen = set(held)
    for item in items:
        if item["id"] in seen:
            return str(item["id"])
        seen.add(item["id"])
    return None


def duplicate_message(item: str) -> str:
    return (f"Duplicate item found with id {item}. Remove duplicate items from your input "
            "and try again.")


def normalize_input(value: str | list[Any], param: str = "input") -> list[dict[str, Any]]:
    """The input as stored items, each with an id and its content as a list of parts;
    InvalidItemError names the offending item."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    return [_normalize(item, f"{param}[{i}]") for i, item in enumerate(value)]


def _normalize(item: Any, param: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidItemError("An input item must be an object.", param)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidItemError(f"Invalid role {role!r}: expected one of "
                                   f"{sorted(_ROLES)}.", f"{param}.role")
        content = item.get("content")
        text_type = "output_text" if role == "assistant" else "input_text"
        if isinstance(content, str):
            parts: list[dict[str, Any]] = [{"type": text_type, "text": content}]
            if role == "assistant":
                parts[0]["annotations"] = []
        elif isinstance(content, list) and content:
            parts = [_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]
        else:
            raise InvalidItemError("A message's content must be a string or a non-empty list "
                                   "of content parts.", f"{param}.content")
        return {"id": item.get("id") or item_id("message"), "type": "message", "role": role,
                "content": parts, "status": item.get("status") or "completed"}
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise InvalidItemError(f"A function_call item needs a string '{name}'.",
                                       f"{param}.{name}")
        return {"id": item.get("id") or item_id(kind), "type": kind,
                "call_id": item["call_id"], "name": item["name"],
                "arguments": item["arguments"], "status": item.get("status") or "completed"}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise InvalidItemError("A function_call_output item needs a string 'call_id'.",
                                   f"{param}.call_id")
        output = item.get("output")
        if not isinstance(output, (str, list)):
            raise InvalidItemError("A function_call_output item needs an 'output'.",
                                   f"{param}.output")
        return {"id": item.get("id") or item_id(kind), "type": kind,
                "call_id": item["call_id"], "output": output,
                "status": item.get("status") or "completed"}
    raise InvalidItemError(f"Input items of type {kind!r} are not supported: use message, "
                           "function_call or function_call_output items.", f"{param}.type")


def _part(part: Any, param: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidItemError("A content part must be an object.", param)
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        if not isinstance(part.get("text"), str):
            raise InvalidItemError("A text part needs a string 'text'.", f"{param}.text")
        out = {"type": kind, "text": part["text"]}
        if kind == "output_text":
            out["annotations"] = part.get("annotations") or []
        return out
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": kind, "refusal": part["refusal"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": kind, "image_url": part["image_url"],
                "detail": part.get("detail") or "auto"}
    raise InvalidItemError(f"Content parts of type {kind!r} are not supported.",
                           f"{param}.type")


def output_as_input(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What of a response's output is context for the next turn: its messages and function
    calls (a file search's results were already in the sources it was answered from)."""
    return [item for item in output if item.get("type") in ("message", "function_call")]


def messages_from_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for normalized items: consecutive function calls become one assistant
    message with tool calls, and function outputs become tool messages."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _content(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") \
                    and last.get("content") is None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item["output"]
            if isinstance(output, list):
                output = _text(output)
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output})
    return messages


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if all(p["type"] in _TEXT_PARTS or p["type"] == "refusal" for p in parts):
        return _text(parts)
    return [{"type": "text", "text": p["text"]} if p["type"] in _TEXT_PARTS else
            {"type": "image_url", "image_url": {"url": p["image_url"]}}
            for p in parts if p["type"] != "refusal"]


def _text(parts: list[Any]) -> str:
    return "\n".join(str(p.get("text") or p.get("refusal") or "") for p in parts
                     if isinstance(p, dict))
