"""BM25 sparse vectors: stable term ids, stemming, stopwords and the document weights."""

from __future__ import annotations

import subprocess
import sys

import pytest

from retrieval import SparseEncoder, SparseVector
from retrieval.sparse import term_id, terms


def test_term_ids_are_a_stable_hash() -> None:
    # Python's hash() is salted per process; ours must not be, or queries miss documents.
    assert term_id("flow") == 2679931163
    other = subprocess.run(
        [sys.executable, "-c", "from retrieval.sparse import term_id; print(term_id('flow'))"],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == "2679931163"


def test_stemming_maps_word_forms_to_one_term() -> None:
    encoder = SparseEncoder()
    assert (encoder.encode_query("flows").indices == encoder.encode_query("flowing").indices
            == [term_id("flow")])


def test_stopwords_and_case_are_dropped() -> None:
    assert terms("The River and THE rivers, of course!") == ["river", "river", "cours"]
    assert SparseEncoder().encode_query("the of and to") == SparseVector([], [])


def test_query_weights_count_each_term() -> None:
    query = SparseEncoder().encode_query("river rivers flow")
    assert dict(zip(query.indices, query.values, strict=True)) == {
        term_id("river"): 2.0, term_id("flow"): 1.0}
    assert query.indices == sorted(query.indices)


def test_document_weights_are_bm25_saturated_and_length_normalised() -> None:
    encoder = SparseEncoder(k1=1.2, b=0.75, avg_len=4)
    doc = encoder.encode_document("flow flow river")  # 3 terms against an average of 4
    norm = 1.2 * (1 - 0.75 + 0.75 * 3 / 4)
    weights = dict(zip(doc.indices, doc.values, strict=True))
    assert doc.indices == sorted(doc.indices)
    assert weights[term_id("flow")] == pytest.approx(2 * 2.2 / (2 + norm))
    assert weights[term_id("river")] == pytest.approx(1 * 2.2 / (1 + norm))
    # Longer documents weigh the same count less.
    longer = encoder.encode_document("flow flow river " + "x " * 20)
    longer_weights = dict(zip(longer.indices, longer.values, strict=True))
    assert longer_weights[term_id("flow")] < weights[term_id("flow")]


def test_unicode_words() -> None:
    assert terms("Caf\u00e9 M\u00fcller \u6771\u4eac") == ["caf\u00e9", "m\u00fcller",
                                                           "\u6771\u4eac"]
