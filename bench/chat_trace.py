"""A multi-tenant, multi-turn chat trace for the prefix-cache benchmarks, shared by the real
engines (`bench.prefix_routing`) and the simulator (`bench.prefix_sim`) so both see the same
requests.

Each tenant has its own long system prompt; conversations start as a Poisson process, each
belongs to one tenant, and every turn resends the whole history (system prompt, earlier user
messages and answers) plus a new user message. Messages are token ids that stand for words:
the real engines get them rendered as text (one token per word), the simulator hashes them in
KV blocks. Answers in the history are scripted (the trace is fixed before it is sent), so every
policy gets exactly the same prompts at the same times.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["ChatWorkload", "Turn", "pseudo_words"]

# SmolLM2's ChatML: <|im_start|>role\n ... <|im_end|>\n, then <|im_start|>assistant\n.
IM_START, IM_END, NEWLINE = 1, 2, 198
ROLE_IDS = {"system": (9690,), "user": (4093,), "assistant": (520, 9531)}

_U64 = (1 << 64) - 1
Message = tuple[str, tuple[int, ...]]  # (role, token ids)
Render = Callable[[Sequence[int]], str]


def pseudo_words(ids: Sequence[int]) -> str:
    """Text for token ids when no tokenizer is at hand: one distinct word per id."""
    return "".join(f" w{i}" for i in ids)


@dataclass(frozen=True)
class Turn:
    """One request of the trace."""

    rid: int
    arrival: float  # seconds from the start
    tenant: int
    conversation: int
    messages: tuple[Message, ...]
    output: int  # tokens to generate

    def prompt_ids(self) -> list[int]:
        """The prompt as the chat template renders it."""
        ids: list[int] = []
        for role, content in self.messages:
            ids += [IM_START, *ROLE_IDS[role], NEWLINE, *content, IM_END, NEWLINE]
        return [*ids, IM_START, *ROLE_IDS["assistant"], NEWLINE]

    def blocks(self, block_size: int) -> tuple[int, ...]:
        """Hashes of the prompt's full KV blocks, each chained to the one before it (as vLLM
        names its cache blocks): equal hashes mean equal prefixes."""
        ids = self.prompt_ids()
        out: list[int] = []
        h = 0
        for start in range(0, len(ids) - block_size + 1, block_size):
            h = hash((h, *ids[start:start + block_size])) & _U64  # unsigned, as the gateway's
            out.append(h)
        return tuple(out)

    def chat(self, render: Render) -> list[dict[str, str]]:
        """The messages as an OpenAI chat request carries them."""
        return [{"role": role, "content": render(content)} for role, content in self.messages]


@dataclass(frozen=True)
class ChatWorkload:
    rate: float  # new conversations per second, all tenants together
    conversations: int
    tenants: int = 8
    system_tokens: tuple[int, int] = (1000, 1500)
    turns: tuple[int, int] = (2, 5)
    user_tokens: tuple[int, int] = (16, 64)
    output_tokens: tuple[int, int] = (16, 32)
    think_s: float = 6.0  # mean pause between an answer and the next turn (plus `min_gap_s`)
    min_gap_s: float = 3.0
    seed: int = 0

    @property
    def mean_turns(self) -> float:
        return sum(self.turns) / 2

    def trace(self, vocab: Sequence[int]) -> list[Turn]:
        """The requests in arrival order; `vocab`: the token ids words are drawn from."""
        rng = random.Random(self.seed)

        def words(count: int) -> tuple[int, ...]:
            return tuple(rng.choice(vocab) for _ in range(count))

        systems = [words(rng.randint(*self.system_tokens)) for _ in range(self.tenants)]
        turns: list[Turn] = []
        start = 0.0
        for c in range(self.conversations):
            start += rng.expovariate(self.rate)
            tenant = rng.randrange(self.tenants)
            history: list[Message] = [("system", systems[tenant])]
            at = start
            for _ in range(rng.randint(*self.turns)):
                history.append(("user", words(rng.randint(*self.user_tokens))))
                output = rng.randint(*self.output_tokens)
                turns.append(Turn(-1, at, tenant, c, tuple(history), output))
                history.append(("assistant", words(output)))
                at += self.min_gap_s + rng.expovariate(1.0 / self.think_s)
        turns.sort(key=lambda t: t.arrival)
        return [Turn(i, t.arrival, t.tenant, t.conversation, t.messages, t.output)
                for i, t in enumerate(turns)]
