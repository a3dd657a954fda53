"""Chat fine-tuning datasets: what a valid file gives back, and how each mistake is reported."""

from __future__ import annotations

import json
from typing import Any

import pytest
import transformers

from finetune.dataset import DatasetError, Example, InvalidDatasetError, validate_chat_jsonl
from llmops.cli import models_home
from llmops.cli.models import prepare_models


def chat(question: str = "What is 2+2?", answer: str = "4.") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def jsonl(*records: object) -> bytes:
    """One line per record; a str record is written verbatim, anything else as JSON."""
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode()


def validate(data: bytes, **kwargs: Any) -> list[Example]:
    # min_examples=0 keeps the one-line files below from also failing the min-examples rule.
    options: dict[str, Any] = {"tokenizer": None, "max_tokens": 2048, "min_examples": 0}
    return validate_chat_jsonl(data, **{**options, **kwargs})


def errors_of(data: bytes, **kwargs: Any) -> list[DatasetError]:
    with pytest.raises(InvalidDatasetError) as caught:
        validate(data, **kwargs)
    return caught.value.errors


def only_error(data: bytes, **kwargs: Any) -> DatasetError:
    errors = errors_of(data, **kwargs)
    assert len(errors) == 1, errors
    return errors[0]


# A valid file


def test_valid_file_returns_examples_with_token_counts() -> None:
    system = {"role": "system", "content": "Be brief."}
    weighted = {"role": "assistant", "content": "Paris.", "weight": 1}
    first = {"messages": [system, {"role": "user", "content": "Capital of France?"}, weighted]}

    examples = validate(jsonl(first, chat("ab", "cdefgh")))

    assert examples[0].messages == tuple(first["messages"])  # "weight": 1 kept as given
    assert examples[1].messages == tuple(chat("ab", "cdefgh")["messages"])
    # Without a tokenizer, a quarter of the contents' UTF-8 bytes: "abcdefgh" is 8 bytes.
    assert examples[1].n_tokens == 2


def test_blank_lines_are_skipped() -> None:
    data = b"\n" + jsonl(chat()) + b"\n\n   \r\n" + jsonl(chat()) + b"\n"
    assert len(validate(data, min_examples=2)) == 2


# Whole-file problems


def test_empty_file() -> None:
    assert only_error(b"") == DatasetError(None, "the file is empty")
    assert only_error(b"\n \n").message == "the file is empty"


def test_too_few_examples() -> None:
    error = only_error(jsonl(chat(), chat(), chat()), min_examples=10)
    assert error == DatasetError(None, "the file has 3 valid examples; at least 10 are needed")


def test_invalid_lines_do_not_count_towards_min_examples() -> None:
    errors = errors_of(jsonl(chat(), "not json", chat()), min_examples=3)
    assert [str(e) for e in errors][-1] == "the file has 2 valid examples; at least 3 are needed"


# Lines that are not a JSON object


def test_not_utf8() -> None:
    error = only_error(jsonl(chat()) + b'\n{"messages": "caf\xe9"}')
    assert error.line == 2
    assert "not valid UTF-8" in error.message


def test_not_json() -> None:
    error = only_error(jsonl(chat(), '{"messages": [}'))
    assert error.line == 2
    assert error.message.startswith("not valid JSON")


def test_not_an_object() -> None:
    error = only_error(jsonl(chat(), [1, 2]))
    assert str(error) == "line 2: expected a JSON object, got an array"


# The top level


def test_unknown_top_level_key() -> None:
    error = only_error(jsonl({**chat(), "tools": []}))
    assert error.line == 1
    assert 'unknown key "tools"' in error.message


def test_missing_messages() -> None:
    assert str(only_error(jsonl({}))) == 'line 1: missing "messages"'


def test_messages_not_a_list() -> None:
    error = only_error(jsonl({"messages": "hello"}))
    assert str(error) == 'line 1: "messages" must be a list, got a string'


def test_messages_empty() -> None:
    assert str(only_error(jsonl({"messages": []}))) == 'line 1: "messages" is empty'


# Each message


def with_message(message: object) -> dict[str, Any]:
    """A conversation whose first message is `message`, followed by a valid exchange."""
    return {"messages": [message, *chat()["messages"]]}


def test_message_not_an_object() -> None:
    error = only_error(jsonl(with_message("hello")))
    assert str(error) == "line 1: message 1: expected a JSON object, got a string"


def test_unknown_role() -> None:
    error = only_error(jsonl(with_message({"role": "tool", "content": "42"})))
    assert error.line == 1
    assert 'role "tool" is not one of system, user, assistant' in error.message


def test_missing_role() -> None:
    error = only_error(jsonl(with_message({"content": "hi"})))
    assert error.message == 'message 1: missing "role"'


def test_missing_content() -> None:
    error = only_error(jsonl(with_message({"role": "user"})))
    assert error.message == 'message 1: missing "content"'


def test_content_not_a_string() -> None:
    error = only_error(jsonl(with_message({"role": "user", "content": [{"type": "text"}]})))
    assert error.message == 'message 1: "content" must be a string, got an array'


def test_empty_content() -> None:
    error = only_error(jsonl(with_message({"role": "user", "content": "  "})))
    assert error.message == 'message 1: "content" is empty'


def test_unknown_message_key() -> None:
    error = only_error(jsonl(with_message({"role": "user", "content": "hi", "tool_calls": []})))
    assert error.line == 1
    assert 'message 1: unknown key "tool_calls"' in error.message


def test_weight_must_be_0_or_1() -> None:
    answer = {"role": "assistant", "content": "4.", "weight": 0.5}
    error = only_error(jsonl({"messages": [{"role": "user", "content": "2+2?"}, answer]}))
    assert error.message == 'message 2: "weight" must be 0 or 1, got 0.5'


def test_weight_only_on_assistant_messages() -> None:
    error = only_error(jsonl(with_message({"role": "user", "content": "hi", "weight": 0})))
    assert error.message == 'message 1: "weight" is only allowed on assistant messages'


# The shape of the conversation


def test_system_message_only_first() -> None:
    late = chat()["messages"] + [{"role": "system", "content": "Be brief."}]
    late.append({"role": "assistant", "content": "OK."})
    error = only_error(jsonl({"messages": late}))
    assert str(error) == "line 1: message 3: a system message may only come first"


def test_at_least_one_user_message() -> None:
    error = only_error(jsonl({"messages": [{"role": "assistant", "content": "Hello!"}]}))
    assert str(error) == "line 1: there must be at least one user message"


def test_missing_assistant_turn() -> None:
    error = only_error(jsonl(chat(), {"messages": [{"role": "user", "content": "Hi"}]}))
    assert error.line == 2
    assert "the last message must come from the assistant" in error.message


def test_too_long_without_tokenizer() -> None:
    # "What is 2+2?" is 12 bytes, so the contents are 400 bytes: 100 estimated tokens.
    error = only_error(jsonl(chat(answer="x" * 388)), max_tokens=50)
    assert str(error) == "line 1: 100 tokens, over the model's context of 50"


# Many problems at once


def test_every_problem_is_reported() -> None:
    data = jsonl(
        chat(),
        "oops",
        {"messages": [{"role": "user", "content": ""}, {"role": "bot", "content": "x"}]},
        "",
        {"messages": [{"role": "user", "content": "Hi"}]},
    )
    errors = errors_of(data, min_examples=2)
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (2, "not valid JSON"),
        (3, "message 1"),
        (3, "message 2"),
        (5, "the last message must come from the assistant (missing assistant turn)"),
        (None, "the file has 1 valid example; at least 2 are needed"),
    ]


def test_error_text_lists_the_first_ten() -> None:
    caught = InvalidDatasetError([DatasetError(n, "bad") for n in range(1, 13)])
    text = str(caught)
    assert text.splitlines()[0] == "the dataset has 12 problems:"
    assert "line 10: bad" in text
    assert "line 11: bad" not in text
    assert text.endswith("... and 2 more")


def test_checking_stops_at_max_errors() -> None:
    with pytest.raises(InvalidDatasetError) as caught:
        validate(jsonl(*["nope"] * 20), max_errors=5)
    assert [e.line for e in caught.value.errors] == [1, 2, 3, 4, 5]
    assert caught.value.truncated


# With a tokenizer


class ListTokenizer:
    """Like transformers 4: apply_chat_template returns a plain list of ids."""

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> list[int]:
        if messages[0]["role"] == "system":
            raise ValueError("System role not supported")
        return list(range(7))


def test_tokenizer_returning_a_list_of_ids() -> None:
    [example] = validate(jsonl(chat()), tokenizer=ListTokenizer())
    assert example.n_tokens == 7


def test_chat_template_refusal_is_a_line_error() -> None:
    error = only_error(jsonl(with_message({"role": "system", "content": "Be brief."})),
                       tokenizer=ListTokenizer())
    assert str(error) == ("line 1: the model's chat template rejected it: "
                          "System role not supported")


def test_real_tokenizer_counts_with_the_chat_template() -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(prepare_models(models_home())["chat"])
    short, long = chat(), chat(answer="word " * 300)

    with pytest.raises(InvalidDatasetError) as caught:
        validate_chat_jsonl(jsonl(short, long), tokenizer=tokenizer, max_tokens=256,
                            min_examples=1)
    [error] = caught.value.errors
    assert error.line == 2
    assert error.message.endswith("tokens, over the model's context of 256")

    [example] = validate_chat_jsonl(jsonl(short), tokenizer=tokenizer, max_tokens=256,
                                    min_examples=1)
    encoded = tokenizer.apply_chat_template(short["messages"], tokenize=True)
    # transformers 5 returns a BatchEncoding, whose len() is its number of keys.
    is_mapping = isinstance(encoded, dict | transformers.BatchEncoding)
    ids = encoded["input_ids"] if is_mapping else encoded
    assert example.n_tokens == len(ids) > 10  # the template adds a default system prompt
