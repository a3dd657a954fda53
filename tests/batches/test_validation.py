"""A batch's input file checked line by line, by the gateway's own body parsers: each bad line
is named with its line number and the field at fault, and a good file yields its requests in
order with the bodies to send."""

from __future__ import annotations

import functools
from typing import Any

import orjson

from batches.validation import EndpointRule, parse_lines, validate
from gateway.api.inference import ENDPOINTS
from gateway.inference.pipeline import parse_request
from llmops.catalog import Catalog
from llmops.settings import ModelConfig
from tenancy.tenants import Limits, Principal

CHAT = ModelConfig(name="chat", kind="chat", pools=[{"device": "cpu", "urls": ["http://x"]}])
EMBED = ModelConfig(name="embed", kind="embedding",
                    pools=[{"device": "cpu", "urls": ["http://y"]}])
MEMBER = Principal("key_a", "ten_a", "member", None, Limits(), Limits())
RULES = {e.path: EndpointRule(functools.partial(parse_request, e.schema), e.kind)
         for e in ENDPOINTS}
URL = "/v1/chat/completions"


def line(custom_id: Any = "a", url: str = URL, method: str = "POST", **body: Any) -> bytes:
    body = body or {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    request = {"custom_id": custom_id, "method": method, "url": url, "body": body}
    return orjson.dumps({k: v for k, v in request.items() if v is not None})


def check(*lines: bytes, who: Principal = MEMBER, endpoint: str = URL,
          catalog: Catalog | None = None) -> Any:
    return validate(b"\n".join(lines) + b"\n", endpoint, RULES,
                    catalog or Catalog([CHAT, EMBED]), who, max_line_bytes=4096, max_errors=100)


def test_a_good_file_yields_its_requests_in_order() -> None:
    out = check(line("a"), line("b"))
    assert out.errors == [] and out.error_count == 0
    assert [(r.line, r.custom_id) for r in out.lines] == [(1, "a"), (2, "b")]
    assert orjson.loads(out.lines[0].body)["model"] == "chat"


def test_each_bad_line_is_named_by_its_number_and_field() -> None:
    out = check(
        line("ok"),
        b"{not json",
        line(None),
        line("ok"),  # repeated
        line("m", method="GET"),
        line("u", url="/v1/embeddings"),
        line("b", model="chat", messages=[{"role": "robot", "content": "x"}]),
        line("n", model="nope", messages=[{"role": "user", "content": "x"}]),
        line("k", model="embed", messages=[{"role": "user", "content": "x"}]),
        line("s", model="chat", stream=True, messages=[{"role": "user", "content": "x"}]),
        line("big", model="chat", messages=[{"role": "user", "content": "x" * 5000}]),
    )
    found = [(e.line, e.code, e.param) for e in out.errors]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "missing_custom_id", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_method", "method"),
        (6, "invalid_url", "url"),
        (7, "invalid_request", "body.messages[0].role"),
        (8, "model_not_found", "body.model"),
        (9, "model_not_supported", "body.model"),
        (10, "invalid_request", "body.stream"),
        (11, "request_too_large", "body"),
    ]
    assert out.error_count == 10
    assert [r.custom_id for r in out.lines] == ["ok"]
    assert out.errors[0].as_dict() == {"code": "invalid_json_line", "line": 2, "param": None,
                                       "message": "Line 2 is not valid JSON."}


def test_a_model_the_key_may_not_use_is_refused_as_missing() -> None:
    only_embed = Principal("key_b", "ten_a", "member", ("embed",), Limits(), Limits())
    out = check(line("a"), who=only_embed)
    assert [(e.code, e.line) for e in out.errors] == [("model_not_found", 1)]
    adapters = Catalog([CHAT])
    adapters.set_adapters("chat", ["ft:chat:b:1"])
    adapters.owners["ft:chat:b:1"] = "ten_b"  # another tenant's fine-tune
    out = check(line("a", model="ft:chat:b:1", messages=[{"role": "user", "content": "x"}]),
                catalog=adapters)
    assert [e.code for e in out.errors] == ["model_not_found"]


def test_embeddings_and_completions_bodies_follow_their_endpoint() -> None:
    out = check(line("e", url="/v1/embeddings", model="embed", input="hello"),
                line("f", url="/v1/embeddings", model="embed"),
                endpoint="/v1/embeddings")
    assert [(e.line, e.param) for e in out.errors] == [(2, "body.input")]
    out = check(line("c", url="/v1/completions", model="chat", prompt="Once", max_tokens=0),
                endpoint="/v1/completions")
    assert [(e.line, e.param) for e in out.errors] == [(1, "body.max_tokens")]


def test_responses_lines_are_read_by_the_responses_endpoints_parser() -> None:
    from gateway.responses.protocol import ResponsesRequest

    rules = {**RULES, "/v1/responses": EndpointRule(
        functools.partial(parse_request, ResponsesRequest), "chat")}
    lines = [line("r", url="/v1/responses", model="chat", input="hi"),
             line("t", url="/v1/responses", model="chat", input="hi", temperature=3),
             line("b", url="/v1/responses", model="chat", input="hi", background=True),
             line("e", url="/v1/responses", model="embed", input="hi")]
    out = validate(b"\n".join(lines), "/v1/responses", rules, Catalog([CHAT, EMBED]), MEMBER,
                   max_line_bytes=4096, max_errors=10)
    assert [(e.line, e.param) for e in out.errors] == [
        (2, "body.temperature"), (3, "body.background"), (4, "body.model")]


def test_responses_lines_need_a_model_until_the_endpoint_declares_its_body() -> None:
    rules = {k: v for k, v in RULES.items() if k != "/v1/responses"}
    lines = [line("r", url="/v1/responses", model="chat", input="hi"),
             line("x", url="/v1/responses", input="hi")]
    out = validate(b"\n".join(lines), "/v1/responses", rules, Catalog([CHAT]), MEMBER,
                   max_line_bytes=4096, max_errors=10)
    assert [(e.line, e.param) for e in out.errors] == [(2, "body.model")]


def test_listed_errors_are_bounded_but_all_are_counted() -> None:
    out = validate(b"x\n" * 50, URL, RULES, Catalog([CHAT]), MEMBER, max_line_bytes=4096,
                   max_errors=3)
    assert len(out.errors) == 3 and out.error_count == 50


def test_blank_lines_are_skipped_and_numbering_follows_the_file() -> None:
    data = line("a") + b"\n\n  \n" + line("b") + b"\n"
    assert [(r.line, r.custom_id) for r in parse_lines(data, URL)] == [(1, "a"), (4, "b")]


def test_the_package_exports() -> None:
    import batches

    assert set(batches.__all__) == {
        "ACTIVE", "ENDPOINTS", "TERMINAL", "Answer", "BatchIn", "BatchLine", "BatchService",
        "Batches", "EndpointRule", "LineError", "validate"}
