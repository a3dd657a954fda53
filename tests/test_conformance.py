"""The conformance helper itself: strict where OpenAI's schema is strict, open where it is
open, and OpenAPI 3.0's leftovers in the document read as 3.0 means them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conformance import DOCUMENT, assert_conforms, conformance_errors, schema_names

FILE = {"id": "file-1", "object": "file", "bytes": 3, "created_at": 1, "filename": "a.jsonl",
        "purpose": "fine-tune", "status": "processed"}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
HIT = {"file_id": "file-1", "filename": "a.txt", "score": 0.5, "attributes": {"year": 2024},
       "content": [{"type": "text", "text": "some text"}]}


def test_a_conforming_object_passes() -> None:
    assert_conforms(FILE, "OpenAIFile")
    assert_conforms({"object": "list", "data": [FILE], "first_id": "file-1",
                     "last_id": "file-1", "has_more": False}, "ListFilesResponse")


def test_an_optional_field_that_is_not_nullable_may_be_absent_but_not_null() -> None:
    assert conformance_errors({**FILE, "expires_at": 1}, "OpenAIFile") == []
    with pytest.raises(AssertionError, match=r"\$\.expires_at: None is not of type 'integer'"):
        assert_conforms({**FILE, "expires_at": None}, "OpenAIFile")


def test_nested_faults_are_named_by_their_path() -> None:
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                           "message": {"role": "assistant", "content": "Hi", "refusal": None,
                                       "annotations": None}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                        "prompt_tokens_details": None}}
    assert conformance_errors(answer, "CreateChatCompletionResponse") == [
        "$.choices[0].message.annotations: None is not of type 'array'",
        "$.usage.prompt_tokens_details: None is not of type 'object'"]


def test_a_closed_object_takes_no_other_property() -> None:
    assert_conforms(HIT, "VectorStoreSearchResultItem")
    assert conformance_errors({**HIT, "chunk": {"index": 0}}, "VectorStoreSearchResultItem") == [
        "$: Additional properties are not allowed ('chunk' was unexpected)"]


def test_an_open_object_takes_extensions() -> None:
    assert_conforms({**FILE, "ours": {"anything": None}}, "OpenAIFile")


def test_openapi_3_0_nullable_allows_null_there_only() -> None:
    """The stream chunk's `finish_reason` and `usage` say `nullable: true` (3.0 style)."""
    assert_conforms({**CHUNK, "usage": None}, "CreateChatCompletionStreamResponse")
    wrong = {**CHUNK, "choices": [{**CHUNK["choices"][0], "finish_reason": "done"}]}
    assert conformance_errors(wrong, "CreateChatCompletionStreamResponse")
    assert conformance_errors({**CHUNK, "system_fingerprint": None},
                              "CreateChatCompletionStreamResponse")


def test_openapi_3_0_exclusive_minimum_is_exclusive() -> None:
    hp: dict[str, Any] = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert_conforms(hp, "FineTuneSupervisedHyperparameters")
    assert conformance_errors({**hp, "learning_rate_multiplier": 0},
                              "FineTuneSupervisedHyperparameters")


def test_an_operation_answer_described_inline() -> None:
    assert_conforms({"object": "eval.deleted", "deleted": True, "eval_id": "eval_1"},
                    "DELETE /evals/{eval_id}")
    assert conformance_errors({"object": "eval.deleted", "deleted": True},
                              "DELETE /evals/{eval_id}") == [
        "$: 'eval_id' is a required property"]


def test_null_is_accepted_only_where_openai_answers_it() -> None:
    """OpenAI's examples of eval runs answer `"error": null`; its schema requires an object."""
    assert "error" in json.loads(DOCUMENT.read_text())["components"]["schemas"]["EvalRun"][
        "required"]
    run = {"object": "eval.run", "id": "evalrun_1", "eval_id": "eval_1", "status": "queued",
           "model": "m", "name": "r", "created_at": 1, "report_url": "http://x/r",
           "result_counts": {"total": 0, "errored": 0, "failed": 0, "passed": 0},
           "per_model_usage": [], "per_testing_criteria_results": [], "metadata": {},
           "data_source": {"type": "jsonl", "source": {"type": "file_id", "id": "file-1"}}}
    assert_conforms({**run, "error": None}, "EvalRun")
    assert_conforms({**run, "error": {"code": "x", "message": "y"}}, "EvalRun")
    assert conformance_errors({**run, "error": "x"}, "EvalRun")
    assert conformance_errors(None, "EvalApiError")  # the component itself stays strict


def test_unknown_names_are_refused() -> None:
    with pytest.raises(KeyError):
        assert_conforms({}, "NoSuchComponent")
    with pytest.raises(KeyError):
        assert_conforms({}, "GET /no/such/path")


def test_what_the_next_endpoints_need_is_vendored() -> None:
    assert {"Response", "ResponseStreamEvent", "ResponseCreatedEvent", "ResponseItemList",
            "ConversationResource", "ConversationItemList", "ConversationItem",
            "DeletedConversation", "Batch", "ListBatchesResponse", "VectorStoreFileBatchObject",
            } <= set(schema_names())
