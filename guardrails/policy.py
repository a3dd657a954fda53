"""A request's guardrail policy, resolved: the built-in defaults, then the server's, the
tenant's and the key's policies (each overriding what it sets), in a form the request path can
apply without further work (deny patterns compiled into one RE2 set).

Principals carry their tenant's and key's policies (read with the key, cached by the
authenticator), so resolving costs no database round trip; resolved policies are cached by
their inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guardrails.schema import (
    BUILTIN,
    CATEGORIES,
    Action,
    Category,
    GuardrailsPolicy,
    InjectionAction,
    compile_deny,
)

if TYPE_CHECKING:  # settings and tenants import the policy schema: types only here
    from llmops.settings import GuardrailsConfig
    from tenancy.tenants import Principal

__all__ = ["OFF", "Policy", "PolicyResolver"]

_CACHE = 4096


@dataclass(frozen=True)
class Policy:
    """What to do, with only the categories that are not `off`."""

    input: Mapping[Category, Action]
    output: Mapping[Category, Action]
    max_prompt_chars: int  # 0: no limit
    max_messages: int  # 0: no limit
    deny_names: tuple[str, ...]
    deny: Any  # an RE2 set of the deny patterns, None when there are none
    retrieval_injection: InjectionAction

    @classmethod
    def of(cls, policy: GuardrailsPolicy) -> Policy:
        """From a policy that sets every field."""
        def active(actions: Any) -> dict[Category, Action]:
            return {c: a for c in CATEGORIES if (a := getattr(actions, c)) not in (None, "off")}

        patterns = policy.deny_patterns or ()
        return cls(input=active(policy.input), output=active(policy.output),
                   max_prompt_chars=policy.max_prompt_chars or 0,
                   max_messages=policy.max_messages or 0,
                   deny_names=tuple(p.name for p in patterns),
                   deny=compile_deny(patterns) if patterns else None,
                   retrieval_injection=policy.retrieval_injection or "off")

    @property
    def looks_at_input(self) -> bool:
        return bool(self.input or self.max_prompt_chars or self.max_messages
                    or self.deny is not None)


OFF = Policy(input={}, output={}, max_prompt_chars=0, max_messages=0, deny_names=(),
             deny=None, retrieval_injection="off")


class PolicyResolver:
    def __init__(self, config: GuardrailsConfig) -> None:
        self.enabled = config.enabled
        self.server = BUILTIN.merged(config.default)
        self._resolve = functools.lru_cache(maxsize=_CACHE)(self._merge)

    def policy(self, who: Principal) -> Policy:
        if not self.enabled:
            return OFF
        return self._resolve(who.tenant_guardrails, who.key_guardrails)

    def _merge(self, tenant: GuardrailsPolicy | None, key: GuardrailsPolicy | None) -> Policy:
        return Policy.of(self.server.merged(tenant).merged(key))
