"""Real speech for Whisper evaluation and calibration, kept apart by speaker.

- `ljspeech()`: the 186 LJ Speech utterances in <shared>/data/ljspeech (one female reader) with their
  normalized reference texts: the scoring set.
- `fsdd_sentences()`: FSDD digit recordings of the six FSDD speakers joined into 4-12 digit utterances
  (a little silence between digits), with the spoken words as reference: a second scoring set
  (test takes 0-4) and the calibration set (training takes 5-49). LJ Speech's reader is never used
  for calibration, so no score comes from a speaker the quantizer saw.

Example:
    >>> items = ljspeech(limit=3)                                   # doctest: +SKIP
    >>> items[0].id, items[0].text[:24]                             # doctest: +SKIP
    ('LJ001-0001', 'printing in the only sen')
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import NamedTuple

import torch

from fxquant.datasets import DIGIT_WORDS, fsdd_available, fsdd_clips, load_clip16k, shared_data_dir

__all__ = ["Utterance", "ljspeech_dir", "ljspeech", "fsdd_sentences", "calibration_waves", "calibration_recipe"]


class Utterance(NamedTuple):
    id: str
    path: Path | None
    text: str                      # reference transcript
    wave: torch.Tensor | None = None   # 16 kHz mono, when built in memory (FSDD sentences)


def ljspeech_dir(root=None) -> Path:
    """<shared>/data/ljspeech (or `root`); FileNotFoundError naming FXQUANT_SHARED when absent."""
    root = Path(root) if root is not None else shared_data_dir("ljspeech", "LJ Speech")
    if not (root / "metadata.tsv").is_file():
        raise FileNotFoundError(f"LJ Speech metadata not found in {root}; set FXQUANT_SHARED to the shared dir")
    return root


def ljspeech(limit: int | None = None, root=None) -> list[Utterance]:
    """LJ Speech utterances in id order with `normalized_text` as the reference."""
    root = ljspeech_dir(root)
    with open(root / "metadata.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    out = [Utterance(r["id"], root / f"{r['id']}.flac", r["normalized_text"]) for r in rows
           if (root / f"{r['id']}.flac").is_file()]
    return out[:limit] if limit else out


def fsdd_sentences(n: int, split: str = "test", seed: int = 0, min_digits: int = 4,
                   max_digits: int = 12, root=None) -> list[Utterance]:
    """`n` utterances of FSDD digits from one speaker each, joined with 0.1-0.3 s of silence."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    clips = fsdd_clips(split, root)
    by_speaker: dict[str, list] = {}
    for c in clips:
        by_speaker.setdefault(c.speaker, []).append(c)
    speakers = sorted(by_speaker)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        spk = speakers[i % len(speakers)]
        chosen = rng.sample(by_speaker[spk], rng.randint(min_digits, max_digits))
        pieces = []
        for c in chosen:
            pieces += [load_clip16k(c.path), torch.zeros(int(16000 * rng.uniform(0.1, 0.3)))]
        wave = torch.cat([torch.zeros(3200)] + pieces)
        out.append(Utterance(f"fsdd-{split}-{i:03d}-{spk}", None, " ".join(DIGIT_WORDS[c.digit] for c in chosen), wave))
    return out


FALLBACK_ENGLISH = 16      # shipped English clips used when ../shared (FSDD) is absent
BUDGET_ENGLISH = 8         # shipped English clips beside the FSDD sentences when compiling under a budget


def budget_english(budgeted: bool) -> int:
    """English clips a Whisper compile adds to its calibration: BUDGET_ENGLISH under a budget, else none."""
    return BUDGET_ENGLISH if budgeted else 0


def _calibration_counts(n: int, english: int) -> tuple[int, int]:
    """(English clips, FSDD sentences) that calibration_waves(n, english=english) uses on this machine."""
    if not fsdd_available("train"):
        return max(english, FALLBACK_ENGLISH), 0
    return english, n


def calibration_recipe(n: int = 8, english: int = 0) -> str:
    """What `calibration_waves(n, english=english)` returns on this machine, e.g. 'fsdd8' or 'english16'."""
    spoken, digits = _calibration_counts(n, english)
    return "+".join(f"{k}{v}" for k, v in (("english", spoken), ("fsdd", digits)) if v) or "none"


def calibration_waves(n: int = 8, seed: int = 1, english: int = 0) -> list[torch.Tensor]:
    """Calibration audio: `n` FSDD sentences of training takes (real voices) interleaved with `english`
    shipped English sentences (synthetic voices, see `fxquant.asr.calibration_speech`). Never LJ Speech,
    never FSDD test takes. Without ../shared the FSDD part is skipped and at least FALLBACK_ENGLISH English
    clips stand in, so a Whisper model compiles anywhere.

    Whisper compiles add BUDGET_ENGLISH English clips under a budget: the sensitivity sweep needs ordinary
    English text (FSDD's ten words cannot tell which rows of the token table matter). tiny.en, 186 LJ Speech
    clips, with the row-block centered table: avg 4 bits 4.61 % WER on FSDD only, 3.40 % with 8 English clips
    (fp32 3.43 %); avg 3 bits 5.86 % -> 5.51 %. At uniform widths, which read calibration only for the
    quantizers' importance weights, FSDD only stays: bits 4 measured 5.08 % with it, 5.67 % with the English.
    """
    from .calibration_speech import english_waves

    n_spoken, n_digits = _calibration_counts(n, english)
    digits = [u.wave for u in fsdd_sentences(n_digits, split="train", seed=seed, min_digits=8, max_digits=20)
              ] if n_digits else []
    spoken = english_waves(n_spoken) if n_spoken else []
    out = []
    for i in range(max(len(spoken), len(digits))):
        out += spoken[i:i + 1] + digits[i:i + 1]
    if not out:
        raise ValueError("calibration_waves: no calibration audio requested (english=0 and n=0)")
    return out
