"""Graders in OpenAI's Evals API shape: parse a `testing_criteria` entry, then grade one item.

`parse_grader` validates a spec once (when the eval is created) and returns a frozen grader;
`grade` renders its templates against one data item and sampled answer and returns a `Grade`.
Model graders and the `cosine` metric reach served models through the `ModelClient` that the
runner provides. Anything that goes wrong for one item (a field the item lacks, a failed model
call, a reply that cannot be read) becomes that item's `Grade.error`: never a pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal, Protocol, TypeGuard

from evals import judge, similarity
from evals.templates import Template, TemplateError, check_schema, parse_template

__all__ = [
    "Grade",
    "Grader",
    "GraderError",
    "LabelModelGrader",
    "Message",
    "ModelClient",
    "ScoreModelGrader",
    "StringCheckGrader",
    "TextSimilarityGrader",
    "grade",
    "parse_criteria",
    "parse_grader",
]

Operation = Literal["eq", "ne", "like", "ilike"]
OPERATIONS: tuple[Operation, ...] = ("eq", "ne", "like", "ilike")
METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
           "rouge_l", "cosine")
ROLES = ("system", "developer", "user", "assistant")
# Stored per item: enough to see what the grader model said, never an unbounded blob.
MAX_DETAIL_CHARS = 2000
_DEFAULT_MAX_TOKENS = 64

_TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": similarity.fuzzy_match,
    "bleu": similarity.bleu,
    "gleu": similarity.gleu,
    "rouge_l": similarity.rouge_l,
    **{f"rouge_{n}": partial(similarity.rouge_n, n=n) for n in range(1, 6)},
}


class GraderError(ValueError):
    """A grader spec is invalid; `param` names the offending field, OpenAI style
    (`testing_criteria[0].operation`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelClient(Protocol):
    """How graders reach served models; the runner implements it over the gateway's HTTP API
    (so limits and the ledger apply), with a timeout on every call. `params` are fields of the
    chat completions request body: OpenAI's (`temperature`, `max_tokens`, `seed`, `top_p`,
    `reasoning_effort`) and vLLM's `structured_outputs`, to be sent as they are."""

    async def chat(self, model: str, messages: list[dict[str, Any]], **params: Any) -> str: ...

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


@dataclass(frozen=True)
class Grade:
    """One criterion's verdict on one item. An item with `error` set never counts as passed;
    `detail` holds what explains the verdict (e.g. the grader model's raw reply)."""

    name: str
    passed: bool
    score: float | None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    role: str
    content: Template


@dataclass(frozen=True)
class StringCheckGrader:
    type: ClassVar[str] = "string_check"
    name: str
    input: Template
    reference: Template
    operation: Operation


@dataclass(frozen=True)
class TextSimilarityGrader:
    type: ClassVar[str] = "text_similarity"
    name: str
    input: Template
    reference: Template
    evaluation_metric: str
    pass_threshold: float


@dataclass(frozen=True)
class ScoreModelGrader:
    type: ClassVar[str] = "score_model"
    name: str
    model: str
    input: tuple[Message, ...]
    range: tuple[float, float]
    pass_threshold: float
    """Passing means score >= pass_threshold; without one in the spec, the range's midpoint."""
    sampling_params: dict[str, Any] = field(default_factory=dict, hash=False)
    """Chat request fields (OpenAI names), already mapped from OpenAI's `sampling_params`."""


@dataclass(frozen=True)
class LabelModelGrader:
    type: ClassVar[str] = "label_model"
    name: str
    model: str
    input: tuple[Message, ...]
    labels: tuple[str, ...]
    passing_labels: tuple[str, ...]


Grader = StringCheckGrader | TextSimilarityGrader | ScoreModelGrader | LabelModelGrader

_KEYS: dict[str, set[str]] = {
    "string_check": {"type", "name", "input", "reference", "operation"},
    "text_similarity": {"type", "name", "input", "reference", "evaluation_metric",
                        "pass_threshold"},
    "score_model": {"type", "name", "model", "input", "range", "pass_threshold",
                    "sampling_params"},
    "label_model": {"type", "name", "model", "input", "labels", "passing_labels"},
}


def parse_criteria(
    specs: list[dict[str, Any]], item_schema: dict[str, Any] | None = None
) -> list[Grader]:
    """Validate an eval's `testing_criteria`; errors name `testing_criteria[i].field`."""
    if not isinstance(specs, list) or not specs:
        raise GraderError("testing_criteria must be a non-empty list of graders",
                          "testing_criteria")
    graders = [parse_grader(spec, item_schema, f"testing_criteria[{i}]")
               for i, spec in enumerate(specs)]
    seen: set[str] = set()
    for i, grader in enumerate(graders):
        if grader.name in seen:
            raise GraderError(f"two testing criteria are named {grader.name!r}: names must be "
                              "unique, results are reported by name",
                              f"testing_criteria[{i}].name")
        seen.add(grader.name)
    return graders


def parse_grader(
    spec: dict[str, Any], item_schema: dict[str, Any] | None = None, param: str = "grader"
) -> Grader:
    """Validate one grader spec (OpenAI's shape) and build its grader; raises `GraderError`
    naming the offending field under `param`. With `item_schema`, every `{{item.*}}` reference
    must be one the schema allows."""
    p = _Spec(spec, param, item_schema)
    kind = p.text("type")
    if kind in ("python", "multi"):
        raise GraderError(f"grader type {kind!r} is not supported here: use string_check, "
                          "text_similarity, score_model or label_model", p.at("type"))
    if kind not in _KEYS:
        raise GraderError(f"unknown grader type {kind!r}: use string_check, text_similarity, "
                          "score_model or label_model", p.at("type"))
    for key in spec:
        if key not in _KEYS[kind]:
            raise GraderError(f"unknown parameter {key!r} for a {kind} grader", p.at(key))
    name = p.text("name")
    if kind == "string_check":
        operation = p.text("operation")
        if operation not in OPERATIONS:
            raise GraderError(f"operation must be one of {', '.join(OPERATIONS)}, not "
                              f"{operation!r}", p.at("operation"))
        return StringCheckGrader(name, p.template("input"), p.template("reference"),
                                 operation)
    if kind == "text_similarity":
        return _text_similarity(p, name)
    model = p.text("model")
    messages = p.messages("input")
    if kind == "score_model":
        return _score_model(p, name, model, messages)
    labels = p.labels("labels")
    passing = p.labels("passing_labels")
    stray = [label for label in passing if label not in labels]
    if stray:
        raise GraderError(f"passing_labels must be a subset of labels; {stray[0]!r} is not a "
                          "label", p.at("passing_labels"))
    return LabelModelGrader(name, model, messages, labels, passing)


def _text_similarity(p: _Spec, name: str) -> TextSimilarityGrader:
    metric = p.text("evaluation_metric")
    if metric == "meteor":
        raise GraderError("evaluation_metric 'meteor' is not supported: METEOR needs WordNet "
                          "synonym matching, which this platform does not ship; use rouge_l, "
                          "bleu, gleu, fuzzy_match or cosine", p.at("evaluation_metric"))
    if metric not in METRICS:
        raise GraderError(f"evaluation_metric must be one of {', '.join(METRICS)}, not "
                          f"{metric!r}", p.at("evaluation_metric"))
    threshold = p.number("pass_threshold")
    low = -1.0 if metric == "cosine" else 0.0
    if not low <= threshold <= 1.0:
        raise GraderError(f"pass_threshold for {metric} must lie in [{low:g}, 1], not "
                          f"{threshold:g}", p.at("pass_threshold"))
    return TextSimilarityGrader(name, p.template("input"), p.template("reference"), metric,
                                threshold)


def _score_model(p: _Spec, name: str, model: str, messages: tuple[Message, ...]
                 ) -> ScoreModelGrader:
    bounds = p.spec.get("range", [0, 1])
    if (not isinstance(bounds, list | tuple) or len(bounds) != 2
            or not all(_is_number(b) for b in bounds) or not bounds[0] < bounds[1]):
        raise GraderError("range must be two numbers [low, high] with low < high",
                          p.at("range"))
    low, high = float(bounds[0]), float(bounds[1])
    if "pass_threshold" in p.spec:
        threshold = p.number("pass_threshold")
        if not low <= threshold <= high:
            raise GraderError(f"pass_threshold must lie in the range [{low:g}, {high:g}]",
                              p.at("pass_threshold"))
    else:
        threshold = (low + high) / 2
    return ScoreModelGrader(name, model, messages, (low, high), threshold,
                            p.sampling_params("sampling_params"))


@dataclass
class _Spec:
    """Typed reads of one grader spec, each error naming its field."""

    spec: dict[str, Any]
    param: str
    item_schema: dict[str, Any] | None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, dict):
            raise GraderError("a grader must be a JSON object", self.param)

    def at(self, key: str) -> str:
        return f"{self.param}.{key}"

    def text(self, key: str) -> str:
        value = self.spec.get(key)
        if not isinstance(value, str) or not value.strip():
            raise GraderError(f"{key} is required and must be a non-empty string", self.at(key))
        return value

    def number(self, key: str) -> float:
        value = self.spec.get(key)
        if not _is_number(value):
            raise GraderError(f"{key} is required and must be a number", self.at(key))
        return float(value)

    def template(self, key: str, value: Any = None, param: str | None = None) -> Template:
        value = self.spec.get(key) if value is None else value
        param = param or self.at(key)
        if not isinstance(value, str):
            raise GraderError(f"{key} must be a string (it may hold {{{{item.*}}}} and "
                              "{{sample.*}} references)", param)
        try:
            template = parse_template(value)
            check_schema(template, self.item_schema)
        except TemplateError as exc:
            raise GraderError(str(exc), param) from None
        return template

    def messages(self, key: str) -> tuple[Message, ...]:
        value = self.spec.get(key)
        if not isinstance(value, list) or not value:
            raise GraderError(f"{key} must be a non-empty list of messages", self.at(key))
        out = []
        for i, message in enumerate(value):
            where = f"{self.at(key)}[{i}]"
            if not isinstance(message, dict):
                raise GraderError("a message must be an object with role and content", where)
            if message.get("type", "message") != "message":
                raise GraderError("a message's type must be 'message'", f"{where}.type")
            extra = set(message) - {"role", "content", "type"}
            if extra:
                raise GraderError(f"unknown parameter {sorted(extra)[0]!r} in a message",
                                  f"{where}.{sorted(extra)[0]}")
            role = message.get("role")
            if role not in ROLES:
                raise GraderError(f"role must be one of {', '.join(ROLES)}", f"{where}.role")
            text = _content_text(message.get("content"), f"{where}.content")
            out.append(Message(role, self.template("content", text, f"{where}.content")))
        return tuple(out)

    def labels(self, key: str) -> tuple[str, ...]:
        value = self.spec.get(key)
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise GraderError(f"{key} must be a non-empty list of non-empty strings",
                              self.at(key))
        folded = [v.strip().casefold() for v in value]
        if len(set(folded)) != len(folded):
            raise GraderError(f"{key} must not repeat a label (labels are matched "
                              "case-insensitively)", self.at(key))
        return tuple(v.strip() for v in value)

    def sampling_params(self, key: str) -> dict[str, Any]:
        value = self.spec.get(key) or {}
        if not isinstance(value, dict):
            raise GraderError(f"{key} must be an object", self.at(key))
        params: dict[str, Any] = {}
        for name, setting in value.items():
            where = f"{self.at(key)}.{name}"
            if setting is None:
                continue
            if name in ("max_completions_tokens", "max_completion_tokens", "seed"):
                if not isinstance(setting, int) or isinstance(setting, bool) or (
                        name != "seed" and setting < 1):
                    raise GraderError(f"{name} must be a positive integer", where)
                params["seed" if name == "seed" else "max_tokens"] = setting
            elif name in ("temperature", "top_p"):
                if not _is_number(setting) or setting < 0:
                    raise GraderError(f"{name} must be a non-negative number", where)
                params[name] = float(setting)
            elif name == "reasoning_effort":
                if not isinstance(setting, str):
                    raise GraderError(f"{name} must be a string", where)
                params[name] = setting
            else:
                raise GraderError(f"unknown sampling parameter {name!r}", where)
        return params


def _content_text(content: Any, where: str) -> str:
    """A message's content as one text: a string, or text parts (input_text / output_text)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for i, part in enumerate(parts):
        at = f"{where}[{i}]" if isinstance(content, list) else where
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise GraderError("a text part needs a string 'text'", f"{at}.text")
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") in ("input_image", "input_audio"):
            raise GraderError(f"{part['type']} content is not supported: grader models here "
                              "are sent text", f"{at}.type")
        else:
            raise GraderError("content must be a string or text parts (input_text, "
                              "output_text)", at)
    if not texts:
        raise GraderError("content must not be empty", where)
    return "\n".join(texts)


def _is_number(value: Any) -> TypeGuard[float]:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


async def grade(
    grader: Grader,
    item: dict[str, Any],
    sample: dict[str, Any],
    client: ModelClient,
    *,
    structured_outputs: bool = True,
) -> Grade:
    """Grade one item against one sampled answer (`{"output_text": ..., "output_json"?: ...}`;
    `output_json` is derived from `output_text` when that is a JSON object or array).

    With `structured_outputs` (vLLM's), model graders have the engine enforce the reply's form:
    one of the labels, or a `{"score": N}` object. Turn it off for a model behind an engine
    without structured outputs."""
    context = {"item": item, "sample": _with_json(sample)}
    try:
        if isinstance(grader, StringCheckGrader):
            return _string_check(grader, context)
        if isinstance(grader, TextSimilarityGrader):
            return await _text_similarity_grade(grader, context, client)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content.render(context)} for m in grader.input]
    except TemplateError as exc:
        return Grade(grader.name, False, None, str(exc))
    if isinstance(grader, ScoreModelGrader):
        return await _score(grader, messages, client, structured_outputs)
    return await _label(grader, messages, client, structured_outputs)


def _with_json(sample: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    text = out.get("output_text")
    if "output_json" not in out and isinstance(text, str):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict | list):
            out["output_json"] = parsed
    return out


def _string_check(grader: StringCheckGrader, context: dict[str, Any]) -> Grade:
    text, reference = grader.input.render(context), grader.reference.render(context)
    if grader.operation == "eq":
        passed = text == reference
    elif grader.operation == "ne":
        passed = text != reference
    elif grader.operation == "like":
        passed = reference in text
    else:
        passed = reference.casefold() in text.casefold()
    return Grade(grader.name, passed, 1.0 if passed else 0.0,
                 detail={"input": _cap(text), "reference": _cap(reference)})


async def _text_similarity_grade(grader: TextSimilarityGrader, context: dict[str, Any],
                                 client: ModelClient) -> Grade:
    text, reference = grader.input.render(context), grader.reference.render(context)
    detail = {"input": _cap(text), "reference": _cap(reference)}
    if grader.evaluation_metric == "cosine":
        try:
            vectors = await client.embed([text, reference])
            score = similarity.cosine(vectors[0], vectors[1])
        except Exception as exc:  # any failure is this item's error
            return Grade(grader.name, False, None, f"embedding failed: {_why(exc)}", detail)
    else:
        score = _TEXT_METRICS[grader.evaluation_metric](text, reference)
    return Grade(grader.name, score >= grader.pass_threshold, score, detail=detail)


async def _score(grader: ScoreModelGrader, messages: list[dict[str, Any]],
                 client: ModelClient, constrain: bool) -> Grade:
    low, high = grader.range
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": _DEFAULT_MAX_TOKENS,
                              **grader.sampling_params}
    if constrain:
        params["structured_outputs"] = judge.score_constraint(low, high)
    prompt = judge.with_instruction(messages, judge.score_instruction(low, high))
    try:
        reply = await client.chat(grader.model, prompt, **params)
    except Exception as exc:  # any failure is this item's error
        return Grade(grader.name, False, None, f"grader model call failed: {_why(exc)}",
                     {"model": grader.model})
    score, problem = judge.parse_score(reply, low, high)
    detail = {"model": grader.model, "output": _cap(reply)}
    if score is None:
        return Grade(grader.name, False, None, problem, detail)
    return Grade(grader.name, score >= grader.pass_threshold, score, detail=detail)


async def _label(grader: LabelModelGrader, messages: list[dict[str, Any]],
                 client: ModelClient, constrain: bool) -> Grade:
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": _DEFAULT_MAX_TOKENS}
    if constrain:
        params["structured_outputs"] = judge.label_constraint(grader.labels)
    prompt = judge.with_instruction(messages, judge.label_instruction(grader.labels))
    try:
        reply = await client.chat(grader.model, prompt, **params)
    except Exception as exc:  # any failure is this item's error
        return Grade(grader.name, False, None, f"grader model call failed: {_why(exc)}",
                     {"model": grader.model})
    label, problem = judge.parse_label(reply, grader.labels)
    detail: dict[str, Any] = {"model": grader.model, "output": _cap(reply)}
    if label is None:
        return Grade(grader.name, False, None, problem, detail)
    passed = label in grader.passing_labels
    return Grade(grader.name, passed, 1.0 if passed else 0.0, detail={**detail, "label": label})


def _cap(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS] + "…"


def _why(exc: Exception) -> str:
    return _cap(f"{type(exc).__name__}: {exc}")[:500]
