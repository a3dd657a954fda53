"""Token-window chunking with the embedding model's tokenizer, and `chunking_strategy`."""

from __future__ import annotations

import random
from typing import Any

import pytest

from retrieval import Chunk, ChunkingStrategy, InvalidChunkingError, chunk_text


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from llmops.cli import models_home
    from llmops.cli.models import prepare_models

    return AutoTokenizer.from_pretrained(prepare_models(models_home())["embedding"])


VOCABULARY = ("the river flows past unbelievably industrious beavers, whose dams "
              "(constructed overnight) astonish caf\u00e9 owners in M\u00fcnchen \u6771\u4eac "
              "antidisestablishmentarianism 3.14159 e-mail well-known \U0001f642")


def prose(words: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    vocabulary = VOCABULARY.split()
    parts = []
    for i in range(words):
        parts.append(rng.choice(vocabulary))
        parts.append(".\n\n" if i % 37 == 36 else rng.choice([" ", " ", " ", "  ", "\n"]))
    return "".join(parts)


def token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
    return [tuple(span) for span in encoded["offset_mapping"]]


def tokens_in(spans: list[tuple[int, int]], chunk: Chunk) -> list[int]:
    return [i for i, (s, e) in enumerate(spans) if s >= chunk.start and e <= chunk.end]


@pytest.mark.parametrize(("max_tokens", "overlap"), [(256, 128), (100, 0), (120, 17)])
def test_chunks_are_exact_slices_within_bounds_and_overlap(tokenizer: Any, max_tokens: int,
                                                           overlap: int) -> None:
    text = prose(1500)
    chunks = chunk_text(text, tokenizer, max_tokens, overlap)
    spans = token_spans(tokenizer, text)
    assert len(chunks) > 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start == spans[0][0] and chunks[-1].end == spans[-1][1]
    previous: list[int] = []
    for chunk in chunks:
        assert text[chunk.start:chunk.end] == chunk.text
        mine = tokens_in(spans, chunk)
        assert 0 < len(mine) <= max_tokens
        # Each chunk on its own also fits the model (no word was cut, so nothing re-splits).
        assert len(token_spans(tokenizer, chunk.text)) <= max_tokens
        if previous:
            shared = len(set(previous) & set(mine))
            # Exactly `overlap`, or a few more when that would have started mid-word.
            assert overlap <= shared <= overlap + 8
            assert mine[0] > previous[0] and mine[-1] > previous[-1]
            if overlap == 0:
                assert mine[0] == previous[-1] + 1
        previous = mine


def test_chunks_do_not_cut_words(tokenizer: Any) -> None:
    text = " ".join(["antidisestablishmentarianism"] * 200)  # 6 tokens per word
    for chunk in chunk_text(text, tokenizer, 100, 20):
        assert chunk.text.strip() == chunk.text
        assert set(chunk.text.split()) == {"antidisestablishmentarianism"}


def test_short_and_empty_texts(tokenizer: Any) -> None:
    assert chunk_text("  Hello, world!  ", tokenizer, 256, 128) == [
        Chunk(0, 2, 15, "Hello, world!")]
    assert chunk_text(" \n ", tokenizer, 256, 128) == []


def test_auto_is_capped_to_the_embedding_context() -> None:
    assert ChunkingStrategy.from_request(None, 256) == ChunkingStrategy("auto", 256, 128)
    assert ChunkingStrategy.from_request({"type": "auto"}, 256) == ChunkingStrategy(
        "auto", 256, 128)
    assert ChunkingStrategy.from_request({"type": "auto"}, 8192) == ChunkingStrategy(
        "auto", 800, 400)
    assert ChunkingStrategy.auto(256).as_openai() == {
        "type": "static", "static": {"max_chunk_size_tokens": 256, "chunk_overlap_tokens": 128}}


def test_static_strategy() -> None:
    strategy = ChunkingStrategy.from_request(
        {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 50}},
        256)
    assert strategy == ChunkingStrategy("static", 200, 50)


STATIC = "chunking_strategy.static"


@pytest.mark.parametrize(("request_", "param", "message"), [
    ("auto", "chunking_strategy", "must be an object"),
    ({"type": "semantic"}, "chunking_strategy.type", "expected 'auto' or 'static'"),
    ({"type": "auto", "size": 3}, "chunking_strategy.size", "Unknown parameter"),
    ({"type": "static"}, STATIC, "must be an object"),
    ({"type": "static", "static": {"chunk_overlap_tokens": 0}},
     f"{STATIC}.max_chunk_size_tokens", "Missing required parameter"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}},
     f"{STATIC}.max_chunk_size_tokens", "between 100 and 4096, got 99"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0}},
     f"{STATIC}.max_chunk_size_tokens", "between 100 and 4096"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": 0}},
     f"{STATIC}.max_chunk_size_tokens", "embedding model reads at most 256 tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": "200", "chunk_overlap_tokens": 0}},
     f"{STATIC}.max_chunk_size_tokens", "must be an integer"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}},
     f"{STATIC}.chunk_overlap_tokens", "between 0 and half of max_chunk_size_tokens (100)"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": -1}},
     f"{STATIC}.chunk_overlap_tokens", "got -1"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": True}},
     f"{STATIC}.chunk_overlap_tokens", "must be an integer"),
])
def test_invalid_strategies_name_the_field(request_: Any, param: str, message: str) -> None:
    with pytest.raises(InvalidChunkingError) as info:
        ChunkingStrategy.from_request(request_, 256)
    assert info.value.param == param
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
