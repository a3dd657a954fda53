"""OpenAI search filters: validation errors name the offending field."""

from __future__ import annotations

from typing import Any

import pytest

from retrieval import InvalidFilterError, parse_filters
from retrieval.filters import And, Match, MatchAny, Not, Or, Range


def test_comparisons_become_conditions_on_attributes() -> None:
    assert parse_filters({"type": "eq", "key": "lang", "value": "en"}) == Match(
        "attributes.lang", "en")
    assert parse_filters({"type": "eq", "key": "draft", "value": False}) == Match(
        "attributes.draft", False)
    assert parse_filters({"type": "eq", "key": "year", "value": 2024}) == Range(
        "attributes.year", gte=2024.0, lte=2024.0)
    assert parse_filters({"type": "gt", "key": "year", "value": 2020}) == Range(
        "attributes.year", gt=2020.0)
    assert parse_filters({"type": "nin", "key": "lang", "value": ["en", "fr"]}) == Not(
        MatchAny("attributes.lang", ("en", "fr")))


def test_compound_filters_nest() -> None:
    parsed = parse_filters({"type": "or", "filters": [
        {"type": "ne", "key": "a", "value": "x"},
        {"type": "and", "filters": [{"type": "lte", "key": "b", "value": 2.5},
                                    {"type": "in", "key": "c", "value": [1, "two"]}]}]})
    assert parsed == Or((
        Not(Match("attributes.a", "x")),
        And((Range("attributes.b", lte=2.5),
             Or((Range("attributes.c", gte=1.0, lte=1.0), Match("attributes.c", "two")))))))


@pytest.mark.parametrize(("filters", "param", "message"), [
    ([], "filters", "must be an object"),
    ({"type": "like", "key": "a", "value": "x"}, "filters.type", "Invalid filters.type 'like'"),
    ({"type": "and", "filters": []}, "filters.filters", "non-empty list"),
    ({"type": "and", "filters": [{"type": "eq", "key": "a", "value": 1}, {"key": "b"}]},
     "filters.filters[1].type", "expected one of"),
    ({"type": "or", "filters": [{"type": "and", "filters": [
        {"type": "eq", "key": "", "value": 1}]}]},
     "filters.filters[0].filters[0].key", "non-empty string"),
    ({"type": "eq", "key": "a.b", "value": 1}, "filters.key", "must not contain"),
    ({"type": "eq", "key": "a"}, "filters.value", "string, a finite number or a boolean"),
    ({"type": "eq", "key": "a", "value": {"x": 1}}, "filters.value", "finite number"),
    ({"type": "gt", "key": "a", "value": "2024"}, "filters.value", "must be a number for 'gt'"),
    ({"type": "gte", "key": "a", "value": True}, "filters.value", "must be a number"),
    ({"type": "in", "key": "a", "value": "x"}, "filters.value", "non-empty list for 'in'"),
    ({"type": "in", "key": "a", "value": ["x", None]}, "filters.value[1]", "finite number"),
    ({"type": "eq", "key": "a", "value": float("nan")}, "filters.value", "finite number"),
    ({"type": "eq", "key": "a", "value": 1, "extra": 2}, "filters.extra", "Unknown parameter"),
])
def test_invalid_filters_name_the_field(filters: Any, param: str, message: str) -> None:
    with pytest.raises(InvalidFilterError) as info:
        parse_filters(filters)
    assert info.value.param == param
    assert message in str(info.value)
