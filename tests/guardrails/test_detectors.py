"""Sensitive data detectors: every category found in the formats people write, the checksums
that confirm cards and IBANs, and not one finding in a fixed sample of ordinary text and
numbers (`data/guardrails_ordinary.txt`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from guardrails import PLACEHOLDERS, iban_valid, luhn_valid, redact, scan
from guardrails.schema import CATEGORIES

ORDINARY = Path(__file__).parent / "data" / "guardrails_ordinary.txt"

POSITIVES = {
    "email": ["bob@example.com", "jane.doe+tag@mail.co.uk", "X_Y%z@sub-domain.example.org"],
    "phone": ["+1 (555) 123-4567", "+44 20 7946 0958", "+49 30 12345678", "+33 1 23 45 67 89",
              "+8613812345678", "+91 98765 43210", "(555) 123-4567", "555-123-4567",
              "555.123.4567", "1-800-555-0199", "020 7946 0958", "07700 900123",
              "01 23 45 67 89", "06.12.34.56.78"],
    "card": ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111",
             "378282246310005", "3782 822463 10005", "5555 5555 5555 4444", "6011111111111117",
             "4222222222222"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000",
             "FR14 2004 1010 0505 0001 3M02 606", "NL91ABNA0417164300", "NO9386011117947"],
    "secret": [
        "sk-llmops-Xq3kP9vLm2Nw8RtY5uZa1BcD4eFgH6iJ7kL0mNoP_qR",
        "sk-proj-AbC123dEf456GhI789jKl012MnO345", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "AKIAIOSFODNN7EXAMPLE", "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
        "Bearer abc123DEF456ghi789JKL",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0T",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7x\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
        "-----END OPENSSH PRIVATE KEY-----",
    ],
}


@pytest.mark.parametrize(("category", "value"),
                         [(c, v) for c, values in POSITIVES.items() for v in values])
def test_each_category_is_found_whole_in_a_sentence(category: str, value: str) -> None:
    text = f"Please note {value} before Friday."
    [finding] = scan(text)
    assert finding.category == category
    assert text[finding.start:finding.end] == value
    assert redact(text, [finding]) == f"Please note {PLACEHOLDERS[category]} before Friday."


def test_no_finding_in_ordinary_text_and_numbers() -> None:
    text = ORDINARY.read_text()
    assert len(text.splitlines()) >= 40
    assert scan(text) == []
    for line in text.splitlines():  # and none that only the neighbouring lines hide
        assert scan(line) == [], line


def test_only_the_asked_categories_are_scanned() -> None:
    text = "mail bob@example.com or call +44 20 7946 0958"
    assert [f.category for f in scan(text)] == ["email", "phone"]
    assert [f.category for f in scan(text, ["phone"])] == ["phone"]
    assert scan(text, []) == []


def test_findings_are_in_order_and_never_overlap() -> None:
    text = ("card 4111 1111 1111 1111, key sk-proj-AbC123dEf456GhI789jKl012MnO345, "
            "iban GB82 WEST 1234 5698 7654 32, mail a@b.io")
    found = scan(text)
    assert [f.category for f in found] == ["card", "secret", "iban", "email"]
    assert all(a.end <= b.start for a, b in itertools.pairwise(found))
    assert redact(text, found) == ("card [REDACTED_CARD], key [REDACTED_SECRET], iban "
                                   "[REDACTED_IBAN], mail [REDACTED_EMAIL]")


def test_near_misses_are_not_findings() -> None:
    for text in ("4111 1111 1111 1112",  # Luhn fails
                 "1234 5678 9012 3452",  # passes Luhn, but no card network starts with 1
                 "GB83 WEST 1234 5698 7654 32",  # mod-97 fails
                 "GB82 WEST 1234 5698 7654",  # too short for GB
                 "sk-learn-compatible-estimators",  # a phrase, not a key
                 "the Bearer internationalization",  # a word, not a token
                 "icon@2x.png", "+1.5", "2024-01-15", "v10.0.19045", "192.168.100.200"):
        assert scan(text) == [], text
    assert [f.category for f in scan("4111 1111 1111 1111 and 4111-1111 1111-1111")] == [
        "card"]  # one separator throughout


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


def test_iban_checksum_and_country_length() -> None:
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and iban_valid("gb82west12345698765432")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert not iban_valid("ZZ82WEST12345698765432")  # no such country
    assert not iban_valid("DE8937040044053201300")  # one character short
    assert set(PLACEHOLDERS) == set(CATEGORIES)
