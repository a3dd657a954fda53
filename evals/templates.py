"""Grader templates: `{{item.x}}`, `{{item.a.b[0]}}`, `{{sample.output_text}}` and the like.

OpenAI's graders substitute `{{ namespace.path }}` from two namespaces: `item` (one row of the
eval's data) and `sample` (the evaluated model's answer: `output_text`, `output_json`, ...).
A template is parsed once, when its grader is validated, and rendered once per item. With the
eval's item schema at hand, references the schema cannot satisfy are rejected up front;
without it, a reference the item lacks is a clear per-item error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NAMESPACES",
    "SAMPLE_FIELDS",
    "Reference",
    "Template",
    "TemplateError",
    "check_schema",
    "parse_template",
]

NAMESPACES = ("item", "sample")
# What a sampling step can produce (OpenAI's sample namespace); anything else is a typo.
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices")

_TAG = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# A path: `.key` (any characters but dots, brackets, braces and spaces) or `[index]`.
_SEGMENT = re.compile(r"\.([^.\[\]{}\s]+)|\[(\d+)\]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateError(ValueError):
    """A template that cannot be parsed, checked or rendered; the message says why."""


@dataclass(frozen=True)
class Reference:
    """One `{{namespace.path}}` in a template."""

    namespace: str
    path: tuple[str | int, ...]

    def __str__(self) -> str:
        text = self.namespace
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else f".{part}"
        return "{{" + text + "}}"

    def resolve(self, context: Mapping[str, Any]) -> Any:
        """The referenced value; raises TemplateError naming what is missing."""
        value: Any = context.get(self.namespace)
        if value is None:
            raise TemplateError(f"{self}: the {self.namespace} namespace is empty")
        walked = self.namespace
        for part in self.path:
            if isinstance(value, Mapping) and str(part) in value:
                value = value[str(part)]
            elif isinstance(value, list) and (i := _index(part, len(value))) is not None:
                value = value[i]
            else:
                raise TemplateError(f"{self}: {walked} has no {_describe(part)}")
            walked += f"[{part}]" if isinstance(part, int) else f".{part}"
        return value


@dataclass(frozen=True)
class Template:
    """Literal text and references, in order."""

    source: str
    parts: tuple[str | Reference, ...]

    @property
    def references(self) -> tuple[Reference, ...]:
        return tuple(p for p in self.parts if isinstance(p, Reference))

    def render(self, context: Mapping[str, Any]) -> str:
        """Substitute every reference: strings as they are, anything else as JSON."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part.resolve(context)
                out.append(value if isinstance(value, str)
                           else json.dumps(value, ensure_ascii=False))
        return "".join(out)


def parse_template(source: str) -> Template:
    """Parse `source`; raises TemplateError for an unknown namespace or a malformed tag."""
    parts: list[str | Reference] = []
    pos = 0
    for tag in _TAG.finditer(source):
        if tag.start() > pos:
            parts.append(source[pos:tag.start()])
        parts.append(_reference(tag.group(1).strip()))
        pos = tag.end()
    rest = source[pos:]
    if "{{" in rest:
        raise TemplateError(f"unclosed '{{{{' in template: {_excerpt(rest)}")
    if rest:
        parts.append(rest)
    return Template(source, tuple(parts))


def check_schema(template: Template, item_schema: Mapping[str, Any] | None) -> None:
    """Reject references no item or sample can satisfy. `sample` fields are known up front;
    `item` paths are checked against the item schema where it declares its properties."""
    for ref in template.references:
        if ref.namespace == "sample":
            if ref.path and ref.path[0] not in SAMPLE_FIELDS:
                raise TemplateError(f"{ref}: the sample namespace has {', '.join(SAMPLE_FIELDS)}"
                                    f", not {ref.path[0]!r}")
        elif item_schema is not None:
            _check_path(ref, item_schema)


def _reference(expr: str) -> Reference:
    head = _NAME.match(expr)
    if head is None:
        raise TemplateError(f"'{{{{{expr}}}}}' is not a reference: use {{{{item.<field>}}}} or "
                            "{{sample.output_text}}")
    namespace = head.group(0)
    if namespace not in NAMESPACES:
        raise TemplateError(f"'{{{{{expr}}}}}': unknown namespace {namespace!r} (the namespaces "
                            "are item and sample)")
    path: list[str | int] = []
    pos = head.end()
    while pos < len(expr):
        segment = _SEGMENT.match(expr, pos)
        if segment is None:
            raise TemplateError(f"'{{{{{expr}}}}}' is not a valid reference path")
        key, index = segment.groups()
        path.append(int(index) if index is not None else key)
        pos = segment.end()
    return Reference(namespace, tuple(path))


def _check_path(ref: Reference, schema: Mapping[str, Any]) -> None:
    node: Any = schema
    walked = "item"
    for part in ref.path:
        if not isinstance(node, Mapping) or _open(node):
            return  # the schema does not say what lies below: the item will tell
        props = node.get("properties")
        items = node.get("items")
        if isinstance(props, Mapping) and str(part) in props:
            node = props[str(part)]
        elif isinstance(items, Mapping) and (isinstance(part, int) or str(part).isdigit()):
            node = items
        elif isinstance(props, Mapping) or isinstance(items, Mapping):
            known = ", ".join(sorted(props)) if isinstance(props, Mapping) else "array items"
            raise TemplateError(f"{ref}: the item schema has no {_describe(part)} in {walked} "
                                f"(it has: {known or 'nothing'})")
        else:
            return
        walked += f"[{part}]" if isinstance(part, int) else f".{part}"


def _open(node: Mapping[str, Any]) -> bool:
    """Whether a schema node admits keys it does not list (or is too dynamic to check)."""
    extra = node.get("additionalProperties")
    return (extra is True or isinstance(extra, Mapping) or "patternProperties" in node
            or any(k in node for k in ("$ref", "anyOf", "oneOf", "allOf")))


def _index(part: str | int, length: int) -> int | None:
    if isinstance(part, int) or part.isdigit():
        i = int(part)
        return i if i < length else None
    return None


def _describe(part: str | int) -> str:
    return f"index {part}" if isinstance(part, int) else f"field {part!r}"


def _excerpt(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
