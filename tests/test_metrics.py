"""Caption metrics against values worked out by hand."""

from __future__ import annotations

import pytest

from flax_captioner.metrics import caption_scores, exact_match, normalize_caption


def test_normalize_caption_lowercases_and_drops_punctuation():
    assert normalize_caption("  A Cat, sleeping on   the SOFA. ") == "a cat sleeping on the sofa"


def test_bleu4_of_a_hand_counted_sentence():
    # 1- to 4-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    scores = caption_scores({"x": "the cat sat on the mat", "y": "a dog"},
                            {"x": ["The cat sat on a mat."], "y": ["a dog"]})
    # Corpus BLEU pools the counts: 1-grams 7/8, 2-grams 4/6, 3-grams 2/4, 4-grams 1/3.
    assert scores["bleu4"] == pytest.approx((7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)


def test_rouge_l_is_the_lcs_f_measure_with_beta_1_2():
    # LCS("a b c d", "a c d e") = 3: precision = recall = 3/4, so F = 3/4 whatever beta is.
    assert caption_scores({"x": "a b c d"}, {"x": ["a c d e"]})["rougeL"] == pytest.approx(0.75)
    # LCS = 2 of a 2-word candidate and a 4-word reference: P = 1, R = 1/2, beta = 1.2.
    beta2 = 1.2 ** 2
    expected = (1 + beta2) * 1.0 * 0.5 / (0.5 + beta2 * 1.0)
    assert caption_scores({"x": "a b"}, {"x": ["a x b y"]})["rougeL"] == pytest.approx(expected)


def test_perfect_captions_score_the_maxima():
    references = {"1": ["a red circle above a blue square"], "2": ["a green triangle"]}
    scores = caption_scores({"1": "a red circle above a blue square", "2": "a green triangle"},
                            references)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["rougeL"] == pytest.approx(1.0)
    # CIDEr-D is 10x the mean over n = 1..4 of the n-gram cosine similarity: 10 for the
    # 7-word caption; the 3-word one has no 4-grams, so 10 * 3/4 = 7.5.
    assert scores["cider"] == pytest.approx((10.0 + 7.5) / 2)


def test_cider_drops_for_a_wrong_caption():
    references = {"1": ["a red circle"], "2": ["a green triangle"]}
    right = caption_scores({"1": "a red circle", "2": "a green triangle"}, references)["cider"]
    wrong = caption_scores({"1": "a red circle", "2": "a blue square"}, references)["cider"]
    assert wrong == pytest.approx(right / 2)  # image 2 scores 0: no n-gram beyond "a" matches


def test_exact_match_counts_any_reference_after_normalising():
    predictions = {"1": "A red circle.", "2": "a blue square", "3": "a cat"}
    references = {"1": ["a red circle"], "2": ["two squares", "A blue square"], "3": ["a dog"]}
    assert exact_match(predictions, references) == pytest.approx(2 / 3)


def test_mismatched_keys_are_an_error():
    with pytest.raises(ValueError, match="same image keys"):
        caption_scores({"1": "a"}, {"2": ["a"]})
