"""Guardrail events: merged per request, logged one line each with the reason and no value,
and counted in `llmops_guardrail_events_total` with a bounded tenant label."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from guardrails import Tally, log_events
from llmops.settings import MetricsConfig
from observability.metrics import GatewayMetrics
from tenancy.ledger import UsageEvent


def test_events_merge_by_stage_category_action_and_rule() -> None:
    tally = Tally()
    tally.add("output", "email", "redact", 1, "an email address in the answer")
    tally.add("output", "email", "redact", 2, "another reason, same event")
    tally.add("input", "deny_pattern", "block", 1, "deny pattern", rule="a")
    tally.add("input", "deny_pattern", "block", 1, "deny pattern", rule="b")
    assert tally.records() == [
        {"stage": "output", "category": "email", "action": "redact", "count": 3},
        {"stage": "input", "category": "deny_pattern", "action": "block", "count": 1,
         "rule": "a"},
        {"stage": "input", "category": "deny_pattern", "action": "block", "count": 1,
         "rule": "b"}]
    assert Tally().records() is None and not Tally()


def test_one_log_line_per_event(caplog: pytest.LogCaptureFixture) -> None:
    tally = Tally()
    tally.add("input", "card", "block", 1, "a payment card number in messages[0].content")
    with caplog.at_level(logging.INFO, logger="guardrails"):
        log_events(tally, "req-1", "ten_a", "key_a")
    [line] = caplog.messages
    assert line == ("guardrail request=req-1 tenant=ten_a key=key_a stage=input category=card "
                    "action=block count=1 reason='a payment card number in "
                    "messages[0].content'")


def test_metrics_count_one_event_per_request_and_category() -> None:
    metrics = GatewayMetrics(MetricsConfig(top_tenants=1), [], {})
    did = [{"stage": "input", "category": "card", "action": "block", "count": 3},
           {"stage": "retrieval", "category": "prompt_injection", "action": "drop", "count": 2,
            "rule": "chat_template"}]
    for tenant in ("ten_busy", "ten_busy", "ten_quiet"):
        metrics.admitted("chat")
        metrics.finished(UsageEvent(request_id="r", tenant_id=tenant, key_id="k",
                                    endpoint="/v1/chat/completions", model="chat", status=400,
                                    guardrails=did), "chat", None, True)
    assert metrics.tenants.rank() == ["ten_busy"]  # the busiest gets a label of its own
    metrics.finished(UsageEvent(request_id="r", tenant_id="ten_busy", key_id="k",
                                endpoint="/v1/chat/completions", model="chat", status=400,
                                guardrails=did[:1]), "chat", None, False)
    samples = {(s.labels["stage"], s.labels["category"], s.labels["action"],
                s.labels["tenant"]): s.value
               for f in text_string_to_metric_families(metrics.exposition().decode())
               for s in f.samples if s.name == "llmops_guardrail_events_total"}
    assert samples == {("input", "card", "block", "other"): 3.0,
                       ("retrieval", "prompt_injection", "drop", "other"): 3.0,
                       ("input", "card", "block", "ten_busy"): 1.0}
