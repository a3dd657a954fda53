"""Prompt-injection markers in retrieved text: a document chunk that tries to give the model
instructions ("ignore all previous instructions", chat template role tags, ...) instead of
holding facts.

The markers aim at phrasings that instruct a model, not at words that merely occur in
ordinary documents: "you are now connected" or "the system prompt of the app" pass, "you are
now DAN" or "reveal your system prompt" do not.
"""

from __future__ import annotations

import re

__all__ = ["MARKERS", "injection_marker"]

_WS = r"[\s\W_]+"  # spacing and punctuation between words, as in "ignore -- previous"


def _words(*words: str) -> str:
    return _WS.join(words)


MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
        ("ignore_instructions",
         _words(r"\b(?:ignore|disregard|forget|override|bypass)",
                r"(?:(?:all|any|every|each|the|of|your|my|these|those)" + _WS + r"){0,3}"
                r"(?:previous|prior|preceding|above|earlier|foregoing|former|original|system)",
                r"(?:instructions?|prompts?|rules|directions|directives|guidelines|messages?"
                r"|context|commands?)\b")),
        ("disregard_above",
         _words(r"\b(?:ignore|disregard|forget)", r"(?:(?:all|everything|the)" + _WS + r")?"
                r"(?:above|before|preceding|previous)(?:" + _WS + r"text)?\b")),
        ("new_instructions",
         r"(?:^|\n)\s*(?:new|updated|real|actual|revised)" + _WS
         + r"(?:system" + _WS + r")?instructions?\s*:"),
        ("role_override",
         r"\byou" + _WS + r"are" + _WS + r"now" + _WS + r"(?:(?:a|an|the|my)" + _WS
         + r")?(?:DAN\b|jailbroken|unrestricted|unfiltered|uncensored|evil|free" + _WS
         + r"(?:from|of)|no" + _WS + r"longer" + _WS + r"(?:bound|an?" + _WS
         + r"(?:AI|assistant|language" + _WS + r"model)))"
         + r"|\bfrom" + _WS + r"now" + _WS + r"on,?" + _WS + r"you" + _WS
         + r"(?:are|will|must|shall)" + _WS + r"(?:act|respond|answer|ignore|pretend|be)\b"
         + r"|\b(?:pretend|act)" + _WS + r"(?:to" + _WS + r"be|as" + _WS + r"if" + _WS
         + r"you" + _WS + r"(?:are|were)|as)" + _WS + r"(?:an?" + _WS + r")?(?:DAN|jailbroken"
         + r"|unrestricted|unfiltered|uncensored)\b"),
        ("system_prompt",
         r"\b(?:reveal|print|show|repeat|output|leak|display|disclose|tell" + _WS + r"me|what"
         + _WS + r"is)" + _WS + r"(?:(?:your|the|its|my|this)" + _WS + r"){0,2}"
         + r"(?:system|hidden|initial|original|secret)" + _WS + r"(?:prompt|instructions)\b"
         + r"|(?:^|\n)\s*system" + _WS + r"prompt\s*:"),
        ("chat_template",
         r"<\|\s*(?:im_start|im_end|system|user|assistant|start_header_id|end_header_id"
         r"|eot_id|begin_of_text|endoftext)\s*\|>|\[/?INST\]|<</?SYS>>"),
        ("instruction_header",
         r"(?:^|\n)\s*#{2,}\s*(?:instructions?|system|new" + _WS + r"task|response)\s*:?\s*"
         r"(?:\n|$)"),
    ))


def injection_marker(text: str) -> str | None:
    """The name of the first prompt-injection marker found in `text`, or None."""
    for name, pattern in MARKERS:
        if pattern.search(text):
            return name
    return None
