"""A batch's input file, line by line: OpenAI's request lines
`{"custom_id", "method": "POST", "url", "body"}`. `validate` checks every line before any work
is done and names each bad one by its line number (bad JSON, a missing or repeated
`custom_id`, a method other than POST, a url other than the batch's endpoint, a body the
endpoint would refuse, a model the key may not use); `parse_lines` reads a validated file
again for the worker that runs it.

What a valid body is belongs to the endpoint: the gateway hands its own request parsers in
(`EndpointRule`), so a line is refused here exactly when the endpoint would refuse it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from llmops.catalog import Catalog
from llmops.errors import APIError
from tenancy.tenants import Principal
from tenancy.visibility import usable_entry

__all__ = [
    "ENDPOINTS",
    "BatchLine",
    "EndpointRule",
    "LineError",
    "Validated",
    "parse_lines",
    "validate",
]

# The endpoints a batch may target, and the kind of model each serves.
ENDPOINTS: dict[str, str] = {"/v1/chat/completions": "chat", "/v1/completions": "chat",
                             "/v1/embeddings": "embedding", "/v1/responses": "chat"}

MAX_CUSTOM_ID = 512


class _Parsed(Protocol):
    @property
    def model(self) -> str: ...


@dataclass(frozen=True)
class EndpointRule:
    """How an endpoint reads a body: `parse` returns it parsed (with its `model`) or raises
    an `llmops.errors.APIError` naming the field at fault."""

    parse: Callable[[bytes], _Parsed]
    kind: str


@dataclass(frozen=True)
class BatchLine:
    line: int  # 1-based
    custom_id: str
    body: bytes  # the request body as it is sent


@dataclass(frozen=True)
class LineError:
    code: str
    message: str
    param: str | None
    line: int

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param,
                "line": self.line}


@dataclass(frozen=True)
class Validated:
    lines: list[BatchLine]
    errors: list[LineError]  # at most `max_errors` of them
    error_count: int  # all of them


class _Refused(Exception):
    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def _read(number: int, raw: bytes, endpoint: str) -> tuple[str, dict[str, Any]]:
    """One line's custom_id and body, or _Refused with what is wrong with it."""
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Refused("invalid_json_line", f"Line {number} is not valid JSON.", None) from None
    if not isinstance(request, dict):
        raise _Refused("invalid_json_line", f"Line {number} must be a JSON object.", None)
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _Refused("missing_custom_id", "Each request needs a `custom_id` string.",
                       "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise _Refused("invalid_custom_id",
                       f"`custom_id` may have at most {MAX_CUSTOM_ID} characters.", "custom_id")
    if request.get("method") != "POST":
        raise _Refused("invalid_method", "The method must be 'POST'.", "method")
    if request.get("url") != endpoint:
        raise _Refused("invalid_url", f"The url must be the batch's endpoint, '{endpoint}'.",
                       "url")
    body = request.get("body")
    if not isinstance(body, dict):
        raise _Refused("invalid_request", "`body` must be a JSON object.", "body")
    unknown = sorted(set(request) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise _Refused("invalid_request", f"Unknown field '{unknown[0]}'.", unknown[0])
    return custom_id, body


def _split(data: bytes) -> list[tuple[int, bytes]]:
    """Numbered non-blank lines."""
    return [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]


def parse_lines(data: bytes, endpoint: str) -> list[BatchLine]:
    """The requests of a file `validate` accepted."""
    lines = []
    for number, raw in _split(data):
        custom_id, body = _read(number, raw, endpoint)
        lines.append(BatchLine(number, custom_id, orjson.dumps(body)))
    return lines


def validate(data: bytes, endpoint: str, rules: Mapping[str, EndpointRule], catalog: Catalog,
             who: Principal, *, max_line_bytes: int, max_errors: int) -> Validated:
    """Every request of an input file checked as `who` would be served it by `endpoint`;
    the bad ones listed (the first `max_errors`) with their line numbers."""
    rule = rules.get(endpoint)
    kind = rule.kind if rule is not None else ENDPOINTS[endpoint]
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    count = 0
    seen: set[str] = set()
    for number, raw in _split(data):
        try:
            custom_id, body = _read(number, raw, endpoint)
            if custom_id in seen:
                raise _Refused("duplicate_custom_id", f"The custom_id '{custom_id}' is used "
                               "by an earlier line; each request needs its own.", "custom_id")
            seen.add(custom_id)
            sent = orjson.dumps(body)
            if len(sent) > max_line_bytes:
                raise _Refused("request_too_large", f"The body has {len(sent)} bytes; a "
                               f"request may have at most {max_line_bytes}.", "body")
            if body.get("stream"):
                raise _Refused("invalid_request", "Requests in a batch cannot stream.",
                               "body.stream")
            if body.get("background"):  # the batch is the background
                raise _Refused("invalid_request", "Requests in a batch cannot run in the "
                               "background.", "body.background")
            model = _model(sent, body, rule)
            _check_model(catalog, who, model, kind, endpoint)
        except _Refused as exc:
            count += 1
            if len(errors) < max_errors:
                errors.append(LineError(exc.code, exc.message, exc.param, number))
            continue
        lines.append(BatchLine(number, custom_id, sent))
    return Validated(lines, errors, count)


def _model(sent: bytes, body: dict[str, Any], rule: EndpointRule | None) -> str:
    if rule is None:  # an endpoint this gateway does not declare a body for: its model only
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _Refused("invalid_request", "`body.model` must be a non-empty string.",
                           "body.model")
        return model
    try:
        return rule.parse(sent).model
    except APIError as exc:
        param = f"body.{exc.param}" if exc.param else "body"
        raise _Refused("invalid_request", exc.message, param) from None


def _check_model(catalog: Catalog, who: Principal, model: str, kind: str,
                 endpoint: str) -> None:
    try:
        usable_entry(catalog, who, model, kind, endpoint)
    except APIError as exc:
        raise _Refused(exc.code or "invalid_request", exc.message, "body.model") from None
