"""A request's prompt as the engine will tokenize it (the model's own tokenizer and chat
template), so that precise prefix routing can name its blocks as the engine's events do."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.inference.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest

__all__ = ["PromptTokenizer", "load_prompt_tokenizer"]


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


class PromptTokenizer:
    def __init__(self, tokenizer: _Tokenizer) -> None:
        self.tokenizer = tokenizer

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
            ids = self.tokenizer.apply_chat_template(
                messages, tools=request.tools, add_generation_prompt=True, tokenize=True,
                return_dict=False)
            return list(ids)
        if isinstance(request, CompletionRequest):
            prompt = request.prompt
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if prompt and all(isinstance(t, int) for t in prompt):
                return list(prompt)  # type: ignore[arg-type]
        return None


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

    return PromptTokenizer(AutoTokenizer.from_pretrained(weights))
