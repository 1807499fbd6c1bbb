"""English normaliser for WER: exact small cases and LJ Speech's text vs normalized_text columns."""
import csv

import pytest

from fxquant.textnorm import (
    normalize_english,
    number_to_words,
    ordinal_to_words,
    word_error_rate,
    year_to_words,
)


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (40, "forty"),
        (42, "forty two"),
        (100, "one hundred"),
        (342, "three hundred forty two"),
        (1000, "one thousand"),
        (3000, "three thousand"),
        (1_000_001, "one million one"),
        (25_000_000_000, "twenty five billion"),
        (10**15, " ".join(["one"] + ["zero"] * 15)),
    ],
)
def test_cardinals(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize(
    "n, words",
    [
        (1455, "fourteen fifty five"),
        (1850, "eighteen fifty"),
        (1905, "nineteen oh five"),
        (1900, "nineteen hundred"),
        (2000, "two thousand"),
        (2005, "two thousand five"),
        (2024, "twenty twenty four"),
        (1000, "one thousand"),
        (3000, "three thousand"),
        (999, "nine hundred ninety nine"),
    ],
)
def test_years_follow_lj_speech(n, words):
    assert year_to_words(n) == words


def test_ordinals():
    assert [ordinal_to_words(n) for n in (1, 2, 3, 5, 8, 9, 12, 20, 21, 100)] == [
        "first",
        "second",
        "third",
        "fifth",
        "eighth",
        "ninth",
        "twelfth",
        "twentieth",
        "twenty first",
        "one hundredth",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "In 1465 Sweynheim and Pannartz began printing,",
            "in fourteen sixty five sweynheim and pannartz began printing",
        ),
        ('"forty-two line Bible" of about 1455,', "forty two line bible of about fourteen fifty five"),
        (
            "Mr. and Mrs. Smith met Dr. Jones on St. Paul's day",
            "mister and missus smith met doctor jones on saint pauls day",
        ),
        ("Messrs. Miller and Richard", "messieurs miller and richard"),
        ("the 1st, 2nd, 3rd and 21st", "the first second third and twenty first"),
        ("the 1480s and the '80s", "the fourteen eighties and the eighties"),
        ("$5.50, $1 and 1,000,000 people", "five dollars fifty cents one dollar and one million people"),
        ("3.5% of 10am", "three point five percent of ten am"),
        ("Rock & roll -- don't STOP!", "rock and roll dont stop"),
        ("Café naïve   déjà\tvu", "cafe naive deja vu"),
        ("He said no. Col. Smith, the col of the pass", "he said no colonel smith the col of the pass"),
        ("", ""),
    ],
)
def test_exact_cases(text, expected):
    assert normalize_english(text) == expected


def test_whisper_style_hypothesis_matches_reference():
    assert normalize_english(" The Chiswick press in 1844 revived Caslon's founts.") == normalize_english(
        "The Chiswick press in eighteen forty-four revived Caslon's founts,"
    )


def test_long_digit_strings_are_read_digit_by_digit():
    out = normalize_english("x" + "9" * 40)
    assert out.split() == ["x"] + ["nine"] * 40


def test_lj_speech_text_and_normalized_text_agree(shared):
    path = shared / "data" / "ljspeech" / "metadata.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    differing = [r for r in rows if r["text"] != r["normalized_text"]]
    assert len(rows) == 186 and len(differing) == 12  # the rows with digits
    same = sum(normalize_english(r["text"]) == normalize_english(r["normalized_text"]) for r in rows)
    assert same == len(rows)  # measured: 186 / 186, including the 12
    assert word_error_rate([r["text"] for r in rows], [r["normalized_text"] for r in rows]) == 0.0
    assert (
        word_error_rate([r["text"] for r in rows], [r["normalized_text"] for r in rows], normalize=False)
        > 0.005
    )


def test_word_error_rate():
    assert word_error_rate(["In 1850, Mr. Smith"], ["in eighteen fifty mister smyth"]) == pytest.approx(0.2)
    assert word_error_rate("One, two.", "one two") == 0.0
    assert word_error_rate(["a b", "c"], ["a x", "c d"]) == pytest.approx(2 / 3)
    assert word_error_rate(["", "a"], ["x", "a"]) == pytest.approx(1.0)  # empty reference: insertions count
    assert word_error_rate(["...", ""], ["", "!"]) == 0.0
    with pytest.raises(ValueError, match="references have no words"):
        word_error_rate(["..."], ["words"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty corpus"):
        word_error_rate([], [])
