"""The alert and recording rules pass `promtool check rules`, and their unit tests
(`alerts_test.yml`, covering every alert) pass `promtool test rules`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

OBSERVABILITY = Path(__file__).parents[2] / "observability"
RULE_FILES = sorted(OBSERVABILITY.glob("*.yml"))
TESTS = OBSERVABILITY / "alerts_test.yml"


def promtool(*args: str) -> None:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_rules_pass_promtool_check() -> None:
    rules = [str(p) for p in RULE_FILES if p != TESTS]
    assert len(rules) >= 2
    promtool("check", "rules", *rules)


def test_rule_unit_tests_pass() -> None:
    promtool("test", "rules", str(TESTS))


def test_every_alert_has_a_unit_test_and_the_fields_on_call_needs() -> None:
    alerts = [rule for path in RULE_FILES if path != TESTS
              for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule]
    tested = {case["alertname"] for test in yaml.safe_load(TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])
              if case["exp_alerts"]}  # a test where it fires, not only where it stays quiet
    assert {a["alert"] for a in alerts} <= tested
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert {"summary", "description", "runbook"} <= alert["annotations"].keys()
        assert "for" in alert, alert["alert"]
