"""Word error rate (word-level Levenshtein distance) and keyword accuracy.

Rule for empty references: an utterance with no reference words contributes its hypothesis
words as insertions. Corpus WER = total edits / total reference words; when the corpus has no
reference words at all, WER is 0.0 if there are no edits and ValueError otherwise (undefined).

Example:
    >>> wer(["one two three"], ["one too three"])
    0.3333333333333333
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

__all__ = ["edit_distance", "EditCounts", "align_counts", "word_errors", "wer", "keyword_accuracy"]


def _words(x) -> list[str]:
    if isinstance(x, str):
        return x.split()
    if isinstance(x, (list, tuple)):
        return [str(w) for w in x]
    raise ValueError(f"expected a string or a list of words, got {type(x).__name__}")


class EditCounts(NamedTuple):
    substitutions: int
    deletions: int
    insertions: int

    @property
    def total(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def align_counts(ref, hyp) -> EditCounts:
    """Minimum-edit alignment of word sequences split into substitutions, deletions, insertions.

    Ties between equal-cost alignments prefer substitutions, then deletions.

    Example:
        >>> align_counts("a b c", "a x c d")
        EditCounts(substitutions=1, deletions=0, insertions=1)
    """
    r, h = _words(ref), _words(hyp)
    # each cell: (cost, subs, dels, ins); row i = first i ref words, column j = first j hyp words
    prev = [(j, 0, 0, j) for j in range(len(h) + 1)]
    for i in range(1, len(r) + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, len(h) + 1):
            c, s, d, n = prev[j - 1]
            diag = (c, s, d, n) if r[i - 1] == h[j - 1] else (c + 1, s + 1, d, n)
            c, s, d, n = prev[j]
            dele = (c + 1, s, d + 1, n)
            c, s, d, n = cur[j - 1]
            ins = (c + 1, s, d, n + 1)
            cur.append(min((diag, 0), (dele, 1), (ins, 2), key=lambda t: (t[0][0], t[1]))[0])
        prev = cur
    return EditCounts(*prev[-1][1:])


def edit_distance(ref, hyp) -> int:
    """Word-level Levenshtein distance; strings are split on whitespace, lists used as is.

    Example:
        >>> edit_distance("one two", ["one", "two", "three"])
        1
    """
    return align_counts(ref, hyp).total


def word_errors(refs: Sequence, hyps: Sequence) -> tuple[int, int]:
    """(total edits, total reference words) over paired utterances."""
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses; pass one hypothesis per reference")
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    return edits, sum(len(_words(r)) for r in refs)


def wer(refs: Sequence, hyps: Sequence) -> float:
    """Corpus word error rate = total edits / total reference words (see module docstring for empty refs).

    A single utterance may be passed as two strings.

    Example:
        >>> wer(["one two", "three"], ["one", "three four"])
        0.6666666666666666
    """
    if isinstance(refs, str) and isinstance(hyps, str):
        refs, hyps = [refs], [hyps]
    edits, n_words = word_errors(refs, hyps)
    if n_words == 0:
        if edits == 0:
            return 0.0
        raise ValueError(f"WER is undefined: the references have no words but the hypotheses have {edits}")
    return edits / n_words


def keyword_accuracy(predicted: Sequence, expected: Sequence) -> float:
    """Fraction of positions where the predicted label equals the expected one.

    Example:
        >>> keyword_accuracy(["yes", "no", "up"], ["yes", "no", "down"])
        0.6666666666666666
    """
    if len(predicted) != len(expected):
        raise ValueError(f"got {len(predicted)} predictions for {len(expected)} labels; lengths must match")
    if not expected:
        raise ValueError("keyword accuracy of an empty set is undefined; pass at least one label")
    return sum(p == e for p, e in zip(predicted, expected)) / len(expected)
