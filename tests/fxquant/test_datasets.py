"""FSDD locator, split parsing and the connected-digit string builder."""
import random
import struct
import wave

import pytest
import torch

from fxquant import datasets
from fxquant.datasets import DIGIT_WORDS, DigitStringBuilder, digit_test_set, fsdd_clips, shared_dir


def _needs_fsdd():
    shared = shared_dir()
    if shared is None or not (shared / "data" / "fsdd").is_dir():
        pytest.skip("../shared/data/fsdd is not present beside the repository (set FXQUANT_SHARED)")


def _fake_fsdd(root, names, sr=8000, n=800):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        with wave.open(str(root / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sr)
            w.writeframes(struct.pack(f"<{n}h", *[(1000 + 100 * i) * (1 if k % 8 < 4 else -1) for k in range(n)]))
    return root


def test_shared_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_SHARED", str(tmp_path))
    assert shared_dir() == tmp_path.resolve()
    monkeypatch.setenv("FXQUANT_SHARED", str(tmp_path / "nope"))
    assert shared_dir() is None
    with pytest.raises(FileNotFoundError, match="FXQUANT_SHARED"):
        fsdd_clips("all")


def test_split_parsing_on_fake_data(tmp_path):
    root = _fake_fsdd(tmp_path / "fsdd", ["3_bob_0.wav", "3_bob_4.wav", "4_bob_5.wav", "9_amy_49.wav", "README.wav"])
    assert [c.path.name for c in fsdd_clips("test", root)] == ["3_bob_0.wav", "3_bob_4.wav"]
    train = fsdd_clips("train", root)
    assert [(c.digit, c.speaker, c.take) for c in train] == [(4, "bob", 5), (9, "amy", 49)]
    assert len(fsdd_clips("all", root)) == 4
    with pytest.raises(ValueError, match="split must be"):
        fsdd_clips("dev", root)


def test_builder_is_deterministic_and_well_formed(tmp_path):
    root = _fake_fsdd(tmp_path / "fsdd", [f"{d}_bob_{t}.wav" for d in range(10) for t in (5, 6)])
    builder = DigitStringBuilder("train", root)
    assert builder.speakers == ["bob"]
    for augment in (False, True):
        a = [builder.sample(random.Random(7), augment) for _ in range(2)]
        assert torch.equal(a[0][0], a[1][0]) and a[0][1] == a[1][1]
    rng = random.Random(1)
    for _ in range(20):
        wave16k, words = builder.sample(rng)
        assert 1 <= len(words) <= 7 and all(w in DIGIT_WORDS for w in words)
        clips = len(words) * 1600                   # each fake clip: 800 samples at 8 kHz -> 1600
        gaps_min = int(0.1 * 16000) * 2 + int(0.05 * 16000) * (len(words) - 1) - len(words)
        gaps_max = int(0.3 * 16000) * (len(words) + 1)
        assert clips + gaps_min <= wave16k.numel() <= clips + gaps_max
        assert wave16k.abs().max() <= 1.0


def test_builder_rejects_bad_digit_counts(tmp_path):
    root = _fake_fsdd(tmp_path / "fsdd", ["1_bob_5.wav"])
    with pytest.raises(ValueError, match="min_digits"):
        DigitStringBuilder("train", root, min_digits=3, max_digits=2)


def test_real_fsdd_splits():
    _needs_fsdd()
    clips = fsdd_clips("all")
    assert len(clips) == 3000
    assert len(fsdd_clips("test")) == 300 and len(fsdd_clips("train")) == 2700
    assert sorted({c.speaker for c in clips}) == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    x = datasets.load_clip16k(clips[0].path)
    assert x.dtype == torch.float32 and 0.14 * 16000 <= x.numel() <= 2.3 * 16000


def test_digit_test_set_is_fixed():
    _needs_fsdd()
    small, big = digit_test_set(5, seed=0), digit_test_set(40, seed=0)
    assert len(big) == 40
    for (wa, ra), (wb, rb) in zip(small, big):
        assert torch.equal(wa, wb) and ra == rb
    assert [w for _, w in small][:2] == [["six"], ["two", "three", "one", "three"]]
    words = sum(len(w) for _, w in big)
    seconds = sum(x.numel() for x, _ in big) / 16000
    assert 40 <= words <= 280 and 0.3 * words < seconds < 1.2 * words


def test_fsdd_available_stops_at_the_first_clip_of_the_split(tmp_path):
    from fxquant.datasets import fsdd_available, fsdd_clips

    (tmp_path / "3_alice_2.wav").write_bytes(b"")           # a test take (0-4) only
    (tmp_path / "notes.wav").write_bytes(b"")                # not a {digit}_{speaker}_{take} name
    assert fsdd_available("test", tmp_path) and not fsdd_available("train", tmp_path)
    assert not fsdd_available("train", tmp_path / "missing")
    (tmp_path / "3_alice_7.wav").write_bytes(b"")
    assert fsdd_available("train", tmp_path)
    assert [c.take for c in fsdd_clips("all", tmp_path)] == [2, 7]
