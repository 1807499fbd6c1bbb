"""Leave-one-speaker-out folds and the covering digit strings (benchmarks/bench_digits_heldout.py)."""
import struct
import wave

import pytest

from fxquant.datasets import (DIGIT_WORDS, DigitStringBuilder, digit_strings_covering, fsdd_clips, fsdd_speakers,
                              heldout_speaker_folds, shared_dir, speaker_builder)

FSDD_SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def _fake_fsdd(root, speakers, digits=range(10), takes=(0, 5, 6)):
    """Tiny FSDD-named WAVs; clip length encodes (speaker, digit, take) so a test can tell clips apart."""
    root.mkdir(parents=True, exist_ok=True)
    for s, speaker in enumerate(speakers):
        for d in digits:
            for t in takes:
                n = 400 + 8 * (100 * s + 10 * d + t)          # unique length per clip at 8 kHz
                with wave.open(str(root / f"{d}_{speaker}_{t}.wav"), "wb") as w:
                    w.setnchannels(1)
                    w.setsampwidth(2)
                    w.setframerate(8000)
                    w.writeframes(struct.pack(f"<{n}h", *[(800 if k % 8 < 4 else -800) for k in range(n)]))
    return root


@pytest.mark.parametrize("speakers", [FSDD_SPEAKERS, ["b", "a"], list("fedcba")])
def test_folds_are_disjoint_and_cover_every_speaker(speakers):
    folds = heldout_speaker_folds(speakers)
    assert len(folds) == len(speakers)
    assert sorted(held for _, held in folds) == sorted(speakers)            # each speaker held out exactly once
    for train, held in folds:
        assert held not in train                                             # disjoint
        assert sorted(train + [held]) == sorted(speakers)                    # together: every speaker
        assert len(set(train)) == len(train) == len(speakers) - 1


def test_folds_reject_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        heldout_speaker_folds(["a", "a", "b"])
    with pytest.raises(ValueError, match="at least 2"):
        heldout_speaker_folds(["a"])


def test_speaker_builder_and_covering_strings(tmp_path):
    root = _fake_fsdd(tmp_path / "fsdd", ["amy", "bob", "cy"])
    assert fsdd_speakers(root) == ["amy", "bob", "cy"]
    every = DigitStringBuilder("all", root)
    for train, held in heldout_speaker_folds(fsdd_speakers(root)):
        tr, te = speaker_builder(every, train), speaker_builder(every, [held])
        assert tr.speakers == train and te.speakers == [held]
        assert not {id(c) for s in train for c in tr.by_speaker[s]} & {id(c) for c in te.by_speaker[held]}
        assert all(s in train for s in tr.speakers)
    with pytest.raises(ValueError, match="not in the builder"):
        speaker_builder(every, ["zed"])
    held = speaker_builder(every, ["bob"])
    strings = digit_strings_covering(held, seed=3)
    # every clip of the speaker exactly once: 10 digits x 3 takes, digit counts match
    words = [w for _, ws in strings for w in ws]
    assert len(words) == 30 and sorted(words) == sorted(DIGIT_WORDS * 3)
    assert all(1 <= len(ws) <= 7 for _, ws in strings)
    assert all(x.abs().max() <= 1.0 for x, _ in strings)
    again = digit_strings_covering(held, seed=3)
    assert [ws for _, ws in again] == [ws for _, ws in strings]
    assert all((a == b).all() for (a, _), (b, _) in zip(again, strings))


def test_real_fsdd_folds():
    shared = shared_dir()
    if shared is None or not (shared / "data" / "fsdd").is_dir():
        pytest.skip("../shared/data/fsdd is not present beside the repository (set FXQUANT_SHARED)")
    assert fsdd_speakers() == FSDD_SPEAKERS
    clips = fsdd_clips("all")
    for train, held in heldout_speaker_folds(fsdd_speakers()):
        n_train = sum(c.speaker in train for c in clips)
        n_held = sum(c.speaker == held for c in clips)
        assert (n_train, n_held) == (2500, 500)
