"""Accuracy pinned on real speech: Whisper tiny.en at 8 bits on 30 LJ Speech utterances.

Measured over all 186 utterances (benchmarks/WER-whisper-tiny.en.md): fp32 3.43 %, bits8 3.40 %. On these 30
the margin allows a regression of at most 1 WER point (about 6 words) before the test fails.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_tiny_en_w8_keeps_fp32_accuracy(tiny_ckpt, lj_clips, tmp_path):
    from fxquant.asr.compiled import cached_compile
    from fxquant.asr.decoding import ModelParts
    from fxquant.asr.transcriber import Transcriber
    from fxquant.audio import load_audio
    from fxquant.models.whisper_text import WhisperTokenizer
    from fxquant.textnorm import word_error_rate

    clips = lj_clips[-30:]
    waves = [load_audio(c.path) for c in clips]
    refs = [c.text for c in clips]
    tok = WhisperTokenizer.from_file(tiny_ckpt.directory / "tokenizer.json")
    fp32 = [r.text for r in Transcriber(ModelParts.from_model(tiny_ckpt.model), tok).transcribe_audio(waves)]
    cw = cached_compile(tiny_ckpt, bits=8, cache=tmp_path, log=lambda *a: None)
    w8 = [r.text for r in Transcriber(cw.parts(), tok).transcribe_audio(waves)]
    wer_fp32, wer_w8 = 100 * word_error_rate(refs, fp32), 100 * word_error_rate(refs, w8)
    assert wer_fp32 < 8.0
    assert wer_w8 <= wer_fp32 + 1.0, (wer_fp32, wer_w8)
    assert sum(a == b for a, b in zip(fp32, w8)) >= 24        # most transcripts identical to fp32's
