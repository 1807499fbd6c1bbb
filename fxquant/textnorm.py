"""English text normaliser for word error rate, applied to references and hypotheses alike.

Numbers become words the way LJ Speech's `normalized_text` spells them (the inflect rules of
Keith Ito's text cleaners): integers from 1001 to 2999 are read as years ("1850" -> "eighteen
fifty", "1905" -> "nineteen oh five", "1900" -> "nineteen hundred", "2000" -> "two thousand",
"2005" -> "two thousand five"), other integers as cardinals without "and" ("342" -> "three hundred
forty two"); thousands commas are dropped first. Also: ordinals ("21st"), decimals ("3.5" -> "three
point five"), decades ("1480s" -> "fourteen eighties"), "$"/"£" amounts, "%", "&", titles (mr,
mrs, dr, st, ...), lower case, hyphens to spaces, apostrophes dropped ("don't" -> "dont"), other
punctuation removed, accents stripped, whitespace collapsed.

Example:
    >>> normalize_english('Mr. Smith paid $5 in 1850, the 2nd time -- "forty-two" times!')
    'mister smith paid five dollars in eighteen fifty the second time forty two times'
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["normalize_english", "number_to_words", "ordinal_to_words", "year_to_words", "word_error_rate"]

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))
_MAX_WORDED = 10 ** 15            # larger numbers (or longer digit strings) are read digit by digit
_MAX_DIGITS = len(str(_MAX_WORDED))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}

# Titles always written with a period in running text, and those safe to expand even without it.
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "messrs": "messieurs", "dr": "doctor", "drs": "doctors",
                  "st": "saint", "jr": "junior", "sr": "senior", "capt": "captain", "sgt": "sergeant",
                  "lt": "lieutenant", "col": "colonel", "gen": "general", "maj": "major", "rev": "reverend",
                  "hon": "honorable", "esq": "esquire", "ltd": "limited", "co": "company", "ft": "fort",
                  "vs": "versus"}
_NEED_PERIOD = {"col", "gen", "rev", "hon", "co", "ft", "sr"}    # also ordinary words without a period
_ABBREV_RE = re.compile(r"\b(" + "|".join(sorted(_ABBREVIATIONS, key=len, reverse=True)) + r")\b(\.?)")

_MONEY_RE = re.compile(r"([$£])\s?(\d+(?:\.\d+)?)")
_COMMA_NUMBER_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_RE = re.compile(r"(\d+)\.(\d+)")
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b")
_DECADE_RE = re.compile(r"(?<!\w)'?(\d+0)'?s\b")
_NUMBER_RE = re.compile(r"\d+")


def number_to_words(n: int) -> str:
    """Cardinal in words, no "and", no hyphens.

    Example:
        >>> number_to_words(342), number_to_words(1_000_001)
        ('three hundred forty two', 'one million one')
    """
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= _MAX_WORDED:
        return " ".join(_ONES[int(d)] for d in str(n))
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_to_words(n % 100))
    for value, name in _SCALES:
        if n >= value:
            rest = n % value
            return (
                number_to_words(n // value) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
            )
    raise AssertionError("unreachable")


def year_to_words(n: int) -> str:
    """LJ Speech's reading of an integer from 1001 to 2999 (other integers: `number_to_words`).

    Example:
        >>> year_to_words(1455), year_to_words(1905), year_to_words(1900), year_to_words(2005)
        ('fourteen fifty five', 'nineteen oh five', 'nineteen hundred', 'two thousand five')
    """
    if not 1000 < n < 3000 or n == 2000 or 2000 < n < 2010:
        return number_to_words(n)
    high, low = divmod(n, 100)
    if low == 0:
        return number_to_words(high) + " hundred"
    return number_to_words(high) + (" oh " if low < 10 else " ") + number_to_words(low)


def ordinal_to_words(n: int) -> str:
    """Ordinal in words.

    Example:
        >>> ordinal_to_words(21), ordinal_to_words(12), ordinal_to_words(40)
        ('twenty first', 'twelfth', 'fortieth')
    """
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_IRREGULAR:
        words[-1] = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _digit_words(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def _cardinal_words(digits: str) -> str:
    return number_to_words(int(digits)) if len(digits) < _MAX_DIGITS else _digit_words(digits)


def _integer_words(digits: str) -> str:
    """Years rule for 1001..2999, cardinals otherwise, digit by digit past 10**15 (no huge ints from text)."""
    return year_to_words(int(digits)) if len(digits) < _MAX_DIGITS else _digit_words(digits)


def _plural(word: str) -> str:
    return word[:-1] + "ies" if word.endswith("y") else word + ("es" if word.endswith(("x", "s")) else "s")


def _money(match: re.Match) -> str:
    unit, cents_unit = ("dollar", "cent") if match.group(1) == "$" else ("pound", "penny")
    whole, _, frac = match.group(2).partition(".")
    amount, cents = int(whole), int(frac[:2].ljust(2, "0")) if frac else 0
    parts = [f" {number_to_words(amount)} {unit}{'' if amount == 1 else 's'}"] if amount or not cents else []
    if cents:
        cents_name = cents_unit if cents == 1 else ("pence" if cents_unit == "penny" else "cents")
        parts.append(f" {number_to_words(cents)} {cents_name}")
    return " ".join(parts) + " "


def _expand_abbreviation(match: re.Match) -> str:
    word, period = match.group(1), match.group(2)
    if word in _NEED_PERIOD and not period:
        return match.group(0)
    return _ABBREVIATIONS[word] + " "


def _expand_numbers(text: str) -> str:
    text = _COMMA_NUMBER_RE.sub("", text)
    text = _MONEY_RE.sub(_money, text)
    text = text.replace("%", " percent ")
    text = _DECIMAL_RE.sub(
        lambda m: f" {_cardinal_words(m.group(1))} point {_digit_words(m.group(2))} ", text
    )
    text = _ORDINAL_RE.sub(
        lambda m: (
            " "
            + (
                ordinal_to_words(int(m.group(1)))
                if len(m.group(1)) < _MAX_DIGITS
                else _digit_words(m.group(1))
            )
            + " "
        ),
        text,
    )

    def decade(m: re.Match) -> str:
        words = _integer_words(m.group(1)).split()
        return " " + " ".join(words[:-1] + [_plural(words[-1])]) + " "

    text = _DECADE_RE.sub(decade, text)
    return _NUMBER_RE.sub(lambda m: " " + _integer_words(m.group(0)) + " ", text)


def normalize_english(text: str) -> str:
    """Lower-case words only: numbers spelled out, titles expanded, punctuation and accents removed.

    Example:
        >>> normalize_english("In 1465 Sweynheim and Pannartz began printing,")
        'in fourteen sixty five sweynheim and pannartz began printing'
        >>> normalize_english("Dr. O'Neil's co-worker: 3.5%, the 1480s & 21st")
        'doctor oneils co worker three point five percent the fourteen eighties and twenty first'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_english takes a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[\u2018\u2019\u02bc`´]", "'", text)  # curly apostrophes
    text = _ABBREV_RE.sub(_expand_abbreviation, text)
    text = text.replace("&", " and ")
    text = _expand_numbers(text)
    text = re.sub(r"(?<=\w)'(?=\w)", "", text)  # don't -> dont, smith's -> smiths
    text = re.sub(r"[^\w\s]|_", " ", text)  # hyphens, quotes, all other punctuation
    return " ".join(text.split())


def word_error_rate(refs: Sequence[str] | str, hyps: Sequence[str] | str, normalize: bool = True) -> float:
    """Corpus WER (jiwer) after `normalize_english` on both sides; an empty reference counts insertions.

    Example:
        >>> word_error_rate(["In 1850, Mr. Smith"], ["in eighteen fifty mister smyth"])
        0.2
    """
    import jiwer

    if isinstance(refs, str) and isinstance(hyps, str):
        refs, hyps = [refs], [hyps]
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(
            f"got {len(refs)} references but {len(hyps)} hypotheses; pass one hypothesis per reference"
        )
    if not refs:
        raise ValueError("WER of an empty corpus is undefined; pass at least one reference")
    if normalize:
        refs, hyps = [normalize_english(r) for r in refs], [normalize_english(h) for h in hyps]
    if not any(r.split() for r in refs):
        if any(h.split() for h in hyps):
            raise ValueError("WER is undefined: the references have no words but the hypotheses have some")
        return 0.0
    return float(jiwer.wer(refs, hyps))
