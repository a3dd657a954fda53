"""OpenAI's cursor pages: `{"object": "list", "data", "first_id", "last_id", "has_more"}`, with
`limit` bounded and `after` naming the last item of the previous page."""

from __future__ import annotations

from typing import Any

from llmops.errors import BadRequestError

__all__ = ["bounded", "page"]


def page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """An empty page's `first_id` and `last_id` are empty: OpenAI's schema has them as
    strings that are always there, never null."""
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else "",
            "last_id": data[-1]["id"] if data else ""}


def bounded(limit: int, most: int = 100) -> int:
    """`limit` itself, refused outside 1..most (100 for most lists, 10,000 for files)."""
    if not 1 <= limit <= most:
        raise BadRequestError(f"'limit' must be between 1 and {most}.", param="limit")
    return limit
