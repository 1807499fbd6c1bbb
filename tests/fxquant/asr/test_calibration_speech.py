"""The shipped English calibration speech: present, loadable, held apart from the scoring texts."""
import pytest
import torch

from fxquant.asr import calibration_speech as cs
from fxquant.asr.data import calibration_waves
from fxquant.textnorm import normalize_english


def test_every_sentence_has_a_clip_of_plausible_length():
    texts = cs.sentences()
    waves = cs.english_waves()
    assert len(texts) == len(waves) == 32
    for text, w in zip(texts, waves):
        seconds = w.numel() / 16000
        words = len(text.split())
        assert w.dtype == torch.float32 and w.dim() == 1
        assert 1.5 < seconds < 12 and 1.0 < words / seconds < 5.0, (text, seconds)
        assert 0.01 < float(w.abs().max()) < 1.5      # lossy Ogg may overshoot 1.0 a little


def test_no_calibration_sentence_is_a_scoring_sentence(shared):
    from fxquant.asr.data import ljspeech

    scored = {normalize_english(u.text) for u in ljspeech(root=shared / "data" / "ljspeech")}
    assert not scored & {normalize_english(t) for t in cs.sentences()}


def test_a_missing_clip_names_the_regeneration_command(tmp_path):
    (tmp_path / "sentences.txt").write_text("one sentence\n")
    with pytest.raises(FileNotFoundError, match="python -m fxquant.asr.calibration_speech"):
        cs.english_waves(folder=tmp_path)


def test_calibration_interleaves_english_and_digits(shared):
    waves = calibration_waves(n=2, english=3)
    english = cs.english_waves(3)
    assert len(waves) == 5
    assert torch.equal(waves[0], english[0]) and torch.equal(waves[2], english[1]) and torch.equal(waves[4], english[2])
    assert not any(torch.equal(waves[i], e) for i in (1, 3) for e in english)


def test_no_audio_requested_is_an_error():
    with pytest.raises(ValueError, match="no calibration audio"):
        calibration_waves(n=0, english=0)


def test_default_is_fsdd_and_english_stands_in_without_shared(shared, tmp_path, monkeypatch):
    from fxquant.asr.data import BUDGET_ENGLISH, calibration_recipe

    assert calibration_recipe() == "fsdd8"
    assert calibration_recipe(english=BUDGET_ENGLISH) == "english8+fsdd8"          # Whisper under a budget
    waves = calibration_waves(english=BUDGET_ENGLISH)
    assert len(waves) == 16 and torch.equal(waves[0], cs.english_waves(1)[0])     # interleaved, English first
    monkeypatch.setenv("FXQUANT_SHARED", str(tmp_path))          # no data there
    assert calibration_recipe() == "english16"
    waves = calibration_waves()
    assert len(waves) == 16 and torch.equal(waves[3], cs.english_waves(4)[3])
