"""CIDEr-D and perplexity against values computed by hand from the metric's definition on tiny examples."""

import math

import numpy as np
import pytest

from clip_jax.evaluate import captioning

LOG2 = math.log(2.0)


def test_exact_match_scores_the_matched_ngram_orders():
    # Two images, disjoint vocabularies: every n-gram has df 1 and idf log(2/1). "a b" matches its reference in
    # 1-grams and 2-grams (cosine 1 each), has no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    mean, per = captioning.cider_d(["a b", "c d"], [["a b"], ["c d"]])
    np.testing.assert_allclose(per, [5.0, 5.0])
    assert mean == pytest.approx(5.0)


def test_partial_unigram_match():
    # "a c" vs "a b": unigram vectors (a, c) and (a, b), all weights log 2: clipped dot log2^2 over norms
    # (sqrt2 log2)^2 -> 1/2; no common bigram; same length: 10 * (0.5 + 0 + 0 + 0) / 4 = 1.25.
    _, per = captioning.cider_d(["a c", "c d"], [["a b"], ["c d"]])
    assert per[0] == pytest.approx(1.25)


def test_clipping_and_length_penalty():
    # "a b b" vs "a b" (other image "c d"): unigrams cand a:1, b:2 (x log2), ref a:1, b:1: clipped dot
    # (1*1 + min(2,1)*1) log2^2 = 2 log2^2; norms sqrt5 log2 * sqrt2 log2 -> 2/sqrt10. Bigrams cand "a b", "b b"
    # (df("b b") = 0 counts as 1: idf log2), ref "a b": 1/sqrt2. Lengths 3 vs 2: exp(-1/72).
    _, per = captioning.cider_d(["a b b", "c d"], [["a b"], ["c d"]])
    want = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
    assert per[0] == pytest.approx(want)


def test_ngrams_in_every_image_weigh_nothing_and_references_are_averaged():
    # "a" occurs in both images' references: idf log(2/2) = 0, so it contributes nothing. Image 0 has two
    # references: "a x" gives unigram sim 1 (only "x" has weight) and bigram "a x" sim 1 -> 10*(2/4) = 5;
    # "a y" shares no weighted n-gram -> 0. Mean over references: 2.5.
    _, per = captioning.cider_d(["a x", "a z"], [["a x", "a y"], ["a z"]])
    assert per[0] == pytest.approx(2.5)
    assert per[1] == pytest.approx(5.0)


def test_case_and_punctuation_do_not_matter_and_empty_captions_score_zero():
    _, per = captioning.cider_d(["A, B.", ""], [["a b"], ["c d"]])
    assert per == pytest.approx([5.0, 0.0])
    with pytest.raises(ValueError, match="reference"):
        captioning.cider_d(["a"], [[]])


def test_perplexity():
    assert captioning.perplexity(3 * math.log(4.0), 3.0) == pytest.approx(4.0)
    assert captioning.perplexity(0.0, 0.0) == 1.0
