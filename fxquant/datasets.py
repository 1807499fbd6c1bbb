"""Free Spoken Digit Dataset (FSDD) access and a connected-digit string builder.

FSDD lives at <shared>/data/fsdd as {digit}_{speaker}_{take}.wav (8 kHz); takes 0-4 are the test
split, 5-49 the training split. The shared dir is ../shared next to the repo root, or $FXQUANT_SHARED.

Example (needs ../shared; each item is a 16 kHz float wave and its words, e.g. ['four', 'one']):
    >>> test = digit_test_set(n=300, seed=0)       # doctest: +SKIP
    >>> wave, words = test[0]                       # doctest: +SKIP
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import NamedTuple

import torch

from fxquant.audio import load_wav, resample

__all__ = ["DIGIT_WORDS", "SAMPLE_RATE", "shared_dir", "shared_data_dir", "fsdd_dir", "FsddClip", "fsdd_clips", "load_clip16k",
           "DigitStringBuilder", "digit_test_set", "fsdd_speakers", "heldout_speaker_folds", "speaker_builder",
           "digit_strings_covering"]

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLE_RATE = 16000
TEST_TAKES = range(0, 5)


def shared_dir() -> Path | None:
    """The shared data dir: $FXQUANT_SHARED if set, else <repo root>/../shared; None when absent.

    Example:
        >>> shared_dir()            # doctest: +SKIP
        PosixPath('/work/shared')
    """
    env = os.environ.get("FXQUANT_SHARED")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared"
    return path.resolve() if path.is_dir() else None


def shared_data_dir(name: str, what: str) -> Path:
    """<shared>/data/<name>; FileNotFoundError naming FXQUANT_SHARED when the shared dir is absent."""
    shared = shared_dir()
    if shared is None:
        raise FileNotFoundError(f"{what} not found: no ../shared next to the repo; set FXQUANT_SHARED or pass root=")
    return shared / "data" / name


def fsdd_dir(root=None) -> Path:
    """Directory of the FSDD WAVs (`root` if given); FileNotFoundError when it is missing."""
    root = Path(root) if root is not None else shared_data_dir("fsdd", "FSDD")
    if not root.is_dir():
        raise FileNotFoundError(f"FSDD directory not found: {root}; set FXQUANT_SHARED or pass root=")
    return root


class FsddClip(NamedTuple):
    path: Path
    digit: int
    speaker: str
    take: int


def fsdd_clips(split: str = "all", root=None) -> list[FsddClip]:
    """FSDD clips of a split ("all", "test" = takes 0-4, "train" = takes 5-49), sorted by path.

    Example:
        >>> len(fsdd_clips("test"))   # doctest: +SKIP
        300
    """
    clips = sorted(_split_clips(split, root))
    if not clips:
        raise FileNotFoundError(f"no {{digit}}_{{speaker}}_{{take}}.wav files for split {split!r} in {fsdd_dir(root)}")
    return clips


def fsdd_available(split: str = "train", root=None) -> bool:
    """Whether the FSDD folder holds a clip of the split: stops at the first one (listing and parsing all
    3000 names took 60-80 ms of every `fxquant transcribe` that checks which calibration it would use)."""
    try:
        return next(_split_clips(split, root), None) is not None
    except FileNotFoundError:
        return False


def _split_clips(split: str, root):
    """The clips of a split in directory order (a generator)."""
    if split not in ("all", "test", "train"):
        raise ValueError(f"split must be 'all', 'test' or 'train', got {split!r}")
    for path in fsdd_dir(root).glob("*.wav"):
        parts = path.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
            continue
        clip = FsddClip(path, int(parts[0]), parts[1], int(parts[2]))
        if split == "all" or (split == "test") == (clip.take in TEST_TAKES):
            yield clip


def load_clip16k(path) -> torch.Tensor:
    """Load a WAV and resample it to 16 kHz (mono float in [-1, 1])."""
    x, sr = load_wav(path)
    return resample(x, sr, SAMPLE_RATE)


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt()) + 1e-8


class DigitStringBuilder:
    """Builds connected-digit utterances by concatenating FSDD clips of one speaker.

    Each string: 1-7 digits from a random speaker, 50-300 ms gaps, 100-300 ms lead/tail, and a
    low noise floor. With `augment=True` every clip also gets speed perturbation (0.9-1.1, by
    resampling), a gain change, and the whole string additive noise at a random SNR.

    Example:
        >>> b = DigitStringBuilder("test")              # doctest: +SKIP
        >>> wave, words = b.sample(random.Random(0))    # doctest: +SKIP
    """

    def __init__(self, split: str = "train", root=None, min_digits: int = 1, max_digits: int = 7):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        self.min_digits, self.max_digits = min_digits, max_digits
        self.by_speaker: dict[str, list[tuple[torch.Tensor, int]]] = {}
        for clip in fsdd_clips(split, root):
            self.by_speaker.setdefault(clip.speaker, []).append((load_clip16k(clip.path), clip.digit))
        self.speakers = sorted(self.by_speaker)

    def sample(self, rng: random.Random, augment: bool = False) -> tuple[torch.Tensor, list[str]]:
        """One utterance: (16 kHz wave, list of digit words). Deterministic given `rng`'s state."""
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        clips = self.by_speaker[rng.choice(self.speakers)]
        n = rng.randint(self.min_digits, self.max_digits)
        pieces, words = [_silence(rng.uniform(0.1, 0.3))], []
        for i in range(n):
            wave, digit = rng.choice(clips)
            if augment:
                wave = _speed(wave, rng.uniform(0.9, 1.1)) * 10 ** (rng.uniform(-4, 4) / 20)
            pieces.append(wave)
            pieces.append(_silence(rng.uniform(0.05, 0.3) if i < n - 1 else rng.uniform(0.1, 0.3)))
            words.append(DIGIT_WORDS[digit])
        speech = torch.cat(pieces)
        level = _rms(torch.cat([p for p in pieces[1::2]]))
        snr_db = rng.uniform(10, 50) if augment else 40.0
        noise = torch.randn(speech.numel(), generator=gen) * level * 10 ** (-snr_db / 20)
        out = speech + noise
        if augment:
            out = out * 10 ** (rng.uniform(-10, 6) / 20)
        return out.clamp(-1.0, 1.0), words


def _silence(seconds: float) -> torch.Tensor:
    return torch.zeros(int(seconds * SAMPLE_RATE))


def _speed(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Play `factor` times faster (pitch shifts too); rate rounded to 400 Hz steps to keep kernels small."""
    new_sr = int(round(SAMPLE_RATE / factor / 400.0)) * 400
    return resample(wave, SAMPLE_RATE, new_sr) if new_sr != SAMPLE_RATE else wave


@functools.lru_cache(maxsize=4)
def _test_set(n: int, seed: int, root: str | None) -> tuple:
    builder = DigitStringBuilder("test", root)
    rng = random.Random(seed)
    return tuple(builder.sample(rng, augment=False) for _ in range(n))


def digit_test_set(n: int = 300, seed: int = 0, root=None) -> list[tuple[torch.Tensor, list[str]]]:
    """The fixed evaluation set: `n` seeded digit strings from test takes 0-4, no augmentation.

    The first k strings of a set are the same for any n >= k with the same seed.

    Example:
        >>> wave, words = digit_test_set(30)[0]    # doctest: +SKIP
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return list(_test_set(n, seed, None if root is None else str(root)))


def fsdd_speakers(root=None) -> list[str]:
    """The sorted speaker names of the FSDD directory (six in the release used here).

    Example:
        >>> fsdd_speakers()     # doctest: +SKIP
        ['george', 'jackson', 'lucas', 'nicolas', 'theo', 'yweweler']
    """
    return sorted({clip.speaker for clip in fsdd_clips("all", root)})


def heldout_speaker_folds(speakers) -> list[tuple[list[str], str]]:
    """Leave-one-speaker-out folds: for each speaker (sorted), (the other speakers sorted, that speaker).

    The training and held-out sides of a fold are disjoint, and every speaker is held out exactly once.

    Example:
        >>> heldout_speaker_folds(["b", "a", "c"])
        [(['b', 'c'], 'a'), (['a', 'c'], 'b'), (['a', 'b'], 'c')]
    """
    names = sorted(set(speakers))
    if len(names) != len(list(speakers)):
        raise ValueError(f"duplicate speaker names in {list(speakers)}")
    if len(names) < 2:
        raise ValueError(f"need at least 2 speakers for held-out folds, got {names}")
    return [([s for s in names if s != held], held) for held in names]


def speaker_builder(builder: DigitStringBuilder, speakers) -> DigitStringBuilder:
    """A copy of `builder` that samples only from `speakers` (the loaded clips are shared, not reloaded).

    Example:
        >>> b = speaker_builder(DigitStringBuilder("train"), ["george", "theo"])   # doctest: +SKIP
        >>> b.speakers                                                              # doctest: +SKIP
        ['george', 'theo']
    """
    wanted = sorted(set(speakers))
    missing = [s for s in wanted if s not in builder.by_speaker]
    if missing or not wanted:
        raise ValueError(f"speakers {missing or wanted} not in the builder (has {builder.speakers})")
    out = object.__new__(DigitStringBuilder)
    out.min_digits, out.max_digits = builder.min_digits, builder.max_digits
    out.by_speaker = {s: builder.by_speaker[s] for s in wanted}
    out.speakers = wanted
    return out


def digit_strings_covering(builder: DigitStringBuilder, seed: int = 0) -> list[tuple[torch.Tensor, list[str]]]:
    """Connected-digit strings that use every clip of `builder` exactly once (no augmentation).

    Per speaker, the clips are shuffled (seeded) and cut into strings of min_digits..max_digits clips,
    each joined like `DigitStringBuilder.sample(augment=False)`: 100-300 ms lead and tail, 50-300 ms gaps,
    a noise floor 40 dB under the speech. For scoring a speaker on all of its takes.

    Example:
        >>> held = speaker_builder(DigitStringBuilder("all"), ["theo"])   # doctest: +SKIP
        >>> strings = digit_strings_covering(held)     # doctest: +SKIP
    """
    rng = random.Random(seed)
    out = []
    for speaker in builder.speakers:
        clips = list(builder.by_speaker[speaker])
        rng.shuffle(clips)
        i = 0
        while i < len(clips):
            n = rng.randint(builder.min_digits, builder.max_digits)
            out.append(_join(clips[i:i + n], rng))
            i += n
    return out


def _join(clips, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    pieces, words = [_silence(rng.uniform(0.1, 0.3))], []
    for i, (wave, digit) in enumerate(clips):
        pieces.append(wave)
        pieces.append(_silence(rng.uniform(0.05, 0.3) if i < len(clips) - 1 else rng.uniform(0.1, 0.3)))
        words.append(DIGIT_WORDS[digit])
    speech = torch.cat(pieces)
    level = _rms(torch.cat(pieces[1::2]))
    noise = torch.randn(speech.numel(), generator=gen) * level * 10 ** (-40.0 / 20)
    return (speech + noise).clamp(-1.0, 1.0), words
