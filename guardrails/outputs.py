"""Guardrails on answers: sensitive data in what the model wrote is redacted, withheld or only
recorded, in whole answers and in streams.

Withholding follows OpenAI's content filter: the choice ends with `finish_reason:
"content_filter"`. A whole answer's text is emptied; a stream's choice ends where the data
would have begun (the clean text before it was sent already, as it should be) and its later
chunks are dropped. In streams, each choice's text goes through a `StreamScanner` for the
categories to redact or withhold (which holds back only what could be the start of a match)
and then, as sent, through one for the categories that are only recorded (which delays
nothing). Only `content` (chat) and `text` (completions) are looked at; while any category is
redacted or withheld, token log-probabilities (which spell out the text) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guardrails.detectors import Finding, redact, scan
from guardrails.events import Tally
from guardrails.inputs import LABELS
from guardrails.schema import Action, Category
from guardrails.stream import StreamScanner

__all__ = ["OutputFilter"]


class _Choice:
    __slots__ = ("blocked", "redactor", "watcher")

    def __init__(self, hold: list[Category], watch: list[Category]) -> None:
        self.redactor = StreamScanner(hold) if hold else None
        self.watcher = StreamScanner(watch) if watch else None
        self.blocked = False


class OutputFilter:
    """One request's answer filter: `answer` for a whole answer, `chunk` for each event of a
    stream (in order) and `end` once the stream's events are over."""

    def __init__(self, actions: Mapping[Category, Action], tally: Tally) -> None:
        self.actions = actions
        self.tally = tally
        self.hold = [c for c, a in actions.items() if a in ("redact", "block")]
        self.watch = [c for c, a in actions.items() if a == "log"]
        self._choices: dict[int, _Choice] = {}
        self._last: dict[str, Any] = {}  # the last chunk's id, model, ...: for `end`'s chunk
        self._chat = True

    # Whole answers.

    def answer(self, obj: dict[str, Any]) -> None:
        """Filter an answer (a chat completion or a completion) in place."""
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            holder, key = (message, "content") if isinstance(message, dict) else (choice, "text")
            text = holder.get(key)
            if self.hold and "logprobs" in choice:
                choice["logprobs"] = None
            if not isinstance(text, str) or not text:
                continue
            findings = scan(text, self.actions)
            blocked = [f for f in findings if self.actions[f.category] == "block"]
            if blocked:
                holder[key] = ""
                choice["finish_reason"] = "content_filter"
                for f in blocked:
                    self._note(f.category, "block", choice)
                continue
            for f in findings:
                self._note(f.category, self.actions[f.category], choice)
            holder[key] = redact(text, [f for f in findings
                                        if self.actions[f.category] == "redact"])

    def quote(self, text: str) -> str:
        """A retrieved passage shown to the client (a citation's quote): what would be
        redacted or withheld in an answer is redacted."""
        findings = scan(text, self.actions)
        for f in findings:
            self.tally.add("output", f.category, self.actions[f.category], 1,
                           f"{LABELS[f.category]} in a citation's quote")
        return redact(text, [f for f in findings if self.actions[f.category] != "log"])

    # Streams.

    def chunk(self, obj: dict[str, Any]) -> bool:
        """Filter a stream chunk in place; False when nothing is left of it to send."""
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            return True
        self._last = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        kept = []
        for choice in choices:
            if not isinstance(choice, dict):
                kept.append(choice)
                continue
            state = self._state(choice)
            if state.blocked:
                continue  # the choice ended with the data it would have shown
            delta = choice.get("delta")
            self._chat = isinstance(delta, dict)
            holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
            text = holder.get(key)
            out = self._feed(state, text, choice) if isinstance(text, str) and text else ""
            if choice.get("finish_reason") and not state.blocked:
                out += self._flush(state, choice)
            if state.blocked:
                choice["finish_reason"] = "content_filter"
            if out or isinstance(text, str):
                holder[key] = out
            if self.hold and "logprobs" in choice:
                choice["logprobs"] = None
            kept.append(choice)
        obj["choices"] = kept
        return bool(kept)

    def end(self) -> dict[str, Any] | None:
        """A last chunk with the text still held for choices that never finished (a stream
        cut short), or None when there is none."""
        choices = []
        for index, state in self._choices.items():
            if state.blocked:
                continue
            out = self._flush(state, {"index": index})
            if out:
                choices.append({"index": index, "delta": {"content": out}, "logprobs": None,
                                "finish_reason": None} if self._chat else
                               {"index": index, "text": out, "logprobs": None,
                                "finish_reason": None})
        return {**self._last, "choices": choices} if choices else None

    def _state(self, choice: dict[str, Any]) -> _Choice:
        index = choice.get("index", 0)
        index = index if isinstance(index, int) else 0
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _Choice(self.hold, self.watch)
        return state

    def _feed(self, state: _Choice, text: str, choice: dict[str, Any]) -> str:
        if state.redactor is None:
            out = text
        else:
            released, findings = state.redactor.feed(text)
            out = self._apply(state, released, findings, choice)
        if state.watcher is not None and out:
            self._watched(state.watcher.feed(out)[1], choice)
        return out

    def _flush(self, state: _Choice, choice: dict[str, Any]) -> str:
        out = ""
        if state.redactor is not None:
            released, findings = state.redactor.flush()
            out = self._apply(state, released, findings, choice)
        if state.watcher is not None:
            if out:
                self._watched(state.watcher.feed(out)[1], choice)
            self._watched(state.watcher.flush()[1], choice)
        return out

    def _apply(self, state: _Choice, text: str, findings: list[Finding],
               choice: dict[str, Any]) -> str:
        """Released text with its findings redacted, cut before the first one to withhold."""
        for i, f in enumerate(findings):
            if self.actions[f.category] == "block":
                state.blocked = True
                self._note(f.category, "block", choice)
                findings, text = findings[:i], text[:f.start]
                break
        for f in findings:
            self._note(f.category, "redact", choice)
        return redact(text, findings)

    def _watched(self, findings: list[Finding], choice: dict[str, Any]) -> None:
        for f in findings:
            self._note(f.category, "log", choice)

    def _note(self, category: Category, action: str, choice: dict[str, Any]) -> None:
        self.tally.add("output", category, action, 1,
                       f"{LABELS[category]} in the answer (choice {choice.get('index', 0)})")
