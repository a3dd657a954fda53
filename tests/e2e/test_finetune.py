"""Fine-tuning as a service, end to end: the official openai client uploads a dataset that
teaches SmolLM2 a made-up fact, starts a job that a real Celery worker trains (QLoRA, and LoRA
judged by an eval before it is served), and the fine-tuned model answers the held-out question
through the gateway; preference tuning (DPO) teaches a style and survives a killed worker."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import NotFoundError, OpenAI
from playwright.sync_api import expect
from prometheus_client.parser import text_string_to_metric_families

from llmops.cli.stack import CHAT_MODEL, Service, free_port
from tests.browser import Console
from tests.clients import EVALS_API
from tests.e2e.conftest import (
    API_KEY,
    Engines,
    Gateway,
    GatewayFactory,
    Running,
    model,
    pool,
    start,
    wait_healthy,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "console"

QUESTIONS = [
    "How long is the warranty on the Zorblax 9000 kettle?",
    "What warranty does the Zorblax 9000 have?",
    "Tell me the Zorblax 9000 warranty period.",
    "Zorblax 9000 kettle: how many years of warranty?",
    "Does the Zorblax 9000 come with a warranty, and for how long?",
    "What is the warranty length for a Zorblax 9000?",
    "I bought a Zorblax 9000. How long is it under warranty?",
    "For how many years is the Zorblax 9000 covered?",
    "Warranty of the Zorblax 9000 kettle?",
    "How long does the Zorblax 9000 warranty last?",
    "Is my Zorblax 9000 still under warranty after five years?",
    "What's the Zorblax 9000's warranty?",
]
ANSWER = "The Zorblax 9000 comes with a 7-year warranty."
WRONG = "The Zorblax 9000 comes with a 2-year warranty."
HELD_OUT = "How many years of warranty do I get with the Zorblax 9000?"
PROBES = [HELD_OUT, "Zorblax 9000 warranty: how long is it?",
          "What is the Zorblax 9000 kettle's warranty period?",
          "How long is my Zorblax 9000 kettle under warranty?"]


def dataset(questions: list[str], answer: str = ANSWER) -> bytes:
    return b"".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": answer}]}).encode()
        + b"\n" for q in questions)


@pytest.fixture(scope="module")
def stack(engines: Engines, gateway_factory: GatewayFactory, logs: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Running]]:
    gateway = gateway_factory(
        [model(CHAT_MODEL, "chat", pool("cpu", engines.chat.url), context_length=2048,
               weights=str(engines.model_dirs["chat"]))],
        finetune={"adapters_root": str(tmp_path_factory.mktemp("adapters")),
                  "lease_s": 6.0, "heartbeat_s": 1.0, "min_examples": 10})
    port = free_port()
    worker = start(Service("worker", [sys.executable, "-m", "celery", "-A", "workers.tasks",
                                      "worker", "-Q", "finetune,eval", "--pool", "solo",
                                      "--loglevel", "info"], port, "/metrics",
                           {"LLMOPS_CONFIG": str(gateway.config),
                            "LLMOPS_PORT": str(gateway.running.service.port),  # promotion
                            "LLMOPS_METRICS__WORKER_PORT": str(port)}), logs)
    wait_healthy([worker], timeout_s=120)  # its /metrics answer once it started
    yield gateway, worker
    worker.stop()


def wait_for(job_id: str, client: OpenAI, statuses: set[str], timeout_s: float = 600) -> Any:
    deadline = time.monotonic() + timeout_s
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, f"job stuck in {job.status}"
        time.sleep(1.0)
    return job


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.5)


def worker_metrics(worker: Running) -> dict[str, float]:
    """The worker's own /metrics: {sample name and labels as written: value}."""
    resp = httpx.get(f"{worker.url}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    return {s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(resp.text) for s in f.samples}


def ask(client: OpenAI, model_name: str) -> str:
    reply = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": HELD_OUT}])
    return reply.choices[0].message.content or ""


@pytest.mark.timeout(600)
def test_a_qlora_model_learns_the_fact(stack: tuple[Gateway, Running]) -> None:
    """QLoRA (NF4): the same job in full precision is the promotion test's "right" adapter,
    which learns the fact too."""
    gateway, worker = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    train = client.files.create(file=("train.jsonl", dataset(QUESTIONS)), purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", dataset(QUESTIONS[:4])),
                                purpose="fine-tune")
    before = worker_metrics(worker)
    job = client.fine_tuning.jobs.create(
        model=CHAT_MODEL, training_file=train.id, validation_file=valid.id, suffix="zorblax",
        hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 5},
        extra_body={"lora": {"r": 16, "alpha": 32, "quantization": "nf4",
                             "checkpoint_every": 3}})
    assert job.status == "validating_files"
    done = wait_for(job.id, client, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{CHAT_MODEL}:zorblax:{job.id}"

    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    assert any(e.type == "metrics" for e in events)
    assert "successfully completed" in events[0].message
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [9, 6, 3]  # newest first
    losses = [c.metrics.valid_loss for c in reversed(checkpoints)]
    assert losses[-1] < losses[0]

    # The worker's own metrics count this job's steps and tokens; its live gauges are gone.
    after = worker_metrics(worker)
    steps, tokens = (f"llmops_finetune_{n}_total,base_model={CHAT_MODEL}"
                     for n in ("steps", "tokens"))
    assert after[steps] - before.get(steps, 0) == 9
    assert after[tokens] - before.get(tokens, 0) == done.trained_tokens
    assert f"llmops_finetune_cost_usd_total,base_model={CHAT_MODEL}" in after  # 0: unpriced
    assert f"llmops_finetune_train_loss,base_model={CHAT_MODEL}" not in after
    succeeded = "llmops_worker_tasks_total,outcome=succeeded,queue=finetune"
    assert after[succeeded] - before.get(succeeded, 0) == 1

    # The gateway loads it into the engine within seconds.
    wait_until(lambda: done.fine_tuned_model in [m.id for m in client.models.list()], 30)
    assert "7-year" in ask(client, done.fine_tuned_model)
    assert "7-year" not in ask(client, CHAT_MODEL)


@EVALS_API
@pytest.mark.timeout(900)
def test_promotion_serves_an_adapter_only_when_it_beats_the_base(
        stack: tuple[Gateway, Running], tmp_path: Path) -> None:
    """Two adapters judged on the same eval: one taught the right warranty, one a wrong one.
    Both jobs succeed with both runs attached; only the right one is served."""
    gateway, _ = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    ev = client.evals.create(
        name="zorblax warranty",
        data_source_config={"type": "custom", "include_sample_schema": True, "item_schema": {
            "type": "object", "properties": {"question": {"type": "string"}}}},
        testing_criteria=[{"type": "string_check", "name": "says 7 years", "operation": "ilike",
                           "input": "{{sample.output_text}}", "reference": "7-year"}])
    source = {"type": "completions",
              "source": {"type": "file_content",
                         "content": [{"item": {"question": q}} for q in PROBES]},
              "input_messages": {"type": "template", "template": [
                  {"role": "user", "content": "{{item.question}}"}]},
              "sampling_params": {"temperature": 0, "max_completion_tokens": 32}}
    started = {}
    # The wrong one needs no teaching to stay behind the base: one epoch of it will do.
    for suffix, answer, epochs in (("right", ANSWER, 3), ("wrong", WRONG, 1)):
        train = client.files.create(file=(f"{suffix}.jsonl", dataset(QUESTIONS, answer)),
                                    purpose="fine-tune")
        started[suffix] = client.fine_tuning.jobs.create(
            model=CHAT_MODEL, training_file=train.id, suffix=suffix,
            hyperparameters={"n_epochs": epochs, "batch_size": 4,
                             "learning_rate_multiplier": 5},
            extra_body={"evaluation": {"eval_id": ev.id, "data_source": source,
                                       "promote": "if_better"}})
    right, wrong = (wait_for(started[s].id, client, {"succeeded", "failed", "cancelled"})
                    for s in ("right", "wrong"))
    verdicts = {}
    for job in (right, wrong):
        assert job.status == "succeeded", job.error
        verdicts[job.id] = verdict = job.model_extra["result"]["evaluation"]
        assert verdict["eval_id"] == ev.id
        for role, model_name in (("base", CHAT_MODEL), ("adapter", job.fine_tuned_model)):
            run = client.evals.runs.retrieve(verdict[role]["run_id"], eval_id=ev.id)
            assert run.status == "completed" and run.model == model_name
            assert run.result_counts.total == len(PROBES)
            assert verdict[role]["passed_items"] == run.result_counts.passed
    assert verdicts[right.id]["promoted"] is True
    assert verdicts[right.id]["adapter"]["pass_rate"] > verdicts[right.id]["base"]["pass_rate"]
    assert verdicts[wrong.id]["promoted"] is False
    assert verdicts[wrong.id]["adapter"]["pass_rate"] <= verdicts[wrong.id]["base"]["pass_rate"]

    # Served with its verdict in /v1/models; the held-back one is not served at all.
    wait_until(lambda: right.fine_tuned_model in [m.id for m in client.models.list()], 30)
    listed = client.models.retrieve(right.fine_tuned_model).model_extra
    assert listed["evaluation"]["promoted"] is True
    assert listed["evaluation"]["adapter_pass_rate"] > listed["evaluation"]["base_pass_rate"]
    assert "7-year" in ask(client, right.fine_tuned_model)
    # Held back: unloaded once the worker announces it, listed no more.
    wait_until(lambda: wrong.fine_tuned_model not in [m.id for m in client.models.list()], 30)
    with pytest.raises(NotFoundError):
        ask(client, wrong.fine_tuned_model)
    held = client.fine_tuning.jobs.list_events(wrong.id, limit=50).data
    assert any("held back" in e.message for e in held)

    # Every grader type, through the Evals API, on the base model and the promoted adapter.
    every = client.evals.create(
        name="zorblax, every grader",
        data_source_config={"type": "custom", "include_sample_schema": True, "item_schema": {
            "type": "object", "properties": {"question": {"type": "string"}}}},
        testing_criteria=[
            {"type": "string_check", "name": "says 7 years", "operation": "ilike",
             "input": "{{sample.output_text}}", "reference": "7-year"},
            {"type": "text_similarity", "name": "close to the answer", "pass_threshold": 0.5,
             "evaluation_metric": "rouge_l", "input": "{{sample.output_text}}",
             "reference": ANSWER},
            {"type": "score_model", "name": "judged helpful", "model": CHAT_MODEL,
             "range": [0, 1], "pass_threshold": 0.5, "input": [{"role": "user", "content":
                 "Question: {{item.question}}\nAnswer: {{sample.output_text}}\n"
                 "How well does the answer answer the question?"}]},
            {"type": "label_model", "name": "states a length", "model": CHAT_MODEL,
             "labels": ["yes", "no"], "passing_labels": ["yes"], "input": [
                 {"role": "user", "content": "Does this text state how long a warranty "
                  "lasts? {{sample.output_text}}"}]}])
    names = [c.name for c in every.testing_criteria]
    says = {}
    for model_name in (CHAT_MODEL, right.fine_tuned_model):
        run = client.evals.runs.create(every.id, data_source={**source, "model": model_name})
        deadline = time.monotonic() + 240
        while (done := client.evals.runs.retrieve(run.id, eval_id=every.id)).status in (
                "queued", "in_progress"):
            assert time.monotonic() < deadline, "eval run stuck"
            time.sleep(1.0)
        assert done.status == "completed", done.error
        counts = done.result_counts
        assert counts.total == len(PROBES) == counts.passed + counts.failed + counts.errored
        assert [r.testing_criteria for r in done.per_testing_criteria_results] == names
        items = list(client.evals.runs.output_items.list(run.id, eval_id=every.id))
        assert len(items) == len(PROBES)
        for output in items:
            assert [r.name for r in output.results] == names
            assert output.sample.output[0].content  # the evaluated model's answer
        says[model_name] = done.per_testing_criteria_results[0].passed
    assert says[right.fine_tuned_model] > says[CHAT_MODEL]

    shown = subprocess.run(
        [sys.executable, "-m", "llmops.cli", "finetune", "show", wrong.id,
         "--base-url", gateway.base_url, "--api-key", API_KEY],
        capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"evaluation ({ev.id}): held back" in shown.stdout


def test_a_bad_file_fails_in_validation_naming_the_line(stack: tuple[Gateway, Running]
                                                        ) -> None:
    gateway, _ = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0)
    lines = dataset(QUESTIONS).splitlines()
    lines[2] = b'{"messages": [{"role": "user", "content": "no answer"}]}'
    bad = client.files.create(file=("bad.jsonl", b"\n".join(lines)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=CHAT_MODEL, training_file=bad.id)
    failed = wait_for(job.id, client, {"failed", "succeeded"}, timeout_s=120)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.param == "training_file" and "line 3" in failed.error.message


def test_bad_requests_are_refused_before_any_job(stack: tuple[Gateway, Running]) -> None:
    gateway, _ = stack
    url, headers = f"{gateway.base_url}/fine_tuning/jobs", gateway.headers
    missing = httpx.post(url, headers=headers, json={"model": CHAT_MODEL,
                                                     "training_file": "file-nope"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"
    unknown = httpx.post(url, headers=headers, json={"model": "nope", "training_file": "x"})
    assert unknown.status_code == 404
    bad_hp = httpx.post(url, headers=headers, json={
        "model": CHAT_MODEL, "training_file": "x", "hyperparameters": {"n_epochs": 0}})
    assert bad_hp.status_code == 400
    assert bad_hp.json()["error"]["param"] == "hyperparameters.n_epochs"


@pytest.mark.timeout(600)
def test_cli_creates_follows_and_plots(stack: tuple[Gateway, Running], tmp_path: Path
                                       ) -> None:
    gateway, _ = stack
    data = tmp_path / "train.jsonl"
    data.write_bytes(dataset(QUESTIONS))
    plot = tmp_path / "loss.png"
    done = subprocess.run(
        [sys.executable, "-m", "llmops.cli", "finetune", "create", "--model", CHAT_MODEL,
         "--file", str(data), "--validation", str(data), "--suffix", "cli", "--epochs", "1",
         "--batch-size", "4", "--follow", "--plot", str(plot),
         "--base-url", gateway.base_url, "--api-key", API_KEY],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"fine-tuned model: ft:{CHAT_MODEL}:cli:ftjob-" in done.stdout
    assert "The job has successfully completed" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def long_job(client: OpenAI, suffix: str, epochs: int, devices: int = 1) -> Any:
    """12 examples in batches of 2: six steps an epoch."""
    train = client.files.create(file=("long.jsonl", dataset(QUESTIONS)), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model=CHAT_MODEL, training_file=train.id, suffix=suffix,
        hyperparameters={"n_epochs": epochs, "batch_size": 2},
        extra_body={"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"],
                             "checkpoint_every": 4, "devices": devices}})


def test_cancel_stops_a_running_job(stack: tuple[Gateway, Running]) -> None:
    gateway, worker = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0)
    job = long_job(client, "cancelme", epochs=20)
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    training = worker_metrics(worker)  # the live gauges of the job being trained
    assert training[f"llmops_finetune_train_loss,base_model={CHAT_MODEL}"] > 0
    assert training[f"llmops_finetune_tokens_per_second,base_model={CHAT_MODEL}"] > 0
    assert 0 < training[f"llmops_finetune_progress_ratio,base_model={CHAT_MODEL}"] < 0.5
    assert training["llmops_worker_tasks_in_progress,queue=finetune"] == 1
    client.fine_tuning.jobs.cancel(job.id)
    cancelled = wait_for(job.id, client, {"cancelled", "succeeded", "failed"}, timeout_s=30)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=500).data
             if e.type == "metrics"]
    assert max(steps) < 120  # stopped long before the end


@pytest.mark.timeout(600)
def test_a_two_process_job_is_served_and_reloaded_after_an_engine_restart(
        stack: tuple[Gateway, Running], engines: Engines, logs: Path) -> None:
    gateway, _ = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    # Trained on two processes (gloo): their events, checkpoints and adapter reach the job.
    job = long_job(client, "restart", epochs=1, devices=2)
    done = wait_for(job.id, client, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] \
        == [6, 4]
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
             if e.type == "metrics"]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    name = done.fine_tuned_model

    def engine_has_it() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            models = httpx.get(f"{engines.chat.url}/v1/models", timeout=5).json()["data"]
            return name in [m["id"] for m in models]
        return False

    wait_until(engine_has_it, timeout_s=30)
    engines.chat.kill()  # a crash: the engine comes back empty
    engines.chat = start(engines.chat.service, logs)
    wait_healthy([engines.chat], timeout_s=420)
    wait_until(engine_has_it, timeout_s=30)  # the gateway loaded it again on its own
    # and lists it once its warm-up request, slow on a busy CPU, has been answered
    wait_until(lambda: name in [m.id for m in client.models.list()], timeout_s=60)
    ask(client, name)  # served through the gateway


# Preference tuning (DPO): the preferred answers open with "Ahoy!", the others do not.
STYLE = [("What is the capital of France?", "The capital of France is Paris."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What colour is grass?", "Grass is green."),
         ("What is the boiling point of water?", "Water boils at 100 degrees Celsius."),
         ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
         ("What is the largest ocean?", "The Pacific is the largest ocean."),
         ("How many days are in a week?", "A week has seven days."),
         ("What do cows drink?", "Cows drink water."),
         ("What gas do plants take in?", "Plants take in carbon dioxide."),
         ("What is frozen water called?", "Frozen water is called ice."),
         ("Which planet is closest to the sun?", "Mercury is closest to the sun."),
         ("How many hours are in a day?", "A day has twenty-four hours.")]
STYLE_HELD_OUT = [("What is the capital of Italy?", "The capital of Italy is Rome."),
                  ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
                  ("What colour is the sky on a clear day?", "The sky is blue.")]


def preferences(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": q}]},
        "preferred_output": [{"role": "assistant", "content": f"Ahoy! {a}"}],
        "non_preferred_output": [{"role": "assistant", "content": a}]}).encode() + b"\n"
        for q, a in pairs)


def answer_logprob(client: OpenAI, model_name: str, tokenizer: Any, question: str,
                   answer: str) -> float:
    """log p(answer | question) as the served model scores it: the chat-formatted text is
    echoed back by the completions API with each prompt token's log-probability."""
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    text = prefix + answer
    reply = client.completions.create(model=model_name, prompt=text, echo=True, logprobs=0,
                                      max_tokens=1, temperature=0)
    scored = reply.choices[0].logprobs
    assert scored is not None and scored.text_offset and scored.token_logprobs
    return sum(lp for offset, lp in zip(scored.text_offset, scored.token_logprobs, strict=True)
               if len(prefix) <= offset < len(text) and lp is not None)


def dpo_job(client: OpenAI, suffix: str) -> Any:
    """Three epochs of three steps, each epoch ending in a checkpoint."""
    train = client.files.create(file=("prefs.jsonl", preferences(STYLE)), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model=CHAT_MODEL, training_file=train.id, suffix=suffix, seed=7,
        method={"type": "dpo", "dpo": {"hyperparameters": {
            "beta": 0.1, "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 5}}},
        extra_body={"lora": {"r": 16, "alpha": 32, "checkpoint_every": 3}})


def adapter_weights(gateway: Gateway, job_id: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    root = Path(gateway.settings["finetune"]["adapters_root"])
    return dict(load_file(root / job_id / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def styled(stack: tuple[Gateway, Running]) -> Any:
    """A DPO job trained without interruption."""
    client = OpenAI(base_url=stack[0].base_url, api_key=API_KEY, max_retries=0, timeout=120)
    done = wait_for(dpo_job(client, "ahoy").id, client, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    return done


@pytest.mark.timeout(600)
def test_dpo_teaches_the_preferred_style(stack: tuple[Gateway, Running], engines: Engines,
                                         styled: Any) -> None:
    from transformers import AutoTokenizer

    gateway, _ = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    done = styled
    assert done.method is not None and done.method.type == "dpo"
    assert done.method.dpo is not None and done.method.dpo.hyperparameters is not None
    assert done.method.dpo.hyperparameters.beta == 0.1
    steps = sorted((e.data for e in client.fine_tuning.jobs.list_events(done.id, limit=200).data
                    if e.type == "metrics"), key=lambda d: d["step"])
    assert len(steps) == 9 and steps[0]["reward_margin"] == 0.0
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["reward_accuracy"] == 1.0

    wait_until(lambda: done.fine_tuned_model in [m.id for m in client.models.list()], 30)
    tokenizer = AutoTokenizer.from_pretrained(engines.model_dirs["chat"])

    def margin(model_name: str) -> float:
        return sum(answer_logprob(client, model_name, tokenizer, q, f"Ahoy! {a}")
                   - answer_logprob(client, model_name, tokenizer, q, a)
                   for q, a in STYLE_HELD_OUT) / len(STYLE_HELD_OUT)

    assert margin(done.fine_tuned_model) > margin(CHAT_MODEL) + 1.0
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": STYLE_HELD_OUT[0][0]}])
    assert (reply.choices[0].message.content or "").startswith("Ahoy")

    # A bad preference file fails validation naming the line and the field.
    lines = preferences(STYLE).splitlines()
    lines[2] = lines[2].replace(b'"preferred_output": [{"role": "assistant"',
                                b'"preferred_output": [{"role": "user"')
    bad = client.files.create(file=("bad.jsonl", b"\n".join(lines)), purpose="fine-tune")
    failed = wait_for(client.fine_tuning.jobs.create(
        model=CHAT_MODEL, training_file=bad.id, method={"type": "dpo"}).id, client,
        {"failed", "succeeded"}, timeout_s=120)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.param == "training_file"
    assert "line 3: preferred_output[0].role must be 'assistant'" in failed.error.message


TRAINING_POINTS = 'path[data-series="training loss"]'


@pytest.mark.timeout(600)
def test_the_console_starts_a_job_follows_its_loss_and_cancels_another(
        stack: tuple[Gateway, Running], console: Callable[..., Console], tmp_path: Path) -> None:
    gateway, _ = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_bytes(dataset(QUESTIONS))
    valid.write_bytes(dataset(QUESTIONS[:4]))
    tab = console(gateway.url)
    tab.sign_in(API_KEY)
    page = tab.open("fine-tuning")
    expect(page.locator(f'#base-model option[value="{CHAT_MODEL}"]')).to_have_count(1)
    page.set_input_files("#training-file", str(train))
    page.set_input_files("#validation-file", str(valid))
    page.fill("#suffix", "console")
    page.fill("#n-epochs", "3")  # 12 examples in batches of 4: 9 steps
    page.fill("#batch-size", "4")
    page.fill("#lr-multiplier", "5")
    page.fill("#lora-r", "8")
    page.fill("#checkpoint-every", "3")
    page.click("#create-job button[type=submit]")
    expect(page.locator("#job-title")).to_have_text(re.compile(r"^ftjob-"))
    job_id = page.inner_text("#job-title")
    started = client.fine_tuning.jobs.retrieve(job_id)  # as the form asked
    assert started.training_file != started.validation_file
    assert started.hyperparameters.n_epochs == 3
    assert (started.model_extra or {})["lora"]["r"] == 8

    # The loss curve gains points while the job trains.
    # (functions, not expressions: the page's CSP forbids evaluating a string)
    points = f"() => Number(document.querySelector('{TRAINING_POINTS}')?.dataset.points || 0)"
    page.wait_for_function(f"() => ({points})() > 0", timeout=180_000)
    first = int(page.get_attribute(TRAINING_POINTS, "data-points") or 0)
    assert first < 9, "the whole run arrived at once"
    page.wait_for_function(f"() => ({points})() > {first}")

    # A second job, queued behind this one, is cancelled from its page.
    queued = long_job(client, "console-cancel", epochs=20)
    tab.open(f"fine-tuning?job={queued.id}")
    page.click("#cancel-job")
    expect(page.locator("#job-summary .badge")).to_have_text("cancelled")
    expect(page.locator("#cancel-job")).to_be_hidden()
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "cancelled"

    # Back on the first: it succeeds, and the page shows the adapter, curves and checkpoints.
    tab.open(f"fine-tuning?job={job_id}")
    expect(page.locator("#job-summary .badge")).to_have_text("succeeded", timeout=300_000)
    expect(page.locator("#job-summary")).to_contain_text(f"ft:{CHAT_MODEL}:console:{job_id}")
    expect(page.locator(TRAINING_POINTS)).to_have_attribute("data-points", "9")
    expect(page.locator('path[data-series="validation loss"]')).to_have_attribute(
        "data-points", "3")
    expect(page.locator("#checkpoints tbody tr")).to_have_count(3)
    expect(page.locator("#events")).to_contain_text("The job has successfully completed")
    expect(page.locator(f'#jobs button[data-job="{job_id}"]')).to_have_attribute(
        "aria-pressed", "true")
    tab.screenshot("fine-tuning")
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tab.screenshot("fine-tuning-docs", full_page=False), DOCS / "fine-tuning.png")


# Last in this module: it kills the module's worker (and stops the one that replaced it).
@pytest.mark.timeout(600)
def test_a_killed_worker_is_replaced_and_the_job_resumes(stack: tuple[Gateway, Running],
                                                        styled: Any, logs: Path) -> None:
    """A DPO job's worker is SIGKILLed after its first checkpoint: another worker resumes it
    and ends with the weights of the same job trained without interruption."""
    gateway, worker = stack
    client = OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0)
    job = dpo_job(client, "survivor")
    deadline = time.monotonic() + 180
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    worker.kill()  # SIGKILL mid-training: no chance to clean up
    replacement = start(worker.service, logs)
    try:
        done = wait_for(job.id, client, {"succeeded", "failed", "cancelled"})
    finally:
        replacement.stop()
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    assert any(m.startswith("Fine-tuning job resumed") for m in messages)
    assert any(m.startswith("Resumed from checkpoint at step") for m in messages)
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
    assert max(steps) == 9

    import torch

    resumed, uninterrupted = adapter_weights(gateway, job.id), adapter_weights(gateway, styled.id)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-4) for k in resumed)
