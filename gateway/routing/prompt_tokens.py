"""A request's prompt as the engine will tokenize it (the model's own tokenizer and chat
template), so that precise prefix routing can name its blocks as the engine's events do.

Tokenizing costs about 10 µs per token here, while rendering the chat template costs almost
nothing; conversations resend the same system prompt and history. So the rendered prompt is cut
at the tokenizer's added tokens (`<|im_start|>` and the like, which the tokenizer itself splits
on before anything else) and the pieces between them are tokenized through a bounded cache:
only a conversation's new turn is tokenized again."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Protocol

from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest

__all__ = ["PromptTokenizer", "load_prompt_tokenizer"]


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


class PromptTokenizer:
    def __init__(
        self,
        tokenizer: _Tokenizer,
        added_tokens: dict[str, int] | None = None,
        *,
        cache_pieces: int = 2048,
    ) -> None:
        """`added_tokens`: the tokenizer's added tokens (content -> id) that it matches
        verbatim, so that the text between them is tokenized on its own."""
        self.tokenizer = tokenizer
        self.added = added_tokens or {}
        # Longest first, so that a token that contains another wins.
        alternatives = sorted(self.added, key=len, reverse=True)
        self._split = (re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
                       if alternatives else None)
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self.cache_pieces = cache_pieces

    def tokens(self, request: OpenAIRequest) -> list[int] | None:
        """The prompt's token ids; None when they cannot be known here (images, several
        prompts in one request)."""
        if isinstance(request, ChatCompletionRequest):
            messages = []
            for m in request.messages:
                message = _message(m.model_dump(exclude_none=True))
                if message is None:
                    return None
                messages.append(message)
            text = self.tokenizer.apply_chat_template(
                messages, tools=request.tools, add_generation_prompt=True, tokenize=False)
            return self.encode(str(text))  # the template wrote any special tokens itself
        if isinstance(request, CompletionRequest):
            prompt = request.prompt
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if prompt and all(isinstance(t, int) for t in prompt):
                return list(prompt)  # type: ignore[arg-type]
        return None

    def encode(self, text: str) -> list[int]:
        """`text` tokenized without adding special tokens, piece by piece through the cache."""
        if self._split is None:
            return self._piece(text)
        ids: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.added[piece])
            elif piece:
                ids += self._piece(piece)
        return ids

    def _piece(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is not None:
            self._cache.move_to_end(text)
            return ids
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self._cache[text] = ids
        if len(self._cache) > self.cache_pieces:
            self._cache.popitem(last=False)
        return ids


def _message(message: dict[str, Any]) -> dict[str, Any] | None:
    """Text parts joined by newlines, as vLLM renders them for string-content templates."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return None
        message = {**message, "content": "\n".join(p["text"] for p in content)}
    return message


def load_prompt_tokenizer(weights: str) -> PromptTokenizer:
    """Loads the tokenizer from the model's weights folder (blocking: call it off the event
    loop). transformers is needed only for precise prefix routing, so it is imported here."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(weights)
    added = tokenizer.added_tokens_decoder
    # Tokens that strip whitespace around them, or match only after normalization, change the
    # text beside them: cut nothing then (whole prompts are still cached).
    verbatim = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized)
                   for t in added.values())
    return PromptTokenizer(tokenizer, {t.content: i for i, t in added.items()}
                           if verbatim else None)
