"""Guardrails: sensitive data in prompts and answers, bad prompts, and instructions hidden in
retrieved documents. Policies are defined in `llmops.guardrails`; this package applies them."""

from gateway.guardrails.detectors import PLACEHOLDERS, Finding, iban_valid, luhn_valid, redact, scan
from gateway.guardrails.events import GuardrailEvent, Tally, log_events
from gateway.guardrails.guard import Guardrails, Screened
from gateway.guardrails.injection import injection_marker
from gateway.guardrails.inputs import GuardrailBlockedError
from gateway.guardrails.outputs import OutputFilter
from gateway.guardrails.policy import OFF, Policy, PolicyResolver
from gateway.guardrails.stream import StreamScanner

__all__ = [
    "OFF",
    "PLACEHOLDERS",
    "Finding",
    "GuardrailBlockedError",
    "GuardrailEvent",
    "Guardrails",
    "OutputFilter",
    "Policy",
    "PolicyResolver",
    "Screened",
    "StreamScanner",
    "Tally",
    "iban_valid",
    "injection_marker",
    "log_events",
    "luhn_valid",
    "redact",
    "scan",
]
