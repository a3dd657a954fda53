"""Validation of fine-tuning datasets before any training compute is spent.

A supervised job takes an OpenAI-style chat JSONL file: one JSON object per line, each
``{"messages": [{"role": ..., "content": ...}, ...]}``; a DPO job takes OpenAI's preference
format, ``{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
"non_preferred_output": [...]}``. A bad line found mid-training wastes
the GPU time already spent, so the whole file is checked up front, the way OpenAI's
fine-tuning API does, and every problem is reported at once with its line number: the user
fixes the file in one pass instead of one upload per mistake.

``validate_chat_jsonl`` and ``validate_preference_jsonl`` return the parsed examples with their
token counts, or raise ``InvalidDatasetError`` listing the problems.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DatasetError", "Example", "InvalidDatasetError", "PreferenceExample",
           "validate_chat_jsonl", "validate_preference_jsonl"]

ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})
TOP_LEVEL_KEYS = frozenset({"messages"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})
INPUT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
# How many errors InvalidDatasetError's text shows; the full list stays on `.errors`.
SHOWN_ERRORS = 10
# Text with no tokenizer at hand averages about four UTF-8 bytes per token.
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class DatasetError:
    """One problem in a dataset: ``line`` is 1-based, or None for a whole-file problem."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


class InvalidDatasetError(ValueError):
    """The dataset cannot be trained on; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[DatasetError], *, truncated: bool = False) -> None:
        self.errors = list(errors)
        # True when checking stopped at max_errors, so later lines may hold more problems.
        self.truncated = truncated
        super().__init__(self._describe())

    def _describe(self) -> str:
        count = len(self.errors)
        problems = f"{count} problem{'' if count == 1 else 's'}"
        header = f"the dataset has {problems}"
        if self.truncated:
            header = f"the dataset has at least {problems} (checking stopped there)"
        lines = [header + ":", *(str(e) for e in self.errors[:SHOWN_ERRORS])]
        if count > SHOWN_ERRORS:
            lines.append(f"... and {count - SHOWN_ERRORS} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class Example:
    """One valid training conversation and its length in tokens."""

    # Each message has "role" and "content", and "name" / "weight" when the file gave them.
    messages: tuple[dict[str, Any], ...]
    n_tokens: int


@dataclass(frozen=True)
class PreferenceExample:
    """One valid preference pair: a conversation and two answers to it, the first preferred.
    ``n_tokens`` counts both full sequences, prompt included, as training sees them."""

    messages: tuple[dict[str, Any], ...]
    preferred: dict[str, Any]
    non_preferred: dict[str, Any]
    tools: tuple[dict[str, Any], ...]
    n_tokens: int

    def as_chat(self) -> Example:
        """The conversation answered with the preferred output, as a chat example."""
        return Example(messages=(*self.messages, self.preferred), n_tokens=self.n_tokens)


def validate_chat_jsonl(
    data: bytes,
    *,
    tokenizer: Any | None,
    max_tokens: int,
    min_examples: int = 10,
    max_errors: int = 100,
) -> list[Example]:
    """Check a chat JSONL file and return its examples, or raise InvalidDatasetError.

    ``tokenizer`` is a Hugging Face tokenizer with a chat template, used to count each
    example's tokens as training will see them; without one, the count is estimated from
    the UTF-8 length. An example longer than ``max_tokens`` is an error rather than being
    silently truncated, since truncation usually cuts off the assistant's answer.
    Blank lines are ignored. At most ``max_errors`` problems are collected.
    """
    return _validate(data, _check_line, tokenizer=tokenizer, max_tokens=max_tokens,
                     min_examples=min_examples, max_errors=max_errors)


def validate_preference_jsonl(
    data: bytes,
    *,
    tokenizer: Any | None,
    max_tokens: int,
    min_examples: int = 10,
    max_errors: int = 100,
) -> list[PreferenceExample]:
    """Check a preference (DPO) JSONL file; the rules and arguments of `validate_chat_jsonl`.
    Problems name the line and the field, as in ``line 3: preferred_output[0].role must be
    'assistant'``; each answer, with the input before it, must fit in ``max_tokens``."""
    return _validate(data, _check_preference_line, tokenizer=tokenizer, max_tokens=max_tokens,
                     min_examples=min_examples, max_errors=max_errors)


def _validate(data: bytes, check: Any, *, tokenizer: Any | None, max_tokens: int,
              min_examples: int, max_errors: int) -> list[Any]:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if max_errors < 1:
        raise ValueError(f"max_errors must be positive, got {max_errors}")

    errors: list[DatasetError] = []
    examples: list[Any] = []
    seen_content = False
    for number, raw in enumerate(_split_lines(data), start=1):
        if not raw.strip():
            continue
        if len(errors) >= max_errors:
            # A file that is wrong throughout (say, the wrong format) needs no more detail.
            raise InvalidDatasetError(errors[:max_errors], truncated=True)
        seen_content = True
        line_errors, example = check(raw, tokenizer=tokenizer, max_tokens=max_tokens)
        errors.extend(DatasetError(number, message) for message in line_errors)
        if example is not None:
            examples.append(example)

    if not seen_content:
        raise InvalidDatasetError([DatasetError(None, "the file is empty")])
    if len(examples) < min_examples:
        errors.append(DatasetError(None, _too_few(len(examples), min_examples)))
    if len(errors) > max_errors:
        raise InvalidDatasetError(errors[:max_errors], truncated=True)
    if errors:
        raise InvalidDatasetError(errors)
    return examples


def _too_few(found: int, needed: int) -> str:
    plural = "" if found == 1 else "s"
    return f"the file has {found} valid example{plural}; at least {needed} are needed"


def _split_lines(data: bytes) -> list[bytes]:
    # Split on b"\n" only: str.splitlines() would also split on U+2028 and friends, which
    # JSON allows unescaped inside strings. A trailing "\r" is a Windows line ending.
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # A UTF-8 byte-order mark, as some Windows editors write.
    return [line.removesuffix(b"\r") for line in data.split(b"\n")]


def _parse(raw: bytes) -> tuple[str | None, Any]:
    """The line's JSON object, or the reason it is not one."""
    # Decoding line by line, rather than the whole file, lets a bad byte be located.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte {exc.start + 1} of the line)", None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} (column {exc.colno})", None
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}", None
    return None, record


def _check_line(
    raw: bytes, *, tokenizer: Any | None, max_tokens: int
) -> tuple[list[str], Example | None]:
    """Return the line's problems, and its example when it has none."""
    problem, record = _parse(raw)
    if problem is not None:
        return [problem], None
    if "messages" not in record and PREFERENCE_KEYS & record.keys():
        return ['this is a preference (DPO) example; a supervised job needs '
                '{"messages": [...]} lines (use method "dpo" for preference data)'], None

    problems = [
        f'unknown key "{key}"; only "messages" is allowed'
        for key in record
        if key not in TOP_LEVEL_KEYS
    ]
    messages = record.get("messages")
    if "messages" not in record:
        problems.append('missing "messages"')
    elif not isinstance(messages, list):
        problems.append(f'"messages" must be a list, got {_json_type(messages)}')
    elif not messages:
        problems.append('"messages" is empty')
    else:
        problems += _check_messages(messages)
    if problems:
        return problems, None

    messages = record["messages"]  # A non-empty list of well-formed messages by now.
    n_tokens, token_problem = _count_tokens(messages, tokenizer)
    if token_problem is not None:
        return [token_problem], None
    if n_tokens > max_tokens:
        return [f"{n_tokens} tokens, over the model's context of {max_tokens}"], None
    return [], Example(messages=tuple(messages), n_tokens=n_tokens)


def _check_messages(messages: list[Any]) -> list[str]:
    problems: list[str] = []
    for index, message in enumerate(messages, start=1):
        problems += [f"message {index}: {p}" for p in _check_message(message)]
    # The conversation's shape is only judged when every role is known; otherwise one
    # misspelt role would also be reported as, say, a missing assistant turn.
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    known = [role for role in roles if isinstance(role, str) and role in ROLES]
    if len(known) == len(messages):
        problems += _check_order(known)
    return problems


def _check_message(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return [f"expected a JSON object, got {_json_type(message)}"]
    problems = [
        f'unknown key "{key}"; allowed keys are role, content, name and weight'
        for key in message
        if key not in MESSAGE_KEYS
    ]
    role = message.get("role")
    if "role" not in message:
        problems.append('missing "role"')
    elif role not in ROLES:
        problems.append(f"role {json.dumps(role)} is not one of system, user, assistant")

    content = message.get("content")
    if "content" not in message:
        problems.append('missing "content"')
    elif not isinstance(content, str):
        problems.append(f'"content" must be a string, got {_json_type(content)}')
    elif not content.strip():
        # Whitespace-only content teaches nothing and usually means a broken export.
        problems.append('"content" is empty')

    if "name" in message and not isinstance(message["name"], str):
        problems.append(f'"name" must be a string, got {_json_type(message["name"])}')

    if "weight" in message:
        weight = message["weight"]
        # bool is an int in Python, but JSON true/false is not a weight.
        if isinstance(weight, bool) or weight not in (0, 1):
            problems.append(f'"weight" must be 0 or 1, got {json.dumps(weight)}')
        if role in ROLES and role != "assistant":
            problems.append('"weight" is only allowed on assistant messages')
    return problems


def _check_order(roles: list[str]) -> list[str]:
    problems = [
        f"message {index}: a system message may only come first"
        for index, role in enumerate(roles, start=1)
        if role == "system" and index > 1
    ]
    if "user" not in roles:
        problems.append("there must be at least one user message")
    if roles[-1] != "assistant":
        # Training learns from assistant turns; ending elsewhere means a missing answer.
        problems.append("the last message must come from the assistant (missing assistant turn)")
    return problems


def _check_preference_line(
    raw: bytes, *, tokenizer: Any | None, max_tokens: int
) -> tuple[list[str], PreferenceExample | None]:
    """Return the preference line's problems, and its example when it has none."""
    problem, record = _parse(raw)
    if problem is not None:
        return [problem], None
    if "messages" in record and "input" not in record:
        return ['this is a chat (supervised) example; a dpo job needs "input", '
                '"preferred_output" and "non_preferred_output"'], None
    problems = [f'unknown key "{key}"; allowed keys are input, preferred_output and '
                'non_preferred_output' for key in record if key not in PREFERENCE_KEYS]
    problems += _check_input(record.get("input"), "input" in record)
    for field in ("preferred_output", "non_preferred_output"):
        problems += _check_output(record.get(field), field, field in record)
    if problems:
        return problems, None

    messages = record["input"]["messages"]
    preferred, rejected = record["preferred_output"][0], record["non_preferred_output"][0]
    if preferred["content"] == rejected["content"]:
        return ["preferred_output and non_preferred_output are the same answer"], None
    counts = []
    for answer in (preferred, rejected):
        n_tokens, token_problem = _count_tokens([*messages, answer], tokenizer)
        if token_problem is not None:
            return [token_problem], None
        counts.append(n_tokens)
    if max(counts) > max_tokens:
        return [f"{max(counts)} tokens, over the model's context of {max_tokens}"], None
    return [], PreferenceExample(messages=tuple(messages), preferred=preferred,
                                 non_preferred=rejected,
                                 tools=tuple(record["input"].get("tools") or ()),
                                 n_tokens=sum(counts))


def _check_input(value: Any, present: bool) -> list[str]:
    if not present:
        return ['missing "input"']
    if not isinstance(value, dict):
        return [f'"input" must be an object, got {_json_type(value)}']
    problems = [f'input: unknown key "{key}"; allowed keys are messages, tools and '
                'parallel_tool_calls' for key in value if key not in INPUT_KEYS]
    tools = value.get("tools")
    if "tools" in value and (not isinstance(tools, list)
                             or not all(isinstance(t, dict) for t in tools)):
        problems.append("input.tools must be a list of objects")
    if "parallel_tool_calls" in value and not isinstance(value["parallel_tool_calls"], bool):
        problems.append("input.parallel_tool_calls must be true or false")
    messages = value.get("messages")
    if "messages" not in value:
        return [*problems, 'missing "input.messages"']
    if not isinstance(messages, list):
        return [*problems, f"input.messages must be a list, got {_json_type(messages)}"]
    if not messages:
        return [*problems, "input.messages is empty"]
    for index, message in enumerate(messages):
        problems += [f"input.messages[{index}]: {p}" for p in _check_message(message)]
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if len(roles) == len(messages) and all(r in ROLES for r in roles):
        problems += [f"input.messages[{index}]: a system message may only come first"
                     for index, role in enumerate(roles) if role == "system" and index > 0]
        if roles[-1] != "user":
            # The outputs answer the input: it ends with the turn they reply to.
            problems.append("input.messages must end with a user message")
    return problems


def _check_output(value: Any, field: str, present: bool) -> list[str]:
    if not present:
        return [f'missing "{field}"']
    if not isinstance(value, list) or len(value) != 1:
        return [f"{field} must be a list of exactly one assistant message"]
    message = value[0]
    if not isinstance(message, dict):
        return [f"{field}[0] must be an object, got {_json_type(message)}"]
    problems = [f'{field}[0]: unknown key "{key}"; allowed keys are role and content'
                for key in message if key not in ("role", "content")]
    if message.get("role") != "assistant":
        problems.append(f"{field}[0].role must be 'assistant'")
    content = message.get("content")
    if not isinstance(content, str):
        problems.append(f"{field}[0].content must be a string, got {_json_type(content)}")
    elif not content.strip():
        problems.append(f"{field}[0].content is empty")
    return problems


def _count_tokens(messages: list[Any], tokenizer: Any | None) -> tuple[int, str | None]:
    """Return the token count, or an error when the chat template refuses the messages."""
    if tokenizer is None:
        # Only the contents: the JSON around them (and its \u escapes) is not trained on.
        text = "".join(m["content"] for m in messages)
        return len(text.encode("utf-8")) // BYTES_PER_TOKEN, None
    try:
        result = tokenizer.apply_chat_template(messages, tokenize=True)
    # The chat template is model-supplied Jinja that may raise anything on a conversation
    # it does not accept (for instance roles that do not alternate); that is the line's
    # problem, not a crash.
    except Exception as exc:
        return 0, f"the model's chat template rejected it: {exc}"
    return len(_token_ids(result)), None


def _token_ids(result: Any) -> Sequence[Any]:
    # transformers 5 returns a BatchEncoding (a Mapping) by default, older versions a list of
    # ids; len() of a BatchEncoding would count its keys, not its tokens.
    ids = result["input_ids"] if isinstance(result, Mapping) else result
    if len(ids) > 0 and isinstance(ids[0], Sequence):
        ids = ids[0]  # A batch of one conversation.
    return list(ids)


def _json_type(value: Any) -> str:
    """Name a parsed JSON value's type as JSON spells it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
