"""A stored response's stream, replayed: the events a client would have seen, rebuilt from
the finished Response object (`GET /v1/responses/{id}?stream=true` of a background response
whose live events have expired), each with its `sequence_number`, from `starting_after` on.
A cancelled response's replay ends without a terminal event, as its live stream does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from conversations.events import ENDINGS, frame

__all__ = ["replay"]


def replay(final: dict[str, Any], starting_after: int | None = None) -> Iterator[bytes]:
    for seq, (kind, fields) in enumerate(_events(final)):
        if starting_after is None or seq > starting_after:
            yield frame({"type": kind, "sequence_number": seq, **fields})


def _events(final: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    start = {k: v for k, v in final.items() if k not in ("usage", "completed_at")}
    start.update(status="in_progress", output=[])
    yield "response.created", {"response": start}
    yield "response.in_progress", {"response": start}
    for index, item in enumerate(final.get("output") or []):
        yield "response.output_item.added", {"output_index": index, "item": item}
        if item.get("type") == "message":
            for c, part in enumerate(item.get("content") or []):
                where = {"item_id": item["id"], "output_index": index, "content_index": c}
                text = part.get("text", "")
                yield "response.content_part.added", {
                    **where, "part": {**part, "text": "", "annotations": []}}
                yield "response.output_text.delta", {**where, "delta": text, "logprobs": []}
                yield "response.output_text.done", {**where, "text": text, "logprobs": []}
                yield "response.content_part.done", {**where, "part": part}
        elif item.get("type") == "function_call":
            yield "response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"],
                "arguments": item["arguments"]}
        yield "response.output_item.done", {"output_index": index, "item": item}
    if (end := ENDINGS.get(final.get("status", ""))) is not None:
        yield end, {"response": final}
