"""Graders: OpenAI's spec shapes (typed with the official client's own types) parsed and
validated with OpenAI-style param paths, and every grader run on items, with a scripted
ModelClient standing in for the served models (the real ones: tests/e2e/test_eval_graders.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from openai.types import eval_create_params as openai_evals
from openai.types.graders.string_check_grader_param import StringCheckGraderParam

import evals
from evals import judge
from evals.graders import (
    Grade,
    GraderError,
    LabelModelGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    grade,
    parse_criteria,
    parse_grader,
)

SCHEMA = {"type": "object", "properties": {"question": {"type": "string"},
                                           "answer": {"type": "string"}}}
ITEM = {"question": "What is the capital of France?", "answer": "Paris"}


@dataclass
class Scripted:
    """A ModelClient replying from a script; records what it was asked."""

    replies: list[str | Exception] = field(default_factory=list)
    vectors: dict[str, list[float]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def chat(self, model: str, messages: list[dict[str, Any]], **params: Any) -> str:
        self.calls.append({"model": model, "messages": messages, **params})
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append({"embed": texts})
        return [self.vectors[t] for t in texts]


def string_check(operation: str, reference: str = "{{item.answer}}") -> StringCheckGraderParam:
    return {"type": "string_check", "name": "check", "input": "{{sample.output_text}}",
            "reference": reference, "operation": operation}


def score_model(**extra: Any) -> openai_evals.TestingCriterionScoreModel:
    spec: openai_evals.TestingCriterionScoreModel = {
        "type": "score_model", "name": "judge", "model": "grader-model",
        "input": [{"role": "developer", "content": "You grade answers. 1 is right, 0 wrong."},
                  {"role": "user", "type": "message",
                   "content": {"type": "input_text", "text": "Q: {{item.question}}\n"
                               "Expected: {{item.answer}}\nAnswer: {{sample.output_text}}"}}],
        "range": [0, 1], "pass_threshold": 0.5,
        "sampling_params": {"temperature": 0.2, "max_completions_tokens": 20, "seed": 3}}
    return {**spec, **extra}


def label_model(**extra: Any) -> openai_evals.TestingCriterionLabelModel:
    spec: openai_evals.TestingCriterionLabelModel = {
        "type": "label_model", "name": "verdict", "model": "grader-model",
        "input": [{"role": "system", "content": "Classify the answer."},
                  {"role": "user", "content": "Expected {{item.answer}}, got "
                   "{{sample.output_text}}"}],
        "labels": ["correct", "incorrect", "unsure"], "passing_labels": ["correct"]}
    return {**spec, **extra}


def similarity(metric: str, threshold: float = 0.5) -> openai_evals.TestingCriterionTextSimilarity:
    return {"type": "text_similarity", "name": metric, "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}", "evaluation_metric": metric,
            "pass_threshold": threshold}


async def run(spec: Any, output: str, client: Scripted | None = None,
              item: dict[str, Any] = ITEM, **kwargs: Any) -> Grade:
    return await grade(parse_grader(spec, SCHEMA), item, {"output_text": output},
                       client or Scripted(), **kwargs)


def test_public_surface() -> None:
    assert evals.__all__ == [
        "Grade", "Grader", "GraderError", "LabelModelGrader", "ModelClient", "QuestionResult",
        "RetrievalQuestion", "RetrievalReport", "ScoreModelGrader", "StringCheckGrader",
        "TextSimilarityGrader", "evaluate_retrieval", "grade", "parse_criteria",
        "parse_grader", "parse_questions"]
    assert all(hasattr(evals, name) for name in evals.__all__)


def test_every_openai_grader_shape_parses() -> None:
    graders = parse_criteria([string_check("eq"), similarity("rouge_l"), score_model(),
                              label_model()], SCHEMA)
    assert [type(g) for g in graders] == [StringCheckGrader, TextSimilarityGrader,
                                          ScoreModelGrader, LabelModelGrader]
    assert [g.type for g in graders] == ["string_check", "text_similarity", "score_model",
                                         "label_model"]
    score = graders[2]
    assert isinstance(score, ScoreModelGrader)
    assert score.range == (0.0, 1.0) and score.pass_threshold == 0.5
    assert score.sampling_params == {"temperature": 0.2, "max_tokens": 20, "seed": 3}


@pytest.mark.parametrize(("operation", "output", "passed"), [
    ("eq", "Paris", True), ("eq", "paris", False), ("eq", "Paris.", False),
    ("ne", "Lyon", True), ("ne", "Paris", False),
    ("like", "It is Paris.", True), ("like", "it is paris", False), ("like", "Lyon", False),
    ("ilike", "it is PARIS", True), ("ilike", "Lyon", False),
])
async def test_string_check(operation: str, output: str, passed: bool) -> None:
    result = await run(string_check(operation), output)
    assert (result.passed, result.score, result.error) == (passed, float(passed), None)
    assert result.detail == {"input": output, "reference": "Paris"}


@pytest.mark.parametrize(("metric", "output", "score"), [
    ("fuzzy_match", "Pariss", 10 / 11),
    ("bleu", "Paris", 1.0),
    ("gleu", "Paris France", 1 / 3),
    ("rouge_1", "paris", 1.0),
    ("rouge_2", "Paris", 0.0),
    ("rouge_l", "Paris is it", 0.5),
])
async def test_text_similarity_metrics(metric: str, output: str, score: float) -> None:
    result = await run(similarity(metric, threshold=0.5), output)
    assert result.score == pytest.approx(score)
    assert result.passed is (score >= 0.5)
    assert result.error is None


async def test_text_similarity_threshold_is_inclusive() -> None:
    assert (await run(similarity("rouge_l", 0.5), "Paris is it")).passed


async def test_cosine_uses_the_platforms_embeddings() -> None:
    client = Scripted(vectors={"Paris!": [1.0, 1.0], "Paris": [1.0, 0.0]})
    result = await run(similarity("cosine", 0.7), "Paris!", client)
    assert client.calls == [{"embed": ["Paris!", "Paris"]}]
    assert result.score == pytest.approx(0.7071, abs=1e-4) and result.passed


async def test_cosine_embedding_failure_is_the_items_error() -> None:
    result = await run(similarity("cosine", 0.7), "unknown", Scripted())
    assert not result.passed and result.score is None
    assert result.error is not None and result.error.startswith("embedding failed: KeyError")


async def test_score_model_prompt_params_and_pass() -> None:
    client = Scripted(['{"score": 0.9}'])
    result = await run(score_model(), "Paris", client)
    assert (result.passed, result.score, result.error) == (True, 0.9, None)
    assert result.detail == {"model": "grader-model", "output": '{"score": 0.9}'}
    call = client.calls[0]
    assert call["model"] == "grader-model"
    assert call["temperature"] == 0.2 and call["max_tokens"] == 20 and call["seed"] == 3
    assert call["structured_outputs"] == judge.score_constraint(0, 1)
    system, user = call["messages"]
    assert system == {"role": "system", "content": "You grade answers. 1 is right, 0 wrong."}
    assert user["role"] == "user"
    assert user["content"].startswith("Q: What is the capital of France?\nExpected: Paris\n"
                                      "Answer: Paris\n\n")
    assert user["content"].endswith('{"score": N}, where N is a number from 0 to 1.')


@pytest.mark.parametrize(("reply", "score", "error"), [
    ('{"score": 0.2}', 0.2, None),
    ('{"result": 1, "steps": []}', 1.0, None),
    ("Score: 1", 1.0, None),
    ("The answer gets 7/10, so 0.7", 0.7, None),
    ('{"score": 3}', None, "the grader's score 3 is outside [0, 1]"),
    ("I give it a 7", None, "no number in [0, 1] in the grader's reply"),
    ("Looks right to me", None, "no score in the grader's reply"),
])
async def test_score_model_reads_replies_leniently(reply: str, score: float | None,
                                                   error: str | None) -> None:
    result = await run(score_model(), "Paris", Scripted([reply]))
    assert (result.score, result.error) == (score, error)
    assert result.passed is (score is not None and score >= 0.5)
    assert result.detail["output"] == reply  # recorded even when it cannot be read


async def test_score_model_custom_range_and_default_threshold() -> None:
    spec = score_model(range=[1, 10])
    del spec["pass_threshold"]
    grader = parse_grader(spec)
    assert isinstance(grader, ScoreModelGrader) and grader.pass_threshold == 5.5
    client = Scripted(["6", "5"])
    assert (await grade(grader, ITEM, {"output_text": "x"}, client)).passed
    assert not (await grade(grader, ITEM, {"output_text": "x"}, client)).passed
    assert "from 1 to 10" in client.calls[0]["messages"][-1]["content"]


@pytest.mark.parametrize(("reply", "label"), [
    ("correct", "correct"), ("Incorrect.", "incorrect"), ('"UNSURE"', "unsure"),
    ('{"label": "correct"}', "correct"),
    ("The answer is incorrect because Paris is right but...", "incorrect"),
    ("I would say correct, not unsure", "correct"),
])
async def test_label_model_reads_labels(reply: str, label: str) -> None:
    client = Scripted([reply])
    result = await run(label_model(), "Paris", client)
    assert result.error is None and result.detail["label"] == label
    assert result.passed is (label == "correct") and result.score == float(label == "correct")
    call = client.calls[0]
    assert call["structured_outputs"] == {"choice": ["correct", "incorrect", "unsure"]}
    assert call["temperature"] == 0.0
    assert call["messages"][-1]["content"] == (
        "Expected Paris, got Paris\n\nAnswer with exactly one of these labels: correct, "
        "incorrect, unsure. Reply with the label only.")


async def test_label_model_unreadable_reply_is_an_error_not_a_pass() -> None:
    result = await run(label_model(), "Paris", Scripted(["maybe?"]))
    assert (result.passed, result.score) == (False, None)
    assert result.error == "the grader's reply names none of the labels"
    assert result.detail == {"model": "grader-model", "output": "maybe?"}


async def test_structured_outputs_can_be_turned_off() -> None:
    client = Scripted(["correct", "1"])
    await run(label_model(), "Paris", client, structured_outputs=False)
    await run(score_model(), "Paris", client, structured_outputs=False)
    assert all("structured_outputs" not in call for call in client.calls)


async def test_model_call_failure_is_the_items_error() -> None:
    result = await run(label_model(), "Paris", Scripted([TimeoutError("read timed out")]))
    assert not result.passed and result.score is None
    assert result.error == "grader model call failed: TimeoutError: read timed out"


async def test_instruction_follows_a_trailing_assistant_message_as_a_user_turn() -> None:
    spec = label_model(input=[{"role": "user", "content": "Is {{sample.output_text}} right?"},
                              {"role": "assistant", "content": "Let me think."}])
    client = Scripted(["correct"])
    await run(spec, "Paris", client)
    assert client.calls[0]["messages"][-1]["role"] == "user"
    assert client.calls[0]["messages"][-1]["content"].startswith("Answer with exactly one")


async def test_missing_item_field_is_a_per_item_error() -> None:
    grader = parse_grader(string_check("eq", "{{item.expected}}"))  # no schema: not known yet
    result = await grade(grader, ITEM, {"output_text": "Paris"}, Scripted())
    assert not result.passed and result.score is None
    assert result.error == "{{item.expected}}: item has no field 'expected'"


async def test_output_json_is_derived_from_json_output_text() -> None:
    spec = string_check("eq", "Paris")
    spec["input"] = "{{sample.output_json.city}}"
    assert (await run(spec, '{"city": "Paris"}')).passed
    failed = await run(spec, "Paris")
    assert failed.error == "{{sample.output_json.city}}: sample has no field 'output_json'"


@pytest.mark.parametrize(("spec", "message", "param"), [
    ({**string_check("eq"), "operation": "contains"}, "operation must be one of eq, ne, like, "
     "ilike, not 'contains'", "testing_criteria[0].operation"),
    ({**string_check("eq"), "name": ""}, "name is required", "testing_criteria[0].name"),
    ({**string_check("eq"), "extra": 1}, "unknown parameter 'extra' for a string_check grader",
     "testing_criteria[0].extra"),
    ({**string_check("eq"), "reference": "{{item.anwser}}"}, "item schema has no field "
     "'anwser'", "testing_criteria[0].reference"),
    ({**string_check("eq"), "input": "{{output_text}}"}, "unknown namespace 'output_text'",
     "testing_criteria[0].input"),
    ({**string_check("eq"), "input": 3}, "input must be a string", "testing_criteria[0].input"),
    ({"type": "python", "name": "p", "source": "def grade(s, i): return 1"},
     "grader type 'python' is not supported", "testing_criteria[0].type"),
    ({"type": "regex", "name": "r"}, "unknown grader type 'regex'", "testing_criteria[0].type"),
    ("eq", "a grader must be a JSON object", "testing_criteria[0]"),
    (similarity("meteor"), "'meteor' is not supported: METEOR needs WordNet",
     "testing_criteria[0].evaluation_metric"),
    (similarity("bertscore"), "evaluation_metric must be one of",
     "testing_criteria[0].evaluation_metric"),
    ({k: v for k, v in similarity("bleu").items() if k != "pass_threshold"},
     "pass_threshold is required", "testing_criteria[0].pass_threshold"),
    (similarity("bleu", 1.5), r"pass_threshold for bleu must lie in \[0, 1\]",
     "testing_criteria[0].pass_threshold"),
    (score_model(range=[1, 0]), "range must be two numbers", "testing_criteria[0].range"),
    (score_model(range=[0, 10], pass_threshold=11), "pass_threshold must lie in the range",
     "testing_criteria[0].pass_threshold"),
    (score_model(sampling_params={"top_k": 5}), "unknown sampling parameter 'top_k'",
     "testing_criteria[0].sampling_params.top_k"),
    (score_model(sampling_params={"max_completions_tokens": 0}), "must be a positive integer",
     "testing_criteria[0].sampling_params.max_completions_tokens"),
    (score_model(model=""), "model is required", "testing_criteria[0].model"),
    (score_model(input=[]), "input must be a non-empty list", "testing_criteria[0].input"),
    (score_model(input=[{"role": "tool", "content": "x"}]), "role must be one of",
     "testing_criteria[0].input[0].role"),
    (score_model(input=[{"role": "user", "content": "ok"},
                        {"role": "user", "content": "{{item.nope}}"}]),
     "no field 'nope'", "testing_criteria[0].input[1].content"),
    (score_model(input=[{"role": "user", "content": [
        {"type": "input_text", "text": "look"},
        {"type": "input_image", "image_url": "https://example.com/x.png"}]}]),
     "input_image content is not supported", "testing_criteria[0].input[0].content[1].type"),
    (label_model(passing_labels=["right"]), "passing_labels must be a subset of labels; "
     "'right' is not a label", "testing_criteria[0].passing_labels"),
    (label_model(labels=["yes", "YES"]), "must not repeat a label",
     "testing_criteria[0].labels"),
    (label_model(labels=[]), "labels must be a non-empty list", "testing_criteria[0].labels"),
])
def test_bad_specs_name_the_field(spec: Any, message: str, param: str) -> None:
    with pytest.raises(GraderError, match=message) as caught:
        parse_criteria([spec], SCHEMA)
    assert caught.value.param == param


def test_criteria_paths_count_and_names_are_unique() -> None:
    with pytest.raises(GraderError) as caught:
        parse_criteria([string_check("eq"), {**string_check("eq"), "operation": "x"}], SCHEMA)
    assert caught.value.param == "testing_criteria[1].operation"
    with pytest.raises(GraderError, match="two testing criteria are named 'check'") as caught:
        parse_criteria([string_check("eq"), string_check("ne")], SCHEMA)
    assert caught.value.param == "testing_criteria[1].name"
    with pytest.raises(GraderError, match="non-empty list") as caught:
        parse_criteria([], SCHEMA)
    assert caught.value.param == "testing_criteria"


def test_content_parts_join_into_one_template() -> None:
    grader = parse_grader(score_model(input=[{"role": "user", "content": [
        "Grade this:", {"type": "output_text", "text": "{{sample.output_text}}"}]}]), SCHEMA)
    assert isinstance(grader, ScoreModelGrader)
    assert grader.input[0].content.source == "Grade this:\n{{sample.output_text}}"


@pytest.mark.parametrize(("low", "high", "good", "bad"), [
    (0, 1, ['{"score": 0}', '{"score": 1}', '{"score":0.25}', '{"score": 1.0}'],
     ['{"score": 100}', '{"score": 1.5}', '{"score": -0.5}', '{"score": 0.123456}', "0.5"]),
    (1, 10, ['{"score": 7}', '{"score": 10}', '{"score": 2.5}'],
     ['{"score": 100}', '{"score": -1}']),
    (-5, 5, ['{"score": -3}', '{"score": 4.5}'], ['{"score": 10}', '{"score": --1}']),
])
def test_score_constraint_bounds_the_reply(low: float, high: float, good: list[str],
                                           bad: list[str]) -> None:
    pattern = judge.score_constraint(low, high)["regex"]
    assert all(re.fullmatch(pattern, reply) for reply in good)
    assert not any(re.fullmatch(pattern, reply) for reply in bad)
