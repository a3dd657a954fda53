"""Text similarity metrics against values computed by hand (and, for LCS, a plain DP)."""

from __future__ import annotations

import math
import random

import pytest

from evals import similarity as sim

HYP, REF = "The cat sat on a mat.", "the cat sat on the mat"


def test_bleu_by_hand() -> None:
    # Clipped precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    assert sim.bleu(HYP, REF) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert sim.bleu(REF, REF) == pytest.approx(1.0)


def test_bleu_brevity_penalty_and_effective_order() -> None:
    # Three words have no 4-gram: the mean runs over orders 1-3 (all precise), times
    # exp(1 - 4/3) for being one word short.
    assert sim.bleu("the cat sat", "the cat sat down") == pytest.approx(math.exp(1 - 4 / 3))


def test_bleu_exp_smoothing_of_orders_without_matches() -> None:
    # 1-grams 3/4, 2-grams 1/3, then no 3-gram (of 2) or 4-gram (of 1) matches:
    # smoothed to 1/(2*2) and 1/(4*1).
    assert sim.bleu("a b c d", "a b x d") == pytest.approx(
        (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)


def test_gleu_by_hand() -> None:
    # 1..4-grams: 18 in each text, 5 + 3 + 2 + 1 = 11 shared.
    assert sim.gleu(HYP, REF) == pytest.approx(11 / 18)
    assert sim.gleu("the cat", "the cat sat on the mat") == pytest.approx(3 / 18)


def test_rouge_n_by_hand() -> None:
    assert sim.rouge_n(HYP, REF, 1) == pytest.approx(5 / 6)
    assert sim.rouge_n(HYP, REF, 2) == pytest.approx(3 / 5)
    # Precision 2/2, recall 2/5: F1 = 2 * 1 * 0.4 / 1.4.
    assert sim.rouge_n("cat sat on", "the cat sat on the mat", 2) == pytest.approx(0.8 / 1.4)
    assert sim.rouge_n("x y z", "a b c", 1) == 0.0


def test_rouge_l_is_about_order() -> None:
    assert sim.rouge_l(HYP, REF) == pytest.approx(5 / 6)
    # Same words, reversed: ROUGE-1 is perfect, the longest common subsequence is one word.
    assert sim.rouge_n("mat on sat cat the", "the cat sat on mat", 1) == pytest.approx(1.0)
    assert sim.rouge_l("mat on sat cat the", "the cat sat on mat") == pytest.approx(0.2)


def test_fuzzy_match_is_normalised_indel_similarity() -> None:
    # LCS("kitten", "sitting") = "ittn": 2 * 4 / 13.
    assert sim.fuzzy_match("kitten", "sitting") == pytest.approx(8 / 13)
    assert sim.fuzzy_match("", "") == 1.0
    assert sim.fuzzy_match("abc", "") == 0.0
    assert sim.fuzzy_match("Paris", "paris") == pytest.approx(0.8)  # case counts


def test_empty_texts_score_zero() -> None:
    for metric in (sim.bleu, sim.gleu, sim.rouge_l):
        assert metric("", "the cat") == 0.0
        assert metric("the cat", "") == 0.0


def test_cosine() -> None:
    assert sim.cosine([1.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
    assert sim.cosine([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert sim.cosine([1.0, 1.0], [-1.0, -1.0]) == pytest.approx(-1.0)
    assert sim.cosine([0.0, 0.0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        sim.cosine([1.0], [1.0, 0.0])


def _lcs_dp(a: str, b: str) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
    return row[-1]


def test_bit_parallel_lcs_agrees_with_dynamic_programming() -> None:
    rng = random.Random(7)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 70)))
        assert sim.lcs_length(a, b) == _lcs_dp(a, b), (a, b)
