"""Strict conformance with OpenAI's published schemas: `assert_conforms(obj, "OpenAIFile")`
validates an object as OpenAI's OpenAPI document defines that component, and
`assert_conforms(obj, "DELETE /evals/{eval_id}")` as the success answer of that operation (for
answers OpenAI describes inline). The document is vendored in tests/data/openai (see its
README), cut down to what llmops serves or is about to.

The document says OpenAPI 3.1, so its schemas are JSON Schema 2020-12 (`anyOf [..., null]`
for what may be null), but some of them still carry OpenAPI 3.0's keywords: `nullable: true`
is honoured as 3.0 means it (the value may also be null), and a boolean `exclusiveMinimum`
(`exclusiveMaximum`) makes its `minimum` (`maximum`) exclusive. Everything else is as
written: an optional property that is not nullable may be absent but never null, and an object
closed with `additionalProperties: false` takes no property it does not name. Open objects take
our extensions, as they take OpenAI's future fields.

One exception, listed in `OPENAI_ANSWERS_NULL`: where OpenAI's own API answers null although
its schema has no room for it (its reference examples show the null), llmops answers as OpenAI
does, and null is accepted there and nowhere else."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["DOCUMENT", "OPENAI_ANSWERS_NULL", "assert_conforms", "conformance_errors",
           "schema_names"]

DOCUMENT = Path(__file__).parent / "data" / "openai" / "openapi.json"
_URI = "urn:openai:openapi"

# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SCHEMA = {"items", "not", "additionalProperties", "if", "then", "else", "contains",
           "propertyNames", "unevaluatedItems", "unevaluatedProperties", "additionalItems"}
_SCHEMAS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_NAMED = {"properties", "patternProperties", "$defs", "dependentSchemas"}

# (component, property path): an eval run without error, and a sample without error, answer
# `"error": null` in OpenAI's examples of both objects, where the schema requires an object.
OPENAI_ANSWERS_NULL = [("EvalRun", ("error",)), ("EvalRunOutputItem", ("sample", "error"))]


def _json_schema(schema: Any) -> Any:
    """`schema` with OpenAPI 3.0's keywords said in JSON Schema 2020-12."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA:
            out[key] = _json_schema(value)
        elif key in _SCHEMAS:
            out[key] = [_json_schema(v) for v in value]
        elif key in _NAMED:
            out[key] = {name: _json_schema(v) for name, v in value.items()}
        elif key != "nullable":
            out[key] = value
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(exclusive), bool) and out.pop(exclusive) and bound in out:
            out[exclusive] = out.pop(bound)
    # 3.0's nullable: the schema (without the keyword), or null.
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") is True else out


@functools.cache
def _document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DOCUMENT.read_text())
    doc["components"]["schemas"] = {name: _json_schema(s)
                                    for name, s in doc["components"]["schemas"].items()}
    for operations in doc["paths"].values():
        for operation in operations.values():
            for answer in operation["responses"].values():
                for body in answer["content"].values():
                    body["schema"] = _json_schema(body["schema"])
    for name, path in OPENAI_ANSWERS_NULL:
        parent = doc["components"]["schemas"][name]
        for part in path[:-1]:
            parent = parent["properties"][part]
        parent["properties"][path[-1]] = {"anyOf": [parent["properties"][path[-1]],
                                                    {"type": "null"}]}
    return doc


@functools.cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = Resource.from_contents(_document(),
                                                     default_specification=DRAFT202012)
    return Registry().with_resource(_URI, resource)


def _pointer(name: str) -> str:
    """The JSON pointer of a component's schema, or of an operation's success answer
    ("METHOD /path", JSON unless a media type follows: "POST /responses text/event-stream")."""
    doc = _document()
    if " " not in name:
        if name not in doc["components"]["schemas"]:
            raise KeyError(f"{name} is not among the vendored components")
        return f"#/components/schemas/{name}"
    method, path, *media = name.split(" ")
    operation = doc["paths"].get(path, {}).get(method.lower())
    if operation is None:
        raise KeyError(f"{name}: no such operation is vendored")
    found = next(((s, a) for s, a in sorted(operation["responses"].items()) if a["content"]),
                 None)
    if found is None:
        raise KeyError(f"{name}: OpenAI describes no answer body")
    status, answer = found
    kind = media[0] if media else "application/json"
    if kind not in answer["content"]:
        raise KeyError(f"{name}: OpenAI describes no {kind} answer")

    def escape(part: str) -> str:
        return part.replace("~", "~0").replace("/", "~1")

    return "#/" + "/".join(escape(p) for p in (
        "paths", path, method.lower(), "responses", status, "content", kind, "schema"))


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": _URI + _pointer(name)}, registry=_registry())


def schema_names() -> list[str]:
    """Every vendored component's name."""
    return sorted(_document()["components"]["schemas"])


def conformance_errors(obj: object, name: str) -> list[str]:
    """What is wrong with `obj` as `name` (a component, or an operation's answer), one line a
    fault, each naming where: `$.choices[0].message.annotations: None is not of type 'array'`.
    Empty when it conforms."""
    lines = []
    for error in sorted(_validator(name).iter_errors(obj), key=lambda e: list(e.path)):
        lines.append(f"{error.json_path}: {error.message}")
        # An alternative that fits nowhere: say why the closest alternative did not.
        lines += [f"  {sub.json_path}: {sub.message}" for sub in _closest(error)]
    return lines


def _closest(error: ValidationError) -> list[ValidationError]:
    if not error.context:
        return []
    by_branch: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        by_branch.setdefault(sub.schema_path[0] if sub.schema_path else None, []).append(sub)
    # The branch whose faults lie deepest got furthest; among those, the one with fewest.
    return min(by_branch.values(), key=lambda errs: (-max(len(e.path) for e in errs),
                                                     len(errs)))


def assert_conforms(obj: object, name: str) -> None:
    """Fail, listing every fault, unless `obj` is valid as OpenAI's `name`."""
    if errors := conformance_errors(obj, name):
        text = json.dumps(obj)
        raise AssertionError(f"not a conforming {name}:\n  " + "\n  ".join(errors)
                             + f"\nobject: {text[:2000]}")
