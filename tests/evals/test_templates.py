"""Grader templates: parsing, rendering from the item and sample namespaces, and references
checked against the eval's item schema."""

from __future__ import annotations

import pytest

from evals.templates import TemplateError, check_schema, parse_template

ITEM = {"question": "2+2?", "meta": {"lang": "en", "tags": ["math", "easy"]}, "n": 4,
        "flags": {"hard": False}}
SAMPLE = {"output_text": "four", "output_json": {"answer": 4, "steps": ["add"]}}
CONTEXT = {"item": ITEM, "sample": SAMPLE}
SCHEMA = {"type": "object",
          "properties": {"question": {"type": "string"}, "n": {"type": "integer"},
                         "meta": {"type": "object",
                                  "properties": {"lang": {"type": "string"},
                                                 "tags": {"type": "array",
                                                          "items": {"type": "string"}}}},
                         "flags": {"type": "object"}},
          "required": ["question"]}


@pytest.mark.parametrize(("source", "rendered"), [
    ("Q: {{item.question}}", "Q: 2+2?"),
    ("{{ item.question }}|{{sample.output_text}}", "2+2?|four"),
    ("{{item.meta.lang}}", "en"),
    ("{{item.meta.tags[1]}} {{item.meta.tags.0}}", "easy math"),
    ("{{sample.output_json.answer}}", "4"),
    ("{{item.n}} {{item.flags.hard}}", "4 false"),
    ("{{item.meta}}", '{"lang": "en", "tags": ["math", "easy"]}'),
    ("no references {single} braces", "no references {single} braces"),
])
def test_render(source: str, rendered: str) -> None:
    assert parse_template(source).render(CONTEXT) == rendered


@pytest.mark.parametrize(("source", "message"), [
    ("{{answer}}", "unknown namespace 'answer'"),
    ("{{ }}", "is not a reference"),
    ("{{item..x}}", "not a valid reference path"),
    ("{{item.question", "unclosed"),
])
def test_malformed_templates_are_rejected(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        parse_template(source)


@pytest.mark.parametrize(("source", "message"), [
    ("{{item.answer}}", r"\{\{item.answer\}\}: item has no field 'answer'"),
    ("{{item.meta.tags[5]}}", "item.meta.tags has no index 5"),
    ("{{sample.output_json.x}}", "sample.output_json has no field 'x'"),
])
def test_missing_values_are_a_clear_render_error(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        parse_template(source).render(CONTEXT)


def test_sample_namespace_without_output_json_names_it() -> None:
    with pytest.raises(TemplateError, match="sample has no field 'output_json'"):
        parse_template("{{sample.output_json.answer}}").render(
            {"item": ITEM, "sample": {"output_text": "x"}})


def test_schema_accepts_declared_paths() -> None:
    check_schema(parse_template("{{item.question}} {{item.meta.tags[0]}} {{item.meta.lang}} "
                                "{{sample.output_text}} {{sample.output_json.anything}}"),
                 SCHEMA)


@pytest.mark.parametrize(("source", "message"), [
    ("{{item.answr}}", r"item schema has no field 'answr' in item \(it has: flags, meta, n, "
                       r"question\)"),
    ("{{item.meta.language}}", "no field 'language' in item.meta"),
    ("{{sample.output}}", "the sample namespace has output_text"),
])
def test_schema_rejects_unknown_references(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        check_schema(parse_template(source), SCHEMA)


def test_schema_that_does_not_say_lets_the_item_decide() -> None:
    open_schema = {"type": "object", "properties": {"a": {"type": "string"}},
                   "additionalProperties": True}
    for schema in (open_schema, {"type": "object"}, SCHEMA):
        # `flags` declares no properties; an open schema admits unlisted keys.
        check_schema(parse_template("{{item.flags.anything}}"), schema)
    check_schema(parse_template("{{item.b}}"), open_schema)
    check_schema(parse_template("{{item.anything}}"), None)
