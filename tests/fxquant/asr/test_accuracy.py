"""Accuracy pinned on real speech: Whisper tiny.en at 8 bits and at averages of 4 and 3 bits on 30 LJ Speech
utterances (the last 30; 520 words).

Measured over all 186 utterances (benchmarks/WER-whisper-tiny.en.md): fp32 3.43 %, bits8 3.49 %, avg4 3.55 %,
avg3 4.49 %; on these 30: fp32 0.95 %, bits8 1.33 %, avg4 1.71 % (21 of 30 transcripts identical to fp32's),
avg3 2.28 % (11 identical). The margins allow a regression of about 1 WER point (5 words) before a test fails.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _transcripts(ckpt, clips, cache, **precision) -> tuple[list[str], list[str]]:
    """(fp32 transcripts, compiled transcripts) of the clips; the compiled model is compiled into `cache`."""
    from fxquant.asr.compiled import cached_compile
    from fxquant.asr.decoding import ModelParts
    from fxquant.asr.transcriber import Transcriber
    from fxquant.audio import load_audio
    from fxquant.models.whisper_text import WhisperTokenizer

    waves = [load_audio(c.path) for c in clips]
    tok = WhisperTokenizer.from_file(ckpt.directory / "tokenizer.json")
    fp32 = [r.text for r in Transcriber(ModelParts.from_model(ckpt.model), tok).transcribe_audio(waves)]
    cw = cached_compile(ckpt, cache=cache, log=lambda *a: None, **precision)
    return fp32, [r.text for r in Transcriber(cw.parts(), tok).transcribe_audio(waves)]


def test_tiny_en_w8_keeps_fp32_accuracy(tiny_ckpt, lj_clips, tmp_path):
    from fxquant.textnorm import word_error_rate

    clips = lj_clips[-30:]
    refs = [c.text for c in clips]
    fp32, w8 = _transcripts(tiny_ckpt, clips, tmp_path, bits=8)
    wer_fp32, wer_w8 = 100 * word_error_rate(refs, fp32), 100 * word_error_rate(refs, w8)
    assert wer_fp32 < 8.0
    assert wer_w8 <= wer_fp32 + 1.0, (wer_fp32, wer_w8)
    assert sum(a == b for a, b in zip(fp32, w8)) >= 24        # most transcripts identical to fp32's


def test_tiny_en_avg4_stays_within_a_point_of_its_measured_wer(tiny_ckpt, lj_clips, tmp_path):
    from fxquant.textnorm import word_error_rate

    clips = lj_clips[-30:]
    refs = [c.text for c in clips]
    fp32, avg4 = _transcripts(tiny_ckpt, clips, tmp_path, avg_bits=4.0)
    wer_fp32, wer_avg4 = 100 * word_error_rate(refs, fp32), 100 * word_error_rate(refs, avg4)
    assert wer_fp32 < 2.0                                     # 0.95 % measured
    assert wer_avg4 <= 1.71 + 1.0, (wer_fp32, wer_avg4)       # 1.71 % measured
    assert sum(a == b for a, b in zip(fp32, avg4)) >= 16      # 21 measured


def test_tiny_en_avg3_stays_within_a_point_of_its_measured_wer(tiny_ckpt, lj_clips, tmp_path):
    from fxquant.textnorm import word_error_rate

    clips = lj_clips[-30:]
    refs = [c.text for c in clips]
    fp32, avg3 = _transcripts(tiny_ckpt, clips, tmp_path, avg_bits=3.0)
    wer_fp32, wer_avg3 = 100 * word_error_rate(refs, fp32), 100 * word_error_rate(refs, avg3)
    assert wer_avg3 <= 2.28 + 1.0, (wer_fp32, wer_avg3)       # 2.28 % measured
    assert sum(a == b for a, b in zip(fp32, avg3)) >= 7       # 11 measured
