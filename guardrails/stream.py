"""Finding sensitive data in text that arrives in pieces (a streamed answer), with as little
hold-back as possible.

`StreamScanner.feed` returns the part of the text seen so far that is final: no match of the
scanned categories can still start in it, whatever comes next. It holds back only the tail
from which a match could still be growing: a partial match (the `regex` module's partial
matching says whether the text's end could be the inside of a match) or a complete one that
reaches the end (`bob@example.co` may become `bob@example.com`). Clean text is released
as soon as it arrives; a word is held until the character after it shows it is not the start
of an address or a key. `flush` releases the rest at the end of the stream.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import regex

from guardrails.detectors import DETECTORS, Finding, disjoint
from guardrails.schema import Category

__all__ = ["StreamScanner"]

# Released characters kept for the expressions' lookbehinds (the longest looks 12 back).
_CONTEXT = 16


@functools.lru_cache(maxsize=64)
def _joined(categories: tuple[Category, ...]) -> tuple[Any, re.Pattern[str]]:
    """The categories' expressions joined into one, twice: anchored at the text's end for
    `regex`'s partial matching (a match of it, partial or complete, is one that the next
    characters may still complete), and as is, to tell cheaply whether a text holds any."""
    joined = "|".join(f"(?:{p})" for c in categories for p in DETECTORS[c].patterns)
    return (regex.compile(f"(?:{joined})\\Z", regex.ASCII | regex.V0),
            re.compile(joined, re.ASCII))


class StreamScanner:
    def __init__(self, categories: Iterable[Category]) -> None:
        chosen = tuple(categories)
        self.detectors = [DETECTORS[c] for c in chosen]
        self._tail, self._any = _joined(chosen)
        self._context = ""  # the end of what was released
        self._pending = ""  # held back

    @property
    def pending(self) -> str:
        return self._pending

    def feed(self, text: str) -> tuple[str, list[Finding]]:
        """The text released by this piece and the confirmed findings in it (offsets into the
        released text)."""
        base = len(self._context)
        buf = self._context + self._pending + text
        growing = self._tail.search(buf, base, partial=True)  # the leftmost one
        hold = len(buf) if growing is None else growing.start()
        found = self._found(buf, base)
        # A complete match straddling the hold point waits with it (and is found again).
        for f in found:
            if f.start < hold < f.end:
                hold = f.start
        return self._release(buf, base, hold, [f for f in found if f.end <= hold])

    def flush(self) -> tuple[str, list[Finding]]:
        """Everything still held, and the confirmed findings in it."""
        base = len(self._context)
        buf = self._context + self._pending
        return self._release(buf, base, len(buf), self._found(buf, base))

    def _found(self, buf: str, base: int) -> list[Finding]:
        if self._any.search(buf, base) is None:  # the common case: one search, not one each
            return []
        return disjoint([Finding(m.start(), m.end(), d.category) for d in self.detectors
                         for pattern in d.full for m in pattern.finditer(buf, base)
                         if d.confirms(m.group())])

    def _release(self, buf: str, base: int, hold: int, found: list[Finding]
                 ) -> tuple[str, list[Finding]]:
        self._pending = buf[hold:]
        self._context = buf[max(0, hold - _CONTEXT):hold]
        return buf[base:hold], [Finding(f.start - base, f.end - base, f.category)
                                for f in found]
