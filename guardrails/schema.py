"""Guardrail policies: what the gateway does with sensitive data and bad prompts, per tenant and
per key.

A policy is partial: every field left unset (None) is inherited. The gateway resolves a
request's policy as the built-in defaults, overridden by the server's `guardrails.default`,
then by the tenant's policy, then by the key's, field by field (each category of `input` and
`output` is a field of its own). Policies are stored as JSON on tenants and keys, validated
here on the way in, so that the request path only reads them.

Deny patterns are RE2 expressions (linear time, no backtracking): an admin's pattern cannot
make the gateway spin on a crafted prompt.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import re2
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BUILTIN",
    "CATEGORIES",
    "Action",
    "Actions",
    "Category",
    "DenyPattern",
    "GuardrailsPolicy",
    "InjectionAction",
    "compile_deny",
    "re2_options",
]

Category = Literal["email", "phone", "card", "iban", "secret"]
CATEGORIES: tuple[Category, ...] = get_args(Category)
# block: refuse (input) or withhold (output); redact: replace each match with a placeholder;
# log: only record the event; off: do not look.
Action = Literal["block", "redact", "log", "off"]
# What happens to retrieved chunks that try to give the model instructions.
InjectionAction = Literal["drop", "log", "off"]

MAX_DENY_PATTERNS = 32
MAX_PATTERN_CHARS = 512
_RE2_MAX_MEM = 8 << 20  # per compiled pattern set: a pathological pattern fails to compile


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Actions(_Policy):
    """An action per category of sensitive data; unset categories are inherited."""

    email: Action | None = None
    phone: Action | None = None
    card: Action | None = Field(None, description="Payment card numbers (Luhn-checked).")
    iban: Action | None = Field(None, description="IBANs (country length and mod-97 checked).")
    secret: Action | None = Field(
        None, description="API keys, private key blocks, bearer tokens and JWTs.")

    def merged(self, over: Actions) -> Actions:
        return Actions(**{c: getattr(over, c) or getattr(self, c) for c in CATEGORIES})


def re2_options() -> Any:
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    options.log_errors = False
    return options


class DenyPattern(_Policy):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                      description="Named in the 400 answer and in events; never the text.")
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS,
                         description="An RE2 expression; `(?i)` for case-insensitive.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re2.compile(pattern, re2_options())
        except re2.error as exc:
            detail = exc.args[0] if exc.args else exc
            if isinstance(detail, bytes):
                detail = detail.decode(errors="replace")
            raise ValueError(f"not a valid RE2 expression: {detail}") from None
        return pattern


class GuardrailsPolicy(_Policy):
    """A tenant's, a key's or the server's guardrail policy (unset fields are inherited)."""

    input: Actions = Field(default_factory=Actions, description="Actions on prompts.")
    output: Actions = Field(default_factory=Actions, description="Actions on answers.")
    max_prompt_chars: int | None = Field(
        None, ge=0, le=1 << 30, description="Most characters of prompt text; 0: no limit.")
    max_messages: int | None = Field(
        None, ge=0, le=1 << 20, description="Most messages in a chat request; 0: no limit.")
    deny_patterns: tuple[DenyPattern, ...] | None = Field(
        None, max_length=MAX_DENY_PATTERNS,
        description="Prompts matching any of these are refused (`prompt_denied`).")
    retrieval_injection: InjectionAction | None = Field(
        None, description="Retrieved chunks that try to instruct the model: dropped from the "
        "prompt (`drop`), only recorded (`log`), or not looked at (`off`).")

    @field_validator("deny_patterns")
    @classmethod
    def _unique_names(cls, patterns: tuple[DenyPattern, ...] | None
                      ) -> tuple[DenyPattern, ...] | None:
        names = [p.name for p in patterns or ()]
        if len(set(names)) != len(names):
            raise ValueError("deny pattern names must be unique")
        return patterns

    def merged(self, over: GuardrailsPolicy | None) -> GuardrailsPolicy:
        """This policy with every field that `over` sets taken from `over`."""
        if over is None:
            return self
        fields: dict[str, Any] = {"input": self.input.merged(over.input),
                                  "output": self.output.merged(over.output)}
        for name in ("max_prompt_chars", "max_messages", "deny_patterns",
                     "retrieval_injection"):
            value = getattr(over, name)
            fields[name] = value if value is not None else getattr(self, name)
        return GuardrailsPolicy(**fields)

    def stored(self) -> dict[str, Any]:
        """The JSON kept in the store: only what this policy sets."""
        data = self.model_dump(mode="json", exclude_none=True)
        return {k: v for k, v in data.items() if v != {}}


# Visible by default, enforced by choice: every category is looked for and recorded, nothing
# is changed or refused until an admin says so; instructions hidden in retrieved documents are
# dropped (they only ever reach the model through the platform's own RAG).
BUILTIN = GuardrailsPolicy(
    input=Actions(**dict.fromkeys(CATEGORIES, "log")),
    output=Actions(**dict.fromkeys(CATEGORIES, "log")),
    max_prompt_chars=0, max_messages=0, deny_patterns=(), retrieval_injection="drop")


def compile_deny(patterns: tuple[DenyPattern, ...]) -> Any:
    """One RE2 set matching all `patterns` in a single pass; `Match(text)` gives the indices
    of those that match (None when none does)."""
    compiled = re2.Set.SearchSet(re2_options())
    for p in patterns:
        compiled.Add(p.pattern)
    compiled.Compile()
    return compiled
