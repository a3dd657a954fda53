"""Split a document into overlapping token windows, and OpenAI's `chunking_strategy`.

Windows are counted in the embedding model's own tokens, so a chunk never exceeds what the
model reads, and located by the tokenizer's character offsets, so every chunk is an exact
slice of the document (`text[chunk.start:chunk.end] == chunk.text`) that a citation can
point at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "AUTO_CHUNK_OVERLAP_TOKENS",
    "AUTO_MAX_CHUNK_TOKENS",
    "Chunk",
    "ChunkingStrategy",
    "InvalidChunkingError",
    "chunk_text",
]

# OpenAI's `auto` strategy; we cap it to the embedding model's context (see ChunkingStrategy).
AUTO_MAX_CHUNK_TOKENS = 800
AUTO_CHUNK_OVERLAP_TOKENS = 400
# OpenAI's bounds for the `static` strategy.
MIN_CHUNK_TOKENS = 100
MAX_CHUNK_TOKENS = 4096


class InvalidChunkingError(ValueError):
    """A bad `chunking_strategy`; `param` is the offending field's path for the API error."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[InvalidChunkingError], tuple[str, str]]:
        return type(self), (str(self), self.param)  # survives pickling (Celery)


@dataclass(frozen=True)
class Chunk:
    """The `index`-th chunk: `text` is `document[start:end]` (character offsets)."""

    index: int
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class ChunkingStrategy:
    """How a file is chunked: OpenAI's `auto` or `static`, resolved to token counts.

    `auto` means 800-token chunks with 400 tokens of overlap at OpenAI, but a chunk longer
    than the embedding model's context would be silently truncated when embedded, so `auto`
    is capped to the context: with all-MiniLM-L6-v2 (256 tokens) it becomes 256 / 128.
    `static` must fit the context too, and is rejected otherwise. The embedder adds its own
    special tokens ([CLS], [SEP]) on top; pass `embedding_context` net of them to leave room.
    """

    type: str
    max_tokens: int
    overlap_tokens: int

    def __post_init__(self) -> None:
        if self.type not in ("auto", "static"):
            raise InvalidChunkingError(
                "chunking_strategy.type must be 'auto' or 'static'.", "chunking_strategy.type")
        if self.max_tokens < 1:
            raise InvalidChunkingError(
                "chunking_strategy.static.max_chunk_size_tokens must be positive.",
                "chunking_strategy.static.max_chunk_size_tokens")
        if not 0 <= self.overlap_tokens <= self.max_tokens // 2:
            raise InvalidChunkingError(
                "chunking_strategy.static.chunk_overlap_tokens must be between 0 and half of "
                "max_chunk_size_tokens.", "chunking_strategy.static.chunk_overlap_tokens")

    @classmethod
    def auto(cls, embedding_context: int) -> ChunkingStrategy:
        size = min(AUTO_MAX_CHUNK_TOKENS, embedding_context)
        return cls("auto", size, min(AUTO_CHUNK_OVERLAP_TOKENS, size // 2))

    @classmethod
    def from_request(cls, obj: dict[str, Any] | None, embedding_context: int) -> ChunkingStrategy:
        """Validate a request's `chunking_strategy` (None means auto) with OpenAI's bounds."""
        if obj is None:
            return cls.auto(embedding_context)
        if not isinstance(obj, dict):
            raise InvalidChunkingError(
                "chunking_strategy must be an object.", "chunking_strategy")
        kind = obj.get("type")
        if kind == "auto":
            _no_extra_keys(obj, {"type"}, "chunking_strategy")
            return cls.auto(embedding_context)
        if kind != "static":
            raise InvalidChunkingError(
                f"Invalid chunking_strategy.type {kind!r}: expected 'auto' or 'static'.",
                "chunking_strategy.type")
        _no_extra_keys(obj, {"type", "static"}, "chunking_strategy")
        static = obj.get("static")
        if not isinstance(static, dict):
            raise InvalidChunkingError(
                "chunking_strategy.static must be an object with max_chunk_size_tokens and "
                "chunk_overlap_tokens.", "chunking_strategy.static")
        _no_extra_keys(static, {"max_chunk_size_tokens", "chunk_overlap_tokens"},
                       "chunking_strategy.static")
        size_param = "chunking_strategy.static.max_chunk_size_tokens"
        size = _integer(static, "max_chunk_size_tokens", size_param)
        if not MIN_CHUNK_TOKENS <= size <= MAX_CHUNK_TOKENS:
            raise InvalidChunkingError(
                f"{size_param} must be between {MIN_CHUNK_TOKENS} and {MAX_CHUNK_TOKENS}, "
                f"got {size}.", size_param)
        if size > embedding_context:
            raise InvalidChunkingError(
                f"{size_param} is {size}, but the embedding model reads at most "
                f"{embedding_context} tokens per chunk.", size_param)
        overlap_param = "chunking_strategy.static.chunk_overlap_tokens"
        overlap = _integer(static, "chunk_overlap_tokens", overlap_param)
        if not 0 <= overlap <= size // 2:
            raise InvalidChunkingError(
                f"{overlap_param} must be between 0 and half of max_chunk_size_tokens "
                f"({size // 2}), got {overlap}.", overlap_param)
        return cls("static", size, overlap)

    def as_openai(self) -> dict[str, Any]:
        """The strategy as OpenAI reports it on a vector-store file (always `static`)."""
        return {"type": "static", "static": {
            "max_chunk_size_tokens": self.max_tokens,
            "chunk_overlap_tokens": self.overlap_tokens}}


def _no_extra_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise InvalidChunkingError(f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}")


def _integer(obj: dict[str, Any], key: str, param: str) -> int:
    value = obj.get(key)
    if value is None:
        raise InvalidChunkingError(f"Missing required parameter: '{param}'.", param)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidChunkingError(f"{param} must be an integer, got {value!r}.", param)
    return value


def chunk_text(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int,
               overlap_tokens: int) -> list[Chunk]:
    """Windows of at most `max_tokens` tokens, each sharing `overlap_tokens` with the next.

    A window that would end inside a word ends before that word instead (when that keeps at
    least half the window), and the next one starts at that word's beginning, so words are
    not cut in half except inside a single over-long "word" (a URL, a base64 blob).
    """
    if max_tokens < 1 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError("need max_tokens >= 1 and 0 <= overlap_tokens < max_tokens")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                         return_attention_mask=False, return_token_type_ids=False,
                         verbose=False)
    offsets: list[tuple[int, int]] = list(encoding["offset_mapping"])
    words: list[int | None] = encoding.word_ids()
    n = len(offsets)
    chunks: list[Chunk] = []
    begin = 0
    while begin < n:
        end = min(begin + max_tokens, n)
        if end < n and _inside_word(words, end):
            word_start = _word_start(words, end)
            if word_start - begin >= max(max_tokens // 2, overlap_tokens + 1):
                end = word_start
        start_char, end_char = offsets[begin][0], offsets[end - 1][1]
        chunks.append(Chunk(len(chunks), start_char, end_char, text[start_char:end_char]))
        if end == n:
            break
        following = end - overlap_tokens
        if _inside_word(words, following):
            # Start at the word's beginning: a bit more overlap, but no half word.
            following = max(_word_start(words, following), begin + 1)
        begin = following
    return chunks


def _inside_word(words: list[int | None], i: int) -> bool:
    """Whether token `i` continues the word of token `i - 1`."""
    return 0 < i < len(words) and words[i] is not None and words[i] == words[i - 1]


def _word_start(words: list[int | None], i: int) -> int:
    while _inside_word(words, i):
        i -= 1
    return i
