"""The data of eval runs, as plain Python shared by the gateway (which checks a run's data
when it is created) and the workers (which run it): data items from JSONL or inline content,
their check against the eval's item schema, the chat messages a `completions` run sends for
an item, the `sample` namespace graders read, and an output item's `sample` as the API shows
it.

A JSONL line is either `{"item": {...}, "sample": {...}}` (OpenAI's form; `sample` optional)
or a bare object, which is the item itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson

from evals.templates import Template, TemplateError, check_schema, parse_template

__all__ = [
    "DataError",
    "MessageTemplate",
    "Row",
    "check_item_schema",
    "check_rows",
    "given_sample",
    "grading_sample",
    "item_reference_messages",
    "parse_jsonl",
    "parse_message_templates",
    "render_messages",
    "rows_from_content",
    "sampling_params",
    "wire_sample",
]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text")
# Schema keywords whose value maps names to schemas, and keywords whose value is data.
_NAME_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_DATA_KEYWORDS = ("enum", "const", "default", "examples")


class DataError(ValueError):
    """A run's data that cannot be used; `param` names the offending field, OpenAI style."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Row:
    """One data item and, for runs that grade answers given with the data, its sample."""

    item: dict[str, Any]
    sample: dict[str, Any] | None = None


def _row(value: Any, where: str, param: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{where} is not a JSON object.", param)
    if "item" in value and set(value) <= {"item", "sample"}:
        item, sample = value["item"], value.get("sample")
        if not isinstance(item, dict):
            raise DataError(f"{where}: 'item' must be a JSON object.", param)
        if sample is not None and not isinstance(sample, dict):
            raise DataError(f"{where}: 'sample' must be a JSON object.", param)
        return Row(item, sample)
    return Row(value)


def parse_jsonl(data: bytes, max_items: int, param: str = "data_source.source") -> list[Row]:
    """The rows of a JSONL file (blank lines skipped); at most `max_items` of them."""
    rows: list[Row] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        if len(rows) == max_items:
            raise DataError(f"The data holds more than {max_items} items, the most a run "
                            "may have.", param)
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise DataError(f"Line {number} of the data file is not valid JSON.",
                            param) from None
        rows.append(_row(value, f"Line {number} of the data file", param))
    if not rows:
        raise DataError("The data file holds no items.", param)
    return rows


def rows_from_content(content: list[Any], max_items: int,
                      param: str = "data_source.source.content") -> list[Row]:
    """The rows of an inline `file_content` source."""
    if not content:
        raise DataError("The data source holds no items.", param)
    if len(content) > max_items:
        raise DataError(f"The data holds {len(content)} items; a run may have at most "
                        f"{max_items}.", param)
    rows = []
    for i, value in enumerate(content):
        if not isinstance(value, dict) or not isinstance(value.get("item"), dict):
            raise DataError(f"{param}[{i}] must be an object with an 'item' object.",
                            f"{param}[{i}]")
        rows.append(_row({k: v for k, v in value.items() if v is not None}, f"{param}[{i}]",
                         f"{param}[{i}]"))
    return rows


def check_item_schema(schema: Any, param: str = "data_source_config.item_schema") -> None:
    """An item schema must be a valid JSON Schema for objects, without regular expressions
    (`pattern`, `patternProperties`: a tenant's regex run on every item could take the
    gateway's CPU for as long as it likes) and with local references only."""
    if not isinstance(schema, dict):
        raise DataError("item_schema must be a JSON Schema object.", param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise DataError(f"item_schema is not a valid JSON Schema: {exc.message}",
                        param) from None
    if schema.get("type", "object") != "object":
        raise DataError("item_schema must describe objects (type: object).", param)
    _check_keywords(schema, param)
    _errors(jsonschema.Draft202012Validator(schema), {}, param)  # resolves its references


def _check_keywords(node: Any, param: str) -> None:
    if isinstance(node, list):
        for value in node:
            _check_keywords(value, param)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("pattern"), str) or "patternProperties" in node:
        raise DataError("item_schema may not use 'pattern' or 'patternProperties' (regular "
                        "expressions are not run on items here).", param)
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise DataError("item_schema may refer only within itself ($ref: '#/...').", param)
    for key, value in node.items():
        if key in _NAME_MAPS and isinstance(value, dict):
            for schema in value.values():  # the keys are property names, not keywords
                _check_keywords(schema, param)
        elif key not in _DATA_KEYWORDS:
            _check_keywords(value, param)


def _errors(validator: jsonschema.Draft202012Validator, value: Any, param: str
            ) -> jsonschema.ValidationError | None:
    try:
        return jsonschema.exceptions.best_match(validator.iter_errors(value))
    except Exception as exc:  # a reference that does not resolve, and the like
        raise DataError(f"item_schema cannot be applied: {str(exc)[:300]}", param) from None


def check_rows(rows: list[Row], schema: dict[str, Any] | None,
               param: str = "data_source.source") -> None:
    """Every item must match the eval's item schema; the first that does not is named."""
    if not schema:
        return
    validator = jsonschema.Draft202012Validator(schema)
    for i, row in enumerate(rows):
        error = _errors(validator, row.item, "data_source_config.item_schema")
        if error is not None:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.path)
            raise DataError(f"Item {i} does not match the eval's item_schema at "
                            f"item{where}: {error.message[:300]}", param)


@dataclass(frozen=True)
class MessageTemplate:
    role: str
    content: Template


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS \
                    or not isinstance(part.get("text"), str):
                raise DataError("Only text content (a string, input_text or output_text) is "
                                "supported in input messages.", f"{param}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError("A message's content must be a string or a list of text parts.", param)


def parse_message_templates(template: Any, item_schema: dict[str, Any] | None,
                            param: str = "data_source.input_messages.template"
                            ) -> list[MessageTemplate]:
    """Check a run's message template once: roles, text content, and `{{item.*}}` references
    the item schema can satisfy (the sample does not exist yet when it is rendered)."""
    if not isinstance(template, list) or not template:
        raise DataError("The template must be a non-empty list of messages.", param)
    messages = []
    for i, message in enumerate(template):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise DataError("A template message must be an object.", where)
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"Role must be one of {sorted(ROLES)}.", f"{where}.role")
        text = _text(message.get("content"), f"{where}.content")
        try:
            parsed = parse_template(text)
            check_schema(parsed, item_schema)
        except TemplateError as exc:
            raise DataError(str(exc), f"{where}.content") from None
        if any(ref.namespace == "sample" for ref in parsed.references):
            raise DataError("Input messages may refer to the item only: the sample is what "
                            "the model answers to them.", f"{where}.content")
        messages.append(MessageTemplate(ROLES[role], parsed))
    return messages


def render_messages(templates: list[MessageTemplate], item: dict[str, Any]
                    ) -> list[dict[str, str]]:
    """The chat messages for one item; raises DataError when the item lacks a field."""
    try:
        return [{"role": t.role, "content": t.content.render({"item": item})}
                for t in templates]
    except TemplateError as exc:
        raise DataError(str(exc)) from None


def item_reference_messages(reference: str, item: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages an item carries itself (`item_reference: "item.messages"`)."""
    path = reference.removeprefix("item.").split(".")
    value: Any = item
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, list) or not value:
        raise DataError(f"{reference} is not a list of messages in this item.")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{reference}[{i}] is not a chat message with a known role.")
        messages.append({"role": ROLES[message["role"]],
                         "content": _text(message.get("content"), f"{reference}[{i}]")})
    return messages


def sampling_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's eval `sampling_params` as chat completion parameters."""
    params = dict(params or {})
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "response_format", "tools"):
        if params.get(name) is not None:
            out[name] = params[name]
    if params.get("max_completion_tokens") is not None:
        out["max_tokens"] = params["max_completion_tokens"]
    return out


def grading_sample(output_text: str, tool_calls: list[Any] | None = None,
                   choices: list[Any] | None = None) -> dict[str, Any]:
    """The `sample` namespace graders read: output_text, output_json (when the answer is
    JSON), output_tools and choices."""
    sample: dict[str, Any] = {"output_text": output_text, "output_tools": tool_calls or [],
                              "choices": choices or []}
    try:
        parsed = json.loads(output_text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict | list):
        sample["output_json"] = parsed
    return sample


def given_sample(sample: dict[str, Any] | None) -> dict[str, Any]:
    """A sample that came with the data (jsonl runs) as the namespace graders read: its
    `output_text`, or the text of its first output message or choice."""
    if not sample:
        return {}
    text = sample.get("output_text")
    if not isinstance(text, str):
        text = ""
        output = sample.get("output")
        choices = sample.get("choices")
        if isinstance(output, list) and output and isinstance(output[0], dict):
            content = output[0].get("content")
            text = content if isinstance(content, str) else ""
        elif isinstance(choices, list) and choices and isinstance(choices[0], dict):
            content = (choices[0].get("message") or {}).get("content")
            text = content if isinstance(content, str) else ""
    return {**grading_sample(text), **sample, "output_text": text}


def wire_sample(messages: list[Any], text: str, model: str, finish_reason: str,
                usage: dict[str, int], error: dict[str, str] | None,
                params: dict[str, Any]) -> dict[str, Any]:
    """An output item's `sample`, in OpenAI's shape."""
    return {"input": messages, "output": [{"role": "assistant", "content": text}],
            "model": model, "finish_reason": finish_reason,
            "usage": {"prompt_tokens": usage.get("prompt_tokens", 0),
                      "completion_tokens": usage.get("completion_tokens", 0),
                      "total_tokens": usage.get("total_tokens", 0),
                      "cached_tokens": usage.get("cached_tokens", 0)},
            "error": error, "max_completion_tokens": params.get("max_tokens"),
            "seed": params.get("seed"), "temperature": params.get("temperature"),
            "top_p": params.get("top_p")}
