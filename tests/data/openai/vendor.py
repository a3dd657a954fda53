"""Cut OpenAI's OpenAPI document down to what the conformance tests need: the response schemas
of the operations llmops serves (or is about to), every component they reference, and nothing
else; descriptions, examples and vendor extensions (`x-*`) are left out, the rest verbatim.

    python tests/data/openai/vendor.py PATH/TO/openapi.json COMMIT > tests/data/openai/openapi.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

# Operations whose success answers are kept, as (method, path) in OpenAI's document.
OPERATIONS = [
    ("post", "/chat/completions"), ("post", "/completions"), ("post", "/embeddings"),
    ("get", "/models"), ("get", "/models/{model}"), ("delete", "/models/{model}"),
    ("post", "/files"), ("get", "/files"), ("get", "/files/{file_id}"),
    ("delete", "/files/{file_id}"),
    ("post", "/fine_tuning/jobs"), ("get", "/fine_tuning/jobs"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    ("post", "/vector_stores"), ("get", "/vector_stores"),
    ("get", "/vector_stores/{vector_store_id}"), ("post", "/vector_stores/{vector_store_id}"),
    ("delete", "/vector_stores/{vector_store_id}"),
    ("post", "/vector_stores/{vector_store_id}/files"),
    ("get", "/vector_stores/{vector_store_id}/files"),
    ("get", "/vector_stores/{vector_store_id}/files/{file_id}"),
    ("delete", "/vector_stores/{vector_store_id}/files/{file_id}"),
    ("post", "/vector_stores/{vector_store_id}/search"),
    ("post", "/vector_stores/{vector_store_id}/file_batches"),
    ("get", "/vector_stores/{vector_store_id}/file_batches/{batch_id}"),
    ("post", "/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel"),
    ("get", "/vector_stores/{vector_store_id}/file_batches/{batch_id}/files"),
    ("post", "/evals"), ("get", "/evals"), ("get", "/evals/{eval_id}"),
    ("post", "/evals/{eval_id}"), ("delete", "/evals/{eval_id}"),
    ("post", "/evals/{eval_id}/runs"), ("get", "/evals/{eval_id}/runs"),
    ("get", "/evals/{eval_id}/runs/{run_id}"), ("post", "/evals/{eval_id}/runs/{run_id}"),
    ("delete", "/evals/{eval_id}/runs/{run_id}"),
    ("get", "/evals/{eval_id}/runs/{run_id}/output_items"),
    ("get", "/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"),
    ("post", "/responses"), ("get", "/responses/{response_id}"),
    ("delete", "/responses/{response_id}"), ("post", "/responses/{response_id}/cancel"),
    ("get", "/responses/{response_id}/input_items"),
    ("post", "/conversations"), ("get", "/conversations/{conversation_id}"),
    ("post", "/conversations/{conversation_id}"), ("delete", "/conversations/{conversation_id}"),
    ("post", "/conversations/{conversation_id}/items"),
    ("get", "/conversations/{conversation_id}/items"),
    ("get", "/conversations/{conversation_id}/items/{item_id}"),
    ("delete", "/conversations/{conversation_id}/items/{item_id}"),
    ("post", "/batches"), ("get", "/batches"), ("get", "/batches/{batch_id}"),
    ("post", "/batches/{batch_id}/cancel"),
]
# Components kept even where no kept operation names them (an object's own name, a stream
# event's variants are reached through ResponseStreamEvent, the values a response request's
# `include` may hold).
COMPONENTS = ["Error", "ErrorResponse", "FineTuningJobEvent", "FineTuningJobCheckpoint",
              "VectorStoreSearchResultItem", "DeletedConversation", "ConversationItem",
              "ResponseStreamEvent", "IncludeEnum"]

# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SCHEMA = {"items", "not", "additionalProperties", "if", "then", "else", "contains",
           "propertyNames", "unevaluatedItems", "unevaluatedProperties",
           "additionalItems"}
_SCHEMAS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_NAMED = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_DROPPED = {"description", "example", "examples", "title", "deprecated", "$comment"}


def trim(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED or key.startswith("x-"):
            continue
        if key in _SCHEMA:
            out[key] = trim(value)
        elif key in _SCHEMAS:
            out[key] = [trim(v) for v in value]
        elif key in _NAMED:
            out[key] = {name: trim(v) for name, v in value.items()}
        else:  # enum, const, default, required, type, format, $ref, discriminator...
            out[key] = value
    return out


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[1]
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def main() -> None:
    source, commit = sys.argv[1], sys.argv[2]
    with open(source) as f:
        doc = json.load(f)
    paths: dict[str, dict[str, Any]] = {}
    for method, path in OPERATIONS:
        responses = doc["paths"][path][method]["responses"]
        kept = {status: {"content": {media: {"schema": trim(body["schema"])}
                                     for media, body in answer.get("content", {}).items()}}
                for status, answer in responses.items() if status.startswith("2")}
        paths.setdefault(path, {})[method] = {"responses": kept}
    schemas = doc["components"]["schemas"]
    wanted, pending = set(), [*COMPONENTS, *refs(paths)]
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(refs(schemas[name]))
    json.dump({
        "openapi": doc["openapi"],
        "info": {"title": doc["info"]["title"], "version": doc["info"]["version"],
                 "x-source": f"https://github.com/openai/openai-openapi/blob/{commit}/"
                             "openapi.json (MIT licence), trimmed by vendor.py"},
        "paths": paths,
        "components": {"schemas": {n: trim(schemas[n]) for n in sorted(wanted)}},
    }, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
