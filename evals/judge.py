"""What a served grader model is asked, and how its reply is read.

Small models follow the last instruction best, so the answer format is appended to the final
user message of the rubric. Replies are read leniently (a JSON object, else the first number
in range / the first label named), and where the platform's vLLM engines can enforce the format
(structured outputs), it is enforced so that a weak grader always answers in form.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "label_constraint",
    "label_instruction",
    "parse_label",
    "parse_score",
    "score_constraint",
    "score_instruction",
    "with_instruction",
]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OBJECT = re.compile(r"\{[^{}]*\}")


def _fmt(x: float) -> str:
    return f"{x:g}"


def score_instruction(low: float, high: float) -> str:
    return (f'Reply with only a JSON object of the form {{"score": N}}, where N is a number '
            f"from {_fmt(low)} to {_fmt(high)}.")


def label_instruction(labels: Sequence[str]) -> str:
    return ("Answer with exactly one of these labels: " + ", ".join(labels)
            + ". Reply with the label only.")


def with_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """The messages with `instruction` appended to the last user message (or added as one),
    so that chat templates that demand alternating roles still accept them."""
    out = [dict(m) for m in messages]
    if out and out[-1]["role"] == "user":
        out[-1]["content"] = f"{out[-1]['content']}\n\n{instruction}"
    else:
        out.append({"role": "user", "content": instruction})
    return out


def score_constraint(low: float, high: float) -> dict[str, Any]:
    """vLLM structured outputs for a score: a bounded JSON object, so generation always ends
    in a parseable reply. The pattern follows the range as far as a regex does simply (no more
    integer digits than the bounds have; 0 to 1 for a [0, 1] range); parsing checks the rest."""
    if low >= 0 and high <= 1:
        number = r"(0(\.\d{1,4})?|1(\.0{1,4})?)"
    else:
        digits = len(str(int(max(abs(low), abs(high)))))
        number = ("-?" if low < 0 else "") + rf"\d{{1,{digits}}}(\.\d{{1,4}})?"
    return {"regex": r'\{"score": ?' + number + r"\}"}


def label_constraint(labels: Sequence[str]) -> dict[str, Any]:
    """vLLM structured outputs for a label: the reply is exactly one of the labels."""
    return {"choice": list(labels)}


def parse_score(reply: str, low: float, high: float) -> tuple[float | None, str | None]:
    """(score, None) or (None, why not): a JSON `score`/`result` field if there is one, else
    the first number in the reply that lies in [low, high]."""
    for candidate in [reply.strip(), *_OBJECT.findall(reply)]:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            value = data.get("score", data.get("result"))
            if isinstance(value, int | float) and not isinstance(value, bool):
                if low <= value <= high:
                    return float(value), None
                return None, f"the grader's score {value} is outside [{_fmt(low)}, {_fmt(high)}]"
    numbers = [float(n) for n in _NUMBER.findall(reply)]
    for number in numbers:
        if low <= number <= high:
            return number, None
    if numbers:
        return None, f"no number in [{_fmt(low)}, {_fmt(high)}] in the grader's reply"
    return None, "no score in the grader's reply"


def parse_label(reply: str, labels: Sequence[str]) -> tuple[str | None, str | None]:
    """(label, None) or (None, why not): the whole reply if it is a label, else a JSON `label`
    field, else the label named first in the reply (whole words, case-insensitive)."""
    by_fold = {label.casefold(): label for label in labels}
    bare = reply.strip().strip("\"'`.!:;*").strip()
    if bare.casefold() in by_fold:
        return by_fold[bare.casefold()], None
    for candidate in _OBJECT.findall(reply):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        value = data.get("label") if isinstance(data, dict) else None
        if isinstance(value, str) and value.strip().casefold() in by_fold:
            return by_fold[value.strip().casefold()], None
    best: tuple[int, int, str] | None = None  # (position, -length, label)
    for label in labels:
        found = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", reply, re.IGNORECASE)
        if found and (best is None or (found.start(), -len(label)) < best[:2]):
            best = (found.start(), -len(label), label)
    if best is not None:
        return best[2], None
    return None, "the grader's reply names none of the labels"
