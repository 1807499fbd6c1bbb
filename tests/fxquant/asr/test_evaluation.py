"""The WER harness: digit scoring, the table, and a real two-clip run of fp32 vs torch int8."""
from __future__ import annotations

import pytest

from fxquant.asr.evaluation import EvalResult, _digits_apart, evaluate_waves, render_rows


def test_digits_are_scored_one_word_each():
    assert _digits_apart("371").split() == ["three", "seven", "one"]
    assert _digits_apart("3-7, one").split() == ["three", "-", "seven", ",", "one"]


def test_table_shows_delta_against_fp32():
    rows = [EvalResult("fp32", {"ljspeech": 3.0}, {}, 4 << 20, 10.0, 0.5),
            EvalResult("bits8", {"ljspeech": 3.25}, {}, 1 << 20, 5.0, 0.2),
            EvalResult("ct2-int8", {}, {}, None, 0.0, 0.0, note="not installed: ctranslate2")]
    text = render_rows(rows)
    assert "3.25 (+0.25)" in text and "not installed: ctranslate2" in text and "4.0" in text


def test_two_real_clips(tiny_ckpt, lj_clips):
    from fxquant.audio import load_audio

    clips = [lj_clips[1], lj_clips[3]]
    data = {"lj": ([load_audio(c.path) for c in clips], [c.text for c in clips])}
    rows = evaluate_waves("whisper-tiny.en", ["fp32", "torch-int8"], data, log=lambda *a: None)
    assert [r.variant for r in rows] == ["fp32", "torch-int8"]
    assert rows[0].wer["lj"] == pytest.approx(0.0, abs=6.0)       # 2 short sentences: at most one word wrong
    assert rows[1].model_bytes < 0.75 * rows[0].model_bytes      # the tied logits table stays fp32 in torch int8
    assert all(r.rtf > 0 for r in rows)
