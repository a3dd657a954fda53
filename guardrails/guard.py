"""The gateway's guardrails, as the proxy uses them: a request's policy, its prompt checked
(and maybe redacted), its answer filtered, and retrieved chunks screened for injected
instructions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from guardrails.events import Tally
from guardrails.injection import injection_marker
from guardrails.inputs import check_input
from guardrails.outputs import OutputFilter
from guardrails.policy import Policy, PolicyResolver

if TYPE_CHECKING:  # settings and tenants import the policy schema: types only here
    from llmops.settings import GuardrailsConfig
    from tenancy.tenants import Principal

__all__ = ["Guardrails", "Screened"]


class _Chunk(Protocol):
    @property
    def text(self) -> str: ...


class Screened:
    """Which retrieved chunks to keep, and why the others were dropped."""

    def __init__(self, kept: list[int], dropped: dict[int, str]) -> None:
        self.kept = kept
        self.dropped = dropped  # chunk index -> the marker found in it


class Guardrails:
    def __init__(self, config: GuardrailsConfig) -> None:
        self.resolver = PolicyResolver(config)

    def policy(self, who: Principal) -> Policy:
        return self.resolver.policy(who)

    @staticmethod
    def check_input(policy: Policy, payload: dict[str, Any], tally: Tally
                    ) -> dict[str, Any] | None:
        """Raise a 400 for a refused prompt; the redacted fields, if any."""
        if not policy.looks_at_input:
            return None
        return check_input(policy, payload, tally)

    @staticmethod
    def output_filter(policy: Policy, tally: Tally) -> OutputFilter | None:
        return OutputFilter(policy.output, tally) if policy.output else None

    @staticmethod
    def screen(policy: Policy, chunks: Sequence[_Chunk], tally: Tally) -> Screened:
        """Chunks carrying prompt-injection markers: dropped (or only recorded)."""
        kept, dropped = [], {}
        for i, chunk in enumerate(chunks):
            marker = (injection_marker(chunk.text) if policy.retrieval_injection != "off"
                      else None)
            if marker is None:
                kept.append(i)
                continue
            action = policy.retrieval_injection
            tally.add("retrieval", "prompt_injection", action, 1,
                      f"retrieved chunk with an injection marker ({marker})", rule=marker)
            if action == "drop":
                dropped[i] = marker
            else:
                kept.append(i)
        return Screened(kept, dropped)
