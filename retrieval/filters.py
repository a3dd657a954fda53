"""OpenAI's vector-store search `filters`, validated into a small engine-neutral tree.

Both index adapters translate the same tree into their library's filter types, so filter
semantics (and their validation errors) are identical on Qdrant Edge and a Qdrant server.
Attribute `key` is matched against the point payload's `attributes.<key>`.

Semantics: `eq`/`in` on strings and booleans are exact matches; on numbers they are closed
ranges, so 3 matches a stored 3.0; `gt`/`gte`/`lt`/`lte` accept numbers only. `ne` and `nin`
are negations, so they also match points that lack the attribute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "And",
    "Condition",
    "HasId",
    "InvalidFilterError",
    "Match",
    "MatchAny",
    "Not",
    "Or",
    "Range",
    "parse_filters",
]

_COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
_COMPOUNDS = ("and", "or")
# Qdrant reads these as JSON-path syntax inside a key; OpenAI keys are plain names.
_PATH_CHARACTERS = frozenset('.[]"')
_MAX_KEY_CHARS = 64
_MAX_DEPTH = 8


class InvalidFilterError(ValueError):
    """A malformed filter; `param` is the path of the offending field, e.g. `filters.type`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[InvalidFilterError], tuple[str, str]]:
        return type(self), (str(self), self.param)  # survives pickling (Celery)


@dataclass(frozen=True)
class Match:
    """Payload `key` equals `value` exactly (keyword or boolean)."""

    key: str
    value: str | bool


@dataclass(frozen=True)
class MatchAny:
    """Payload `key` is one of `values`."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """Payload `key` is a number within the given bounds."""

    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class HasId:
    """The point's id is one of `ids`."""

    ids: tuple[str, ...]


@dataclass(frozen=True)
class And:
    """Every condition holds."""

    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Or:
    """At least one condition holds."""

    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    """The condition does not hold."""

    condition: Condition


Condition = Match | MatchAny | Range | HasId | And | Or | Not


def parse_filters(obj: Any, param: str = "filters") -> Condition:
    """The condition for an OpenAI comparison or compound filter; raises InvalidFilterError."""
    return _parse(obj, param, 0)


def _parse(obj: Any, param: str, depth: int) -> Condition:
    if depth > _MAX_DEPTH:
        raise InvalidFilterError(f"{param} nests filters too deeply (at most {_MAX_DEPTH}).",
                                 param)
    if not isinstance(obj, dict):
        raise InvalidFilterError(f"{param} must be an object.", param)
    kind = obj.get("type")
    if kind in _COMPOUNDS:
        return _compound(obj, kind, param, depth)
    if kind in _COMPARISONS:
        return _comparison(obj, kind, param)
    allowed = ", ".join(repr(k) for k in (*_COMPARISONS, *_COMPOUNDS))
    raise InvalidFilterError(f"Invalid {param}.type {kind!r}: expected one of {allowed}.",
                             f"{param}.type")


def _compound(obj: dict[str, Any], kind: str, param: str, depth: int) -> Condition:
    _only_keys(obj, {"type", "filters"}, param)
    filters = obj.get("filters")
    if not isinstance(filters, list) or not filters:
        raise InvalidFilterError(f"{param}.filters must be a non-empty list of filters.",
                                 f"{param}.filters")
    parts = tuple(_parse(f, f"{param}.filters[{i}]", depth + 1) for i, f in enumerate(filters))
    return And(parts) if kind == "and" else Or(parts)


def _comparison(obj: dict[str, Any], kind: str, param: str) -> Condition:
    _only_keys(obj, {"type", "key", "value"}, param)
    key = obj.get("key")
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_CHARS:
        raise InvalidFilterError(
            f"{param}.key must be a non-empty string of at most {_MAX_KEY_CHARS} characters.",
            f"{param}.key")
    if _PATH_CHARACTERS & set(key):
        raise InvalidFilterError(f'{param}.key must not contain any of . [ ] ".',
                                 f"{param}.key")
    path = f"attributes.{key}"
    value = obj.get("value")
    vparam = f"{param}.value"
    if kind in ("in", "nin"):
        if not isinstance(value, list) or not value:
            raise InvalidFilterError(f"{vparam} must be a non-empty list for '{kind}'.", vparam)
        items = [_scalar(v, f"{vparam}[{i}]") for i, v in enumerate(value)]
        if all(isinstance(v, str) for v in items):
            found: Condition = MatchAny(path, tuple(str(v) for v in items))
        else:
            found = Or(tuple(_equals(path, v) for v in items))
        return found if kind == "in" else Not(found)
    scalar = _scalar(value, vparam)
    if kind in ("eq", "ne"):
        return _equals(path, scalar) if kind == "eq" else Not(_equals(path, scalar))
    if isinstance(scalar, (str, bool)):
        raise InvalidFilterError(f"{vparam} must be a number for '{kind}'.", vparam)
    return Range(path, **{kind: float(scalar)})


def _equals(path: str, value: str | bool | float) -> Condition:
    if isinstance(value, (str, bool)):
        return Match(path, value)
    return Range(path, gte=float(value), lte=float(value))


def _scalar(value: Any, param: str) -> str | bool | float:
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    raise InvalidFilterError(f"{param} must be a string, a finite number or a boolean.", param)


def _only_keys(obj: dict[str, Any], allowed: set[str], param: str) -> None:
    for key in obj:
        if key not in allowed:
            raise InvalidFilterError(f"Unknown parameter: '{param}.{key}'.", f"{param}.{key}")
