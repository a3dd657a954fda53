"""Guardrails on streamed answers: the scanner catches a value split across chunks, holds back
only what could still be the start of one, and flushes at the end; the answer filter redacts,
withholds (content_filter) or only records, per choice; the stream relay keeps counting usage and
always ends with `data: [DONE]`."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from gateway.inference.context import RequestContext
from gateway.inference.hooks import GuardrailHook, Hooks, UsageHook
from gateway.inference.sse import SseRelay
from guardrails import Guardrails, OutputFilter, StreamScanner, Tally, redact, scan
from guardrails.schema import CATEGORIES, Action, Category
from llmops.settings import GuardrailsConfig
from tenancy.tenants import Limits, Principal
from tests.guardrails.test_detectors import ORDINARY, POSITIVES

EMAIL = "bob.smith@example.com"
CARD = "4111 1111 1111 1111"


def run(pieces: list[str], categories: tuple[Category, ...] = ("email", "card", "secret")
        ) -> list[str]:
    """What the scanner releases after each piece, redacted, and at the end."""
    scanner = StreamScanner(categories)
    out = []
    for piece in pieces:
        released, found = scanner.feed(piece)
        out.append(redact(released, found))
    released, found = scanner.flush()
    return [*out, redact(released, found)]


def test_a_value_split_across_two_chunks_is_caught() -> None:
    out = run(["Write to bob.smith@exa", "mple.com today"])
    assert out == ["Write to ", "[REDACTED_EMAIL] ", "today"]
    assert EMAIL not in "".join(out)


def test_a_value_split_across_three_chunks_is_caught() -> None:
    out = run(["card 4111 11", "11 1111 11", "11, thanks"])
    assert "".join(out) == "card [REDACTED_CARD], thanks"
    assert out[:2] == ["card ", ""]  # held while it could still be a card number


def test_clean_text_is_released_at_once() -> None:
    # A piece that cannot start a match goes out whole, with nothing held back.
    out = run(["Hello there! ", "How are you? ", "I am fine. "])
    assert out == ["Hello there! ", "How are you? ", "I am fine. ", ""]
    # A word is held only until the next character shows it is not an address.
    assert run(["Hello", " world", "!"]) == ["", "Hello ", "world!", ""]
    # Digits that cannot start a card or phone number (1999: no card network starts
    # with 1) are not held.
    assert run(["in 1999 ", "we sold 12 units "]) == ["in 1999 ", "we sold 12 units ", ""]


def test_what_is_held_is_flushed_at_the_end() -> None:
    assert run(["mail ", "bob.smith@example.com"]) == ["mail ", "", "[REDACTED_EMAIL]"]
    assert run(["the end"]) == ["the ", "end"]
    # A private key cut short (no END line) is redacted up to the end of the text.
    assert run(["-----BEGIN RSA PRIVATE KEY-----\nMIIE", "pAIBAAKC"])[-1] == "[REDACTED_SECRET]"


@pytest.mark.parametrize("category", sorted(POSITIVES))
def test_every_value_is_caught_wherever_the_stream_splits_it(category: str) -> None:
    for value in POSITIVES[category]:
        text = f"Note: {value}, thanks."
        whole = redact(text, scan(text))
        assert value not in whole
        for cut in range(1, len(text)):  # two pieces, cut anywhere
            assert "".join(run([text[:cut], text[cut:]], CATEGORIES)) == whole, (value, cut)
        assert "".join(run(list(text), CATEGORIES)) == whole  # one character at a time


def test_ordinary_text_streams_through_unchanged() -> None:
    text = ORDINARY.read_text()
    assert "".join(run([text[i:i + 3] for i in range(0, len(text), 3)], CATEGORIES)) == text


def test_a_near_miss_is_released_unchanged() -> None:
    assert "".join(run(["card 4111 1111 ", "1111 1112 ok"])) == "card 4111 1111 1111 1112 ok"


def chat_chunk(content: str | None, index: int = 0, finish: str | None = None,
               **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish}], **extra}


def stream(filter_: OutputFilter, pieces: list[str]) -> list[dict[str, Any]]:
    chunks = [chat_chunk(p) for p in pieces[:-1]] + [chat_chunk(pieces[-1], finish="stop")]
    return [c for c in chunks if filter_.chunk(c)]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def actions(**kw: Action) -> dict[Category, Action]:
    return cast(dict[Category, Action], kw)


def test_the_answer_filter_redacts_a_stream() -> None:
    tally = Tally()
    f = OutputFilter(actions(email="redact"), tally)
    out = stream(f, ["Mail bob.sm", "ith@exam", "ple.com now"])
    assert text_of(out) == "Mail [REDACTED_EMAIL] now"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert [e.record() for e in tally.events] == [
        {"stage": "output", "category": "email", "action": "redact", "count": 1}]


def test_a_withheld_value_ends_the_choice_with_content_filter() -> None:
    tally = Tally()
    f = OutputFilter(actions(card="block", email="redact"), tally)
    pieces = ["Mail a@b.io, card 4111 1111", " 1111 1111 and", " more", " text"]
    out = stream(f, pieces)
    assert text_of(out) == "Mail [REDACTED_EMAIL], card "
    assert out[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert len(out) == 2  # the later chunks of the choice are dropped
    assert {(e.category, e.action) for e in tally.events} == {("email", "redact"),
                                                             ("card", "block")}


def test_logged_categories_delay_nothing() -> None:
    tally = Tally()
    f = OutputFilter(actions(email="log"), tally)
    pieces = ["Mail bob.sm", "ith@exam", "ple.com now"]
    out = stream(f, pieces)
    assert [c["choices"][0]["delta"]["content"] for c in out] == pieces
    assert [(e.category, e.action, e.count) for e in tally.events] == [("email", "log", 1)]


def test_choices_are_filtered_apart() -> None:
    f = OutputFilter(actions(email="redact"), Tally())
    first: dict[str, Any] = {"choices": [
        {"index": 0, "delta": {"content": "a: bob.smith@ex"}},
        {"index": 1, "delta": {"content": "b: none"}}]}
    second: dict[str, Any] = {"choices": [
        {"index": 1, "delta": {"content": " here"}, "finish_reason": "stop"},
        {"index": 0, "delta": {"content": "ample.com"}, "finish_reason": "stop"}]}
    assert f.chunk(first) and f.chunk(second)
    texts: dict[int, str] = {}
    for obj in (first, second):
        for c in obj["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["delta"]["content"]
    assert texts == {0: "a: [REDACTED_EMAIL]", 1: "b: none here"}


def test_whole_answers_are_redacted_or_emptied() -> None:
    tally = Tally()
    f = OutputFilter(actions(email="redact", card="block"), tally)
    answer: dict[str, Any] = {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"Write to {EMAIL}."},
         "finish_reason": "stop", "logprobs": {"content": [{"token": "Write"}]}},
        {"index": 1, "message": {"role": "assistant", "content": f"Card {CARD}."},
         "finish_reason": "stop"}]}
    f.answer(answer)
    first, second = answer["choices"]
    assert first["message"]["content"] == "Write to [REDACTED_EMAIL]."
    assert first["logprobs"] is None  # tokens would spell the value out
    assert (second["message"]["content"], second["finish_reason"]) == ("", "content_filter")
    completion: dict[str, Any] = {"choices": [{"index": 0, "text": f"mail {EMAIL}",
                                               "finish_reason": "length"}]}
    f.answer(completion)
    assert completion["choices"][0]["text"] == "mail [REDACTED_EMAIL]"


def tap(guard: OutputFilter | None, **kw: bool) -> SseRelay:
    """A stream relay through the guardrail and usage hooks, as the gateway builds it."""
    who = Principal("key_a", "ten_a", "member", None, Limits(), Limits())
    ctx = RequestContext(who, "req-1", "/v1/chat/completions", "chat", lambda *_: None,
                         model="m", output=guard, client_usage=kw.get("usage", False),
                         client_continuous=kw.get("continuous", False))
    return SseRelay(ctx, Hooks([GuardrailHook(Guardrails(GuardrailsConfig())), UsageHook()]))


def sse(*objs: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs)


def events(data: bytes) -> list[Any]:
    return [e[6:] if e == b"data: [DONE]" else orjson.loads(e[6:])
            for e in data.split(b"\n\n") if e]


def test_the_usage_tap_filters_text_and_still_counts_usage() -> None:
    t = tap(OutputFilter(actions(email="redact"), Tally()), usage=True)
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    raw = [sse(chat_chunk("Mail bob.sm", usage=usage)), sse(chat_chunk("ith@exam", usage=usage)),
           sse(chat_chunk("ple.com", usage=usage)),  # the stream ends without a finish reason
           sse({**chat_chunk(None), "choices": [], "usage": usage}) + b"data: [DONE]\n\n"]
    out = b"".join(t.feed(chunk[:7]) + t.feed(chunk[7:]) for chunk in raw) + t.tail()
    got = events(out)
    assert got[-1] == b"[DONE]"
    texts = "".join(c["choices"][0]["delta"].get("content") or "" for c in got[:-1]
                    if isinstance(c, dict) and c["choices"])
    assert texts == "Mail [REDACTED_EMAIL]"
    assert got[-2]["choices"] == [] and got[-2]["usage"] == usage  # the usage chunk, last
    assert all("usage" not in c for c in got[:-2])  # continuous stats were not asked for
    assert (t.ctx.prompt_tokens, t.ctx.completion_tokens) == (5, 3)


def test_the_usage_tap_drops_chunks_of_a_withheld_choice() -> None:
    t = tap(OutputFilter(actions(card="block"), Tally()))
    out = t.feed(sse(chat_chunk(f"Card {CARD} and"), chat_chunk(" more", finish="length"))
                 + b"data: [DONE]\n\n")
    got = events(out)
    assert got[-1] == b"[DONE]" and len(got) == 2
    assert got[0]["choices"][0]["delta"]["content"] == "Card "
    assert got[0]["choices"][0]["finish_reason"] == "content_filter"
    assert t.ctx.finish_reasons == ["content_filter"]
