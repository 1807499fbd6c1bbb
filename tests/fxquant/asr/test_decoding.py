"""Batched cached decoding: suppression rules, batch == single, seeded sampling, and real tiny.en output."""
from __future__ import annotations

import torch

from fxquant.asr.decoding import DecodeOptions, ModelParts, compression_ratio, decode_windows
from fxquant.textnorm import normalize_english

from .conftest import mel_batch


def test_suppressed_tokens_never_appear(small_ckpt, tokenizer):
    parts = ModelParts.from_model(small_ckpt.model)
    results = decode_windows(parts, tokenizer, mel_batch(3), DecodeOptions(max_tokens=12))
    banned = set(tokenizer.non_speech_tokens()) | {tokenizer.sot, tokenizer.transcribe, tokenizer.translate,
                                                  tokenizer.sot_prev, tokenizer.sot_lm, tokenizer.no_speech}
    first_banned = set(tokenizer.encode(" ")) | {tokenizer.eot}
    for r in results:
        assert 1 <= len(r.tokens) <= 12
        assert not banned & set(r.tokens)
        assert r.tokens[0] not in first_banned
        assert 0.0 <= r.no_speech_prob <= 1.0 and r.sum_logprob < 0


def test_batch_equals_one_at_a_time(small_ckpt, tokenizer):
    parts = ModelParts.from_model(small_ckpt.model)
    mels = mel_batch(3, seed=1)
    together = decode_windows(parts, tokenizer, mels, DecodeOptions(max_tokens=10))
    alone = [decode_windows(parts, tokenizer, mels[i:i + 1], DecodeOptions(max_tokens=10))[0] for i in range(3)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    for a, b in zip(together, alone):
        assert abs(a.sum_logprob - b.sum_logprob) < 1e-3


def test_sampling_is_seeded_and_keeps_the_likeliest(small_ckpt, tokenizer):
    parts = ModelParts.from_model(small_ckpt.model)
    mel = mel_batch(1, seed=2)
    opts = DecodeOptions(temperature=1.0, best_of=3, max_tokens=8, seed=7)
    a, b = decode_windows(parts, tokenizer, mel, opts), decode_windows(parts, tokenizer, mel, opts)
    assert a[0].tokens == b[0].tokens and a[0].temperature == 1.0
    greedy = decode_windows(parts, tokenizer, mel, DecodeOptions(max_tokens=8))[0]
    assert a[0].tokens != greedy.tokens


def test_compression_ratio_flags_loops():
    assert compression_ratio(" the the the the" * 20) > 2.4
    assert compression_ratio("in being comparatively modern.") < 1.5
    assert compression_ratio("") == 0.0


def test_real_tiny_en_transcribes_lj_speech(tiny_ckpt, tokenizer, lj_clips):
    from fxquant.audio import load_audio
    from fxquant.asr.transcriber import split_windows

    parts = ModelParts.from_model(tiny_ckpt.model)
    clip = lj_clips[1]                          # LJ001-0002 "in being comparatively modern."
    r = decode_windows(parts, tokenizer, split_windows(load_audio(clip.path)))[0]
    assert normalize_english(r.text) == normalize_english(clip.text)
    assert r.no_speech_prob < 0.1 and r.avg_logprob > -0.5
    silent = decode_windows(parts, tokenizer, split_windows(torch.zeros(16000)))[0]
    assert silent.no_speech_prob > 0.5
