"""Guardrails: sensitive data in prompts and answers, bad prompts, and instructions hidden in
retrieved documents. Policies are defined in `guardrails.schema`; this package applies them."""

from guardrails.detectors import PLACEHOLDERS, Finding, iban_valid, luhn_valid, redact, scan
from guardrails.events import GuardrailEvent, Tally, log_events
from guardrails.guard import Guardrails, Screened
from guardrails.injection import injection_marker
from guardrails.inputs import GuardrailBlockedError
from guardrails.outputs import OutputFilter
from guardrails.policy import OFF, Policy, PolicyResolver
from guardrails.stream import StreamScanner

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
