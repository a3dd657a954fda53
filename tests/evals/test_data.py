"""An eval run's data: JSONL rows in both forms, limits, the item schema check, message
templates and the sample namespace graders read."""

from __future__ import annotations

import pytest

from evals.data import (
    DataError,
    Row,
    check_item_schema,
    check_rows,
    given_sample,
    grading_sample,
    item_reference_messages,
    parse_jsonl,
    parse_message_templates,
    render_messages,
    rows_from_content,
    sampling_params,
)

SCHEMA = {"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}}}


def test_jsonl_rows_take_openais_form_or_a_bare_item() -> None:
    data = b'{"item": {"q": "a"}, "sample": {"output_text": "x"}}\n\n{"q": "b"}\n'
    assert parse_jsonl(data, 10) == [Row({"q": "a"}, {"output_text": "x"}), Row({"q": "b"})]
    # A bare item may have a field named `item` among others.
    assert parse_jsonl(b'{"item": 1, "q": "c"}', 10) == [Row({"item": 1, "q": "c"})]


@pytest.mark.parametrize(("data", "message"), [
    (b'{"q": 1}\n{"q": 2}\n{"q": 3}\n', "more than 2 items"),
    (b'{"q": 1}\nnot json\n', "Line 2"),
    (b'[1, 2]\n', "Line 1 of the data file is not a JSON object"),
    (b'{"item": [1]}\n', "'item' must be a JSON object"),
    (b"\n\n", "holds no items"),
])
def test_bad_jsonl_is_refused_with_the_line(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_jsonl(data, 2)


def test_inline_content_is_bounded_and_needs_items() -> None:
    assert rows_from_content([{"item": {"q": "a"}, "sample": None}], 5) == [Row({"q": "a"})]
    with pytest.raises(DataError, match="at most 1") as too_many:
        rows_from_content([{"item": {}}, {"item": {}}], 1)
    assert too_many.value.param == "data_source.source.content"
    with pytest.raises(DataError) as bare:
        rows_from_content([{"q": "a"}], 5)
    assert bare.value.param == "data_source.source.content[0]"


def test_items_are_checked_against_the_schema() -> None:
    check_item_schema(SCHEMA)
    check_item_schema({"type": "object", "properties": {"pattern": {"type": "string"}},
                       "$defs": {"x": {"type": "string"}}})  # a field named like a keyword
    for bad, message in (({"type": "string"}, "describe objects"),
                         ({"type": "object", "properties": 3}, "not a valid JSON Schema"),
                         ([], "JSON Schema object"),
                         ({"properties": {"q": {"type": "string", "pattern": "(a+)+$"}}},
                          "may not use 'pattern'"),
                         ({"properties": {"q": {"$ref": "https://example.com/s.json"}}},
                          "refer only within itself"),
                         ({"allOf": [{"$ref": "#/$defs/missing"}]},
                          "cannot be applied")):
        with pytest.raises(DataError, match=message):
            check_item_schema(bad)
    check_rows([Row({"q": "a"})], SCHEMA)
    with pytest.raises(DataError, match=r"Item 1 .* at item\.q"):
        check_rows([Row({"q": "a"}), Row({"q": 5})], SCHEMA)


def test_message_templates_render_items_and_refuse_what_cannot_work() -> None:
    templates = parse_message_templates(
        [{"role": "developer", "content": "Be brief."},
         {"role": "user", "type": "message",
          "content": [{"type": "input_text", "text": "Q: {{item.q}}"}]}], SCHEMA)
    assert render_messages(templates, {"q": "why?"}) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: why?"}]
    for template, param in (
            ([{"role": "user", "content": "{{item.nope}}"}], "template[0].content"),
            ([{"role": "user", "content": "{{sample.output_text}}"}], "template[0].content"),
            ([{"role": "tool", "content": "x"}], "template[0].role"),
            ([{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}],
             "template[0].content[0]"),
            ([], "template")):
        with pytest.raises(DataError) as refused:
            parse_message_templates(template, SCHEMA)
        assert refused.value.param == f"data_source.input_messages.{param}"
    loose = parse_message_templates([{"role": "user", "content": "{{item.x}}"}], None)
    with pytest.raises(DataError, match="x"):
        render_messages(loose, {"q": "no x here"})


def test_item_references_name_the_items_own_messages() -> None:
    item = {"chat": {"turns": [{"role": "user", "content": "hi"}]}}
    assert item_reference_messages("item.chat.turns", item) == [
        {"role": "user", "content": "hi"}]
    with pytest.raises(DataError):
        item_reference_messages("item.chat.none", item)


def test_sampling_params_become_chat_parameters() -> None:
    assert sampling_params({"max_completion_tokens": 8, "temperature": 0, "top_p": None,
                            "seed": 1}) == {"max_tokens": 8, "temperature": 0, "seed": 1}
    assert sampling_params(None) == {}


def test_the_sample_namespace() -> None:
    assert grading_sample('{"a": 1}')["output_json"] == {"a": 1}
    assert "output_json" not in grading_sample("plain")
    assert given_sample({"output": [{"role": "assistant", "content": "Paris"}]})[
        "output_text"] == "Paris"
    assert given_sample({"choices": [{"message": {"content": "Rome"}}]})["output_text"] == "Rome"
    assert given_sample(None) == {}
