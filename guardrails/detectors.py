"""Detectors of sensitive data in text: emails, phone numbers, payment card numbers, IBANs and
secrets. Pure Python: a regular expression finds candidates, a check confirms them (the Luhn
checksum of a card, the country length and mod-97 checksum of an IBAN, the digit count of a
phone number, the randomness of a token).

The expressions are written to stay quiet on ordinary text: phone numbers need an
international `+` prefix or a national layout with separators (so order ids, dates, prices,
versions and IP addresses do not match), cards must pass Luhn with a plausible first digit.
The expressions use no backreferences, so that a stream filter can join them into one (see
`guardrails.stream`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from guardrails.schema import CATEGORIES, Category

__all__ = [
    "DETECTORS",
    "PLACEHOLDERS",
    "Detector",
    "Finding",
    "iban_valid",
    "luhn_valid",
    "redact",
    "scan",
]

# Every expression starts with the character class of its first character and only then looks
# behind it (`X(?<!B X)`): the engine then skips to candidate characters in C instead of
# testing a lookbehind at every position, which makes a scan ten to thirty times faster.
_NUMBER_AFTER = r"(?![A-Za-z0-9_]|[.,-][0-9])"  # not inside a longer word or number
_NOT_IN_NUMBER = r"(?<![A-Za-z0-9_+./-]{first})"

EMAIL = (r"[A-Za-z0-9](?<![A-Za-z0-9._%+-][A-Za-z0-9])[A-Za-z0-9._%+-]{0,63}"
         r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}"
         r"(?![A-Za-z0-9-])")

PHONES = (
    # International: +country code, then the rest run together or in separated groups.
    r"\+(?<![A-Za-z0-9_+]\+)[1-9][0-9]{0,2}(?:[0-9]{6,12}|[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,4})"
    r"(?:[ .-][0-9]{2,8}){1,5})" + _NUMBER_AFTER,
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199.
    r"[(1-9]" + _NOT_IN_NUMBER.format(first="[(1-9]") + r"(?:(?<=1)[ .-](?:\([2-9][0-9]{2}\) ?"
    r"|[2-9][0-9]{2}[ .-])|(?<=\()[2-9][0-9]{2}\) ?|(?<=[2-9])[0-9]{2}[ .-])[0-9]{3}[ .-]"
    r"[0-9]{4}" + _NUMBER_AFTER,
    # National with a trunk 0: 020 7946 0958, 07700 900123, 030 12345678; French pairs:
    # 01 23 45 67 89, 06.12.34.56.78.
    r"0" + _NOT_IN_NUMBER.format(first="0") + r"[1-9](?:[0-9]{1,3}[ -][0-9]{3,4}[ -]?"
    r"[0-9]{3,4}" + _NUMBER_AFTER + r"|(?:[ .][0-9]{2}){4}(?![A-Za-z0-9_]|[ .,-][0-9]))",
)

# 13-19 digits run together, or in groups of four (4-6-5 / 4-6-4 for Amex and Diners) with
# one kind of separator (checked by `_card`: no backreference, so that all expressions can be
# joined into one); the first digit is that of a card network (2-6).
CARD = (r"[2-6]" + _NOT_IN_NUMBER.format(first="[2-6]") + r"[0-9]{3}(?:[0-9]{9,15}|[ -]"
        r"[0-9]{4}[ -][0-9]{4}[ -][0-9]{1,4}(?:[ -][0-9]{1,3})?|[ -][0-9]{6}[ -][0-9]{4,5})"
        + _NUMBER_AFTER)

IBAN = (r"[A-Z](?<![A-Za-z0-9_][A-Z])[A-Z][0-9]{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}"
        r"(?: [A-Z0-9]{1,3})?)(?![A-Za-z0-9_])")

_TOKEN_START = r"(?<![A-Za-z0-9_-]{first})"
SECRETS = tuple(prefix + _TOKEN_START.format(first=prefix) + rest for prefix, rest in (
    ("sk-", r"[A-Za-z0-9_-]{20,4096}"),  # OpenAI-style keys, ours (sk-llmops-...), Anthropic's
    ("sk_", r"(?:live|test)_[A-Za-z0-9]{16,4096}"),  # Stripe
    ("rk_", r"(?:live|test)_[A-Za-z0-9]{16,4096}"),
    ("AKIA", r"[A-Z0-9]{16}"),  # AWS access key ids
    ("ASIA", r"[A-Z0-9]{16}"),
    ("gh", r"[pousr]_[A-Za-z0-9]{36,255}"),  # GitHub tokens
    ("github_pat_", r"[A-Za-z0-9_]{22,255}"),
    ("xox", r"[abposr]-[A-Za-z0-9-]{10,255}"),  # Slack
    ("AIza", r"[A-Za-z0-9_-]{35}"),  # Google API keys
    ("eyJ", r"[A-Za-z0-9_-]{8,4096}\.eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{0,4096}"),  # JWTs
    ("[Bb]", r"earer[ \t]+[A-Za-z0-9._~+/-]{16,4096}=*"),
    # A private key block; one cut short (no END line) counts up to the text's end.
    ("-----BEGIN", r"[ A-Z0-9]{0,64}PRIVATE KEY-----[\s\S]{0,16384}?"
                   r"(?:-----END[ A-Z0-9]{0,64}PRIVATE KEY-----|\Z)"),
))

# Image names such as `logo@2x.png` look like addresses.
_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tif",
                            "tiff", "avif"})

# IBAN length per country (ISO 13616 registry).
IBAN_LENGTHS: Mapping[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}

PLACEHOLDERS: Mapping[Category, str] = {c: f"[REDACTED_{c.upper()}]" for c in CATEGORIES}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (payment card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """An IBAN (spaces allowed) of its country's length whose mod-97 checksum is 1."""
    iban = text.replace(" ", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum() or not iban.isascii():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _email(text: str) -> bool:
    return text.rsplit(".", 1)[-1].lower() not in _FILE_SUFFIXES


def _phone(text: str) -> bool:
    return 8 <= sum(ch.isdigit() for ch in text) <= 15


def _card(text: str) -> bool:
    digits = "".join(ch for ch in text if ch.isdigit())
    separators = {ch for ch in text if not ch.isdigit()}
    return len(separators) <= 1 and 13 <= len(digits) <= 19 and luhn_valid(digits)


def _secret(text: str) -> bool:
    if text[0] in "Bb":  # a bearer token: random, so not a plain word
        token = text.split(None, 1)[1]
        return any(ch.isdigit() for ch in token)
    if text.startswith("sk-"):  # not a hyphenated phrase such as sk-learn-compatible-...
        return any(ch.isdigit() for ch in text) and any(ch.isupper() for ch in text)
    return True


@dataclass(frozen=True)
class Detector:
    """One category's expressions and the check that confirms a candidate."""

    category: Category
    patterns: tuple[str, ...]
    check: Callable[[str], bool] | None = None
    anchor: str | None = None  # a string every match contains: without it, nothing to scan
    full: tuple[re.Pattern[str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "full", tuple(re.compile(p, re.ASCII) for p in self.patterns))

    def find(self, text: str) -> Iterator[tuple[int, int]]:
        """Spans of the confirmed matches in `text` (in no particular order)."""
        if self.anchor is not None and self.anchor not in text:
            return
        for pattern in self.full:
            for m in pattern.finditer(text):
                if self.confirms(m.group()):
                    yield m.span()

    def confirms(self, text: str) -> bool:
        return self.check is None or self.check(text)


DETECTORS: Mapping[Category, Detector] = {
    "email": Detector("email", (EMAIL,), _email, anchor="@"),
    "phone": Detector("phone", PHONES, _phone),
    "card": Detector("card", (CARD,), _card),
    "iban": Detector("iban", (IBAN,), iban_valid),
    "secret": Detector("secret", SECRETS, _secret),
}


@dataclass(frozen=True, order=True)
class Finding:
    start: int
    end: int
    category: Category


def scan(text: str, categories: Iterable[Category] = CATEGORIES) -> list[Finding]:
    """Confirmed matches of `categories` in `text`, in order and not overlapping (of two that
    overlap, the earlier and then the longer is kept)."""
    found = [Finding(start, end, c) for c in categories for start, end in DETECTORS[c].find(text)]
    return disjoint(found)


def disjoint(findings: list[Finding]) -> list[Finding]:
    findings.sort(key=lambda f: (f.start, -f.end))
    out: list[Finding] = []
    for f in findings:
        if not out or f.start >= out[-1].end:
            out.append(f)
    return out


def redact(text: str, findings: Iterable[Finding],
           placeholders: Mapping[Category, str] = PLACEHOLDERS) -> str:
    """`text` with each finding replaced by its category's placeholder."""
    parts, last = [], 0
    for f in findings:
        parts += [text[last:f.start], placeholders[f.category]]
        last = f.end
    parts.append(text[last:])
    return "".join(parts)
