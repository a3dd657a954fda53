"""Guardrails on a request's prompt: size and message-count limits, deny patterns, and
sensitive data (refused, redacted before the model sees it, or only recorded).

Texts looked at: every message's content (strings and text parts) and the arguments of the
tool calls earlier answers made, of a chat request, and the prompt(s) of a completion request
(token-id prompts carry no text). Errors name the place and the category or pattern, never
the matched text.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from guardrails.detectors import Finding, redact, scan
from guardrails.events import Tally
from guardrails.policy import Policy
from guardrails.schema import Category
from llmops.errors import BadRequestError

__all__ = ["LABELS", "GuardrailBlockedError", "check_input"]

LABELS: dict[str, str] = {
    "email": "an email address", "phone": "a phone number", "card": "a payment card number",
    "iban": "an IBAN", "secret": "a secret (an API key, private key or token)"}


class GuardrailBlockedError(BadRequestError):
    code = "guardrail_blocked"


@dataclass
class _Text:
    param: str  # where it is, as OpenAI names parameters: messages[1].content[0].text
    text: str
    container: Any  # the dict or list holding it
    slot: Any  # its key or index there


def _texts(payload: dict[str, Any]) -> Iterator[_Text]:
    messages = payload.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                yield _Text(f"messages[{i}].content", content, message, "content")
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield _Text(f"messages[{i}].content[{j}].text", part["text"], part,
                                    "text")
            calls = message.get("tool_calls")
            for k, call in enumerate(calls if isinstance(calls, list) else []):
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    # JSON text: a placeholder, free of quotes, keeps it valid JSON
                    yield _Text(f"messages[{i}].tool_calls[{k}].function.arguments",
                                function["arguments"], function, "arguments")
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        yield _Text("prompt", prompt, payload, "prompt")
    elif isinstance(prompt, list):
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                yield _Text(f"prompt[{i}]", item, prompt, i)


def check_input(policy: Policy, payload: dict[str, Any], tally: Tally) -> dict[str, Any] | None:
    """Apply `policy` to a request's JSON body: raise a 400 for a refused prompt, return the
    fields to replace when something was redacted (else None). Events go to `tally`."""
    texts = list(_texts(payload))
    where = "messages" if "messages" in payload else "prompt"
    messages = payload.get("messages")
    if policy.max_messages and isinstance(messages, list) and len(messages) > policy.max_messages:
        tally.add("input", "message_count", "block", 1,
                  f"{len(messages)} messages, more than {policy.max_messages}")
        raise BadRequestError(
            f"The request has {len(messages)} messages; the guardrail policy allows at most "
            f"{policy.max_messages}.", param="messages", code="too_many_messages")
    size = sum(len(t.text) for t in texts)
    if policy.max_prompt_chars and size > policy.max_prompt_chars:
        tally.add("input", "prompt_size", "block", 1,
                  f"{size} prompt characters, more than {policy.max_prompt_chars}")
        raise BadRequestError(
            f"The prompt has {size} characters; the guardrail policy allows at most "
            f"{policy.max_prompt_chars}.", param=where, code="prompt_too_long")
    if policy.deny is not None:
        for t in texts:
            hits = policy.deny.Match(t.text)
            if hits:
                name = policy.deny_names[min(hits)]
                tally.add("input", "deny_pattern", "block", 1,
                          f"deny pattern {name!r} in {t.param}", rule=name)
                raise BadRequestError(
                    f"The prompt was refused: {t.param} matches the deny pattern `{name}` of "
                    "the guardrail policy.", param=t.param, code="prompt_denied")
    if not policy.input:
        return None
    found = [(t, scan(t.text, policy.input)) for t in texts]
    blocked = [(t, f) for t, fs in found for f in fs if policy.input[f.category] == "block"]
    if blocked:
        for category in dict.fromkeys(f.category for _, f in blocked):
            places = [t.param for t, f in blocked if f.category == category]
            tally.add("input", category, "block", len(places),
                      f"{LABELS[category]} in {', '.join(dict.fromkeys(places))}")
        first = blocked[0][0]
        kinds = " and ".join(LABELS[c] for c in dict.fromkeys(f.category for _, f in blocked))
        raise GuardrailBlockedError(
            f"The request was blocked by a guardrail: it contains {kinds} ({first.param} "
            "first). Remove it and try again.", param=first.param)
    return _redacted(policy, payload, found, tally)


def _redacted(policy: Policy, payload: dict[str, Any],
              found: list[tuple[_Text, list[Finding]]], tally: Tally) -> dict[str, Any] | None:
    counts: dict[tuple[Category, str], list[str]] = {}
    for t, findings in found:
        for f in findings:
            counts.setdefault((f.category, policy.input[f.category]), []).append(t.param)
    for (category, action), places in counts.items():
        tally.add("input", category, action, len(places),
                  f"{LABELS[category]} in {', '.join(dict.fromkeys(places))}")
    if not any(action == "redact" for _, action in counts):
        return None
    # Replace in a copy: the texts' containers belong to the parsed body.
    changed: dict[str, Any] = {k: copy.deepcopy(payload[k]) for k in ("messages", "prompt")
                               if k in payload}
    for t, (_, findings) in zip(_texts(changed), found, strict=True):
        redacted = [f for f in findings if policy.input[f.category] == "redact"]
        if redacted:
            t.container[t.slot] = redact(t.text, redacted)
    return changed
