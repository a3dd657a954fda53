"""Text similarity metrics for the `text_similarity` grader, each a score in [0, 1].

Word metrics (BLEU, GLEU, ROUGE) compare lowercased word tokens (`\\w+`), as rouge-score's
default tokenizer does; `fuzzy_match` compares characters. Longest common subsequences use the
bit-parallel algorithm (Hyyrö 2004), so long answers cost milliseconds, not seconds.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

__all__ = [
    "bleu",
    "cosine",
    "fuzzy_match",
    "gleu",
    "lcs_length",
    "rouge_l",
    "rouge_n",
    "tokens",
]

_WORD = re.compile(r"\w+")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _overlap(a: Counter[tuple[str, ...]], b: Counter[tuple[str, ...]]) -> int:
    return sum((a & b).values())


def bleu(hypothesis: str, reference: str, max_order: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002): the geometric mean of clipped n-gram precisions
    times a brevity penalty. Like sacrebleu's `sentence_bleu`, orders the hypothesis is too
    short to have are left out, and an order with no match gets the 'exp' smoothing of Chen &
    Cherry (2014), 1 / (2^k * total) for its k-th zero, so one missing 4-gram does not zero a
    good short answer."""
    hyp, ref = tokens(hypothesis), tokens(reference)
    if not hyp or not ref:
        return 0.0
    log_sum, orders, zeros = 0.0, 0, 0
    for n in range(1, max_order + 1):
        total = len(hyp) - n + 1
        if total <= 0:
            break
        matched = _overlap(_ngrams(hyp, n), _ngrams(ref, n))
        if matched:
            log_sum += math.log(matched / total)
        else:
            zeros += 1
            log_sum += math.log(1.0 / (2**zeros * total))
        orders = n
    penalty = 1.0 if len(hyp) > len(ref) else math.exp(1.0 - len(ref) / len(hyp))
    return penalty * math.exp(log_sum / orders)


def gleu(hypothesis: str, reference: str, max_order: int = 4) -> float:
    """Google-BLEU (Wu et al. 2016): matched 1..4-grams over the larger of the hypothesis's
    and the reference's n-gram counts, i.e. min(precision, recall)."""
    hyp, ref = tokens(hypothesis), tokens(reference)
    matched = hyp_total = ref_total = 0
    for n in range(1, max_order + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matched += _overlap(h, r)
        hyp_total += h.total()
        ref_total += r.total()
    if not hyp_total or not ref_total:
        return 0.0
    return matched / max(hyp_total, ref_total)


def _f1(matched: int, hyp_total: int, ref_total: int) -> float:
    if not matched:
        return 0.0
    precision, recall = matched / hyp_total, matched / ref_total
    return 2 * precision * recall / (precision + recall)


def rouge_n(hypothesis: str, reference: str, n: int) -> float:
    """ROUGE-N F1 (Lin 2004): n-gram overlap as the harmonic mean of precision and recall."""
    h, r = _ngrams(tokens(hypothesis), n), _ngrams(tokens(reference), n)
    return _f1(_overlap(h, r), h.total(), r.total())


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, as precision and recall."""
    hyp, ref = tokens(hypothesis), tokens(reference)
    return _f1(lcs_length(hyp, ref), len(hyp), len(ref))


def fuzzy_match(hypothesis: str, reference: str) -> float:
    """Normalised Indel similarity of the two strings (what rapidfuzz's `fuzz.ratio` / 100
    computes): 2 * LCS / (len(a) + len(b)); 1.0 for two empty strings."""
    size = len(hypothesis) + len(reference)
    return 2 * lcs_length(hypothesis, reference) / size if size else 1.0


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two embeddings; 0.0 when either is all zeros."""
    if len(a) != len(b):
        raise ValueError(f"embeddings differ in size: {len(a)} and {len(b)}")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, one big-integer step per element of `b`."""
    if len(a) < len(b):
        a, b = b, a  # the longer sequence becomes the bit vector
    if not b:
        return 0
    masks: dict[Hashable, int] = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()
