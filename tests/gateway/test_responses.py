"""The Responses API's translation over chat completions: requests into chat bodies, and chat
answers (whole or streamed) into Response objects and the Responses event sequence."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.inference.context import RequestContext
from gateway.inference.pipeline import parse_request
from gateway.responses.answer import ResponseBuilder, response_object
from gateway.responses.protocol import INCLUDABLE, ResponsesRequest
from gateway.responses.replay import replay
from gateway.responses.translate import chat_request
from llmops.errors import BadRequestError
from retrieval.grounding import Grounding, Source
from tenancy import Principal
from tenancy.tenants import Limits
from tests.conformance import DOCUMENT, assert_conforms


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "Hi", **fields})


def context(grounding: Grounding | None = None) -> RequestContext:
    who = Principal("key", "tenant", "member", None, Limits(), Limits())
    ctx = RequestContext(who, "rid", "/v1/responses", "chat", lambda *_: None)
    ctx.prompt_tokens, ctx.completion_tokens, ctx.grounding = 7, 3, grounding
    return ctx


def events(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(frame.split(b"data: ", 1)[1])
            for frame in data.split(b"\n\n") if frame]


def test_a_request_becomes_a_chat_body() -> None:
    body = chat_request(request(
        instructions="Be brief.", max_output_tokens=9, temperature=0.5, user="u",
        prompt_cache_key="session-1",
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "f"}), [])
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["max_tokens"] == 9 and body["user"] == "u"
    assert body["prompt_cache_key"] == "session-1"
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert body["tools"][0]["function"]["name"] == "f"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}


def test_file_search_becomes_retrieval_required_only_when_asked() -> None:
    tool = {"type": "file_search", "vector_store_ids": ["vs_1"], "max_num_results": 3}
    auto = chat_request(request(tools=[tool]), [])
    forced = chat_request(request(tools=[tool], tool_choice={"type": "file_search"}), [])
    assert auto["retrieval"] == {"vector_store_ids": ["vs_1"], "max_num_results": 3,
                                 "required": False}
    assert forced["retrieval"]["required"] is True and "tools" not in forced
    assert "retrieval" not in chat_request(request(tools=[tool], tool_choice="none"), [])


def test_a_tool_choice_naming_an_unknown_function_is_refused() -> None:
    with pytest.raises(BadRequestError) as err:
        chat_request(request(tools=[{"type": "function", "name": "f"}],
                             tool_choice={"type": "function", "name": "g"}), [])
    assert err.value.param == "tool_choice"


def test_include_takes_openais_values_and_refuses_others() -> None:
    openais = orjson.loads(DOCUMENT.read_bytes())["components"]["schemas"]["IncludeEnum"]
    assert sorted(INCLUDABLE) == sorted(openais["enum"])
    body = {"model": "m", "input": "Hi"}
    every = parse_request(ResponsesRequest, orjson.dumps({**body, "include": openais["enum"]}))
    assert every.include == openais["enum"]
    with pytest.raises(BadRequestError) as err:  # a typo is refused, not silently ignored
        parse_request(ResponsesRequest, orjson.dumps(
            {**body, "include": ["file_search_call.results", "file_search_call.result"]}))
    assert (err.value.status, err.value.param) == (400, "include")
    assert "'file_search_call.result' is not one of the supported values" in err.value.message


def test_file_search_results_are_shown_only_when_included() -> None:
    sources = [Source("file-a", "a.txt", 0, 0, 10, "alpha", 0.9, {})]
    answer = {"choices": [{"finish_reason": "stop", "message": {"content": "A [1]."}}]}
    shown = [ResponseBuilder(req, "resp_1", lambda _: None).whole(
        context(Grounding(sources, query="q")), answer)["output"][0]["results"]
        for req in (request(), request(include=["file_search_call.results"]))]
    assert shown[0] is None and [r["file_id"] for r in shown[1]] == ["file-a"]


def test_a_whole_answer_becomes_a_response_with_usage() -> None:
    stored: list[dict[str, Any]] = []
    answer = {"choices": [{"finish_reason": "tool_calls", "message": {
        "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}}],
              "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                        "prompt_tokens_details": {"cached_tokens": 4}}}
    ctx = context()
    ctx.usage_from(answer["usage"])  # as the pipeline does before the answer is translated
    obj = ResponseBuilder(request(), "resp_1", stored.append).whole(ctx, answer)
    assert obj["status"] == "completed" and stored == [obj]
    assert [i["type"] for i in obj["output"]] == ["message", "function_call"]
    assert obj["output"][1]["call_id"] == "call_1"
    assert obj["usage"] == {"input_tokens": 7,
                            "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                            "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": 10}


def test_a_cut_answer_is_incomplete() -> None:
    answer = {"choices": [{"finish_reason": "length", "message": {"content": "Once"}}]}
    obj = ResponseBuilder(request(), "resp_1", lambda _: None).whole(context(), answer)
    assert obj["status"] == "incomplete"
    assert obj["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_stream_of_chunks_becomes_the_event_sequence() -> None:
    stored: list[dict[str, Any]] = []
    builder = ResponseBuilder(request(stream=True), "resp_1", stored.append)
    ctx = context()
    out = b"".join([
        builder.chunk(ctx, {"choices": [{"delta": {"role": "assistant", "content": "Par"}}]}),
        builder.chunk(ctx, {"choices": [{"delta": {"content": "is."}, "finish_reason": "stop"}]}),
        builder.done(ctx)])
    seen = events(out)
    assert [e["type"] for e in seen] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))
    assert seen[-1]["response"]["output"][0]["content"][0]["text"] == "Paris."
    assert stored == [seen[-1]["response"]]


def test_citations_point_at_the_sources_the_answer_drew_on() -> None:
    sources = [Source("file-a", "a.txt", 0, 0, 10, "alpha", 0.9, {}),
               Source("file-b", "b.txt", 0, 0, 10, "beta", 0.8, {})]
    ctx = context(Grounding(sources, query="q"))
    answer = {"choices": [{"finish_reason": "stop", "message": {"content": "It is A [1]."}}]}
    obj = ResponseBuilder(request(include=["file_search_call.results"]), "resp_1",
                          lambda _: None).whole(ctx, answer)
    search, message = obj["output"]
    assert search["type"] == "file_search_call" and search["queries"] == ["q"]
    assert [r["file_id"] for r in search["results"]] == ["file-a", "file-b"]
    notes = message["content"][0]["annotations"]
    assert notes == [
        {"type": "file_citation", "file_id": "file-a", "filename": "a.txt", "index": 8},
        {"type": "file_citation", "file_id": "file-b", "filename": "b.txt", "index": 12}]


def test_a_replay_resumes_after_a_sequence_number() -> None:
    stored: list[dict[str, Any]] = []
    answer = {"choices": [{"finish_reason": "stop", "message": {"content": "Paris."}}]}
    final = ResponseBuilder(request(background=True), "resp_1", stored.append).whole(
        context(), answer)
    every = events(b"".join(replay(final)))
    assert every[-1]["type"] == "response.completed" and every[-1]["response"] == final
    rest = events(b"".join(replay(final, starting_after=3)))
    assert rest == every[4:]


def test_a_cancelled_replay_ends_without_a_terminal_event() -> None:
    final = {**response_object(request(background=True), "resp_1", 1, status="cancelled"),
             "output": [{"id": "msg_1", "type": "message", "role": "assistant",
                         "status": "incomplete", "content": [
                             {"type": "output_text", "text": "Once", "annotations": [],
                              "logprobs": []}]}]}
    kinds = [e["type"] for e in events(b"".join(replay(final)))]
    assert kinds[-1] == "response.output_item.done"  # OpenAI has no response.cancelled event
    assert not any(kind.startswith("response.cancel") for kind in kinds)


def test_a_stream_whose_client_left_is_kept_cancelled_with_its_partial_answer() -> None:
    stored: list[dict[str, Any]] = []
    builder = ResponseBuilder(request(stream=True), "resp_1", stored.append)
    ctx = context()
    builder.chunk(ctx, {"choices": [{"delta": {"content": "Once upon"}}]})
    builder.left(ctx)
    builder.left(ctx)  # once only
    [final] = stored
    assert final["status"] == "cancelled"
    assert final["output"][0]["status"] == "incomplete"
    assert final["output"][0]["content"][0]["text"] == "Once upon"
    assert_conforms(final, "Response")
    done = ResponseBuilder(request(stream=True), "resp_2", stored.append)
    done.chunk(ctx, {"choices": [{"delta": {"content": "Hi"}, "finish_reason": "stop"}]})
    done.done(ctx)
    done.left(ctx)  # left after the end: the completed response stands
    assert stored[-1]["status"] == "completed" and len(stored) == 2


def test_responses_and_their_events_conform_to_openais_schema() -> None:
    sources = [Source("file-a", "a.txt", 0, 0, 10, "alpha", 0.9, {"k": "v"})]
    req = request(include=["file_search_call.results"], metadata={"a": "b"}, tools=[
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "function", "name": "f", "parameters": {"type": "object"}}])
    answer = {"choices": [{"finish_reason": "stop", "message": {
        "content": "Alpha [1].", "tool_calls": [
            {"id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}}]}
    whole = ResponseBuilder(req, "resp_1", lambda _: None).whole(
        context(Grounding(sources, query="q")), answer)
    assert_conforms(whole, "Response")
    builder = ResponseBuilder(req, "resp_2", lambda _: None)
    ctx = context(Grounding(sources, query="q"))
    stream = b"".join([
        builder.chunk(ctx, {"choices": [{"delta": {"content": "Alpha [1]."}}]}),
        builder.chunk(ctx, {"choices": [{"delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]},
            "finish_reason": "tool_calls"}]}),
        builder.done(ctx)])
    for event in events(stream) + events(b"".join(replay(whole))):
        assert_conforms(event, "ResponseStreamEvent")
    failed = ResponseBuilder(request(stream=True), "resp_3", lambda _: None)
    for event in events(failed.chunk(ctx, {"choices": [{"delta": {"content": "x"}}]})
                        + failed.failed(ctx, "The engine failed.", "bad_gateway")):
        assert_conforms(event, "ResponseStreamEvent")
