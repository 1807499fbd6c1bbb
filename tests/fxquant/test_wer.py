"""Word error rate: hand-checked edit distances and the corpus rule."""
import pytest

from fxquant.wer import align_counts, edit_distance, keyword_accuracy, wer, word_errors


def test_identical_is_zero():
    assert edit_distance("one two three", "one two three") == 0
    assert wer(["one two three"], ["one two three"]) == 0.0


def test_substitution_insertion_deletion_counts():
    assert align_counts("one two three", "one too three") == (1, 0, 0)
    assert align_counts("one two three", "one two two three") == (0, 0, 1)
    assert align_counts("one two three", "one three") == (0, 1, 0)
    assert align_counts("a b c", "a x c d") == (1, 0, 1)
    assert edit_distance("a b c d", "b c d e") == 2          # delete a, insert e


def test_lists_and_strings_agree():
    assert edit_distance(["one", "two"], "one two five") == 1
    assert edit_distance([], ["x", "y"]) == 2
    assert edit_distance("x y", "") == 2


def test_corpus_wer_is_total_edits_over_total_reference_words():
    refs = ["one two three", "four five", "six"]
    hyps = ["one two", "four five five", "seven"]
    assert word_errors(refs, hyps) == (3, 6)
    assert wer(refs, hyps) == pytest.approx(0.5)
    assert wer("a b c d", "a b") == pytest.approx(0.5)


def test_empty_reference_rule():
    # an empty reference contributes its hypothesis words as insertions to the corpus total
    assert wer(["a b", ""], ["a b", "c"]) == pytest.approx(0.5)
    assert wer([""], [""]) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        wer([""], ["c"])


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])


def test_keyword_accuracy():
    assert keyword_accuracy(["yes", "no", "up", "go"], ["yes", "no", "down", "go"]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        keyword_accuracy([], [])
