"""Batched cached decoding: suppression rules, batch == single, seeded sampling, and real tiny.en output."""
from __future__ import annotations

import dataclasses

import torch

from fxquant.asr.decoding import DecodeOptions, DecodeScratch, ModelParts, compression_ratio, decode_windows
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


def test_scratch_tensors_reuse_memory():
    s = DecodeScratch()
    a = s.tensor("x", (2, 3, 4))
    b = s.tensor("x", (1, 3, 4))                     # fits: the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (1, 3, 4) and b.is_contiguous()
    c = s.tensor("x", (3, 3, 4))                     # larger: new memory
    assert c.shape == (3, 3, 4) and s.tensor("x", (3, 3, 4)).data_ptr() == c.data_ptr()
    assert s.tensor("x", (2, 2), torch.int8).dtype == torch.int8
    assert s.tensor("y", (2,)).data_ptr() != s.tensor("x", (2,), torch.int8).data_ptr()
    s.clear()
    assert s.tensor("x", (1,)).numel() == 1


def test_cross_kv_one_window_at_a_time(small_ckpt):
    """Compiled parts compute the cross cache window by window into the scratch; fp32 parts keep the batched
    call. A row-independent cross function gives the same bits both ways, and the scratch keeps its memory."""
    audio = torch.randn(3, 20, 8)
    calls = []

    def cross(a):
        calls.append(a.shape[0])
        return torch.stack([a.tanh(), a * 2], 1).unsqueeze(1).expand(-1, 2, -1, -1, -1).reshape(a.shape[0], 2, 2, 1,
                                                                                              20, 8).contiguous()
    parts = dataclasses.replace(ModelParts.from_model(small_ckpt.model), cross_cache=cross, kernel_owned_threads=True)
    scratch = DecodeScratch()
    got = parts.cross_kv(audio, scratch)
    assert calls == [1, 1, 1] and torch.equal(got, cross(audio))
    again = parts.cross_kv(audio[:2] + 1, scratch)
    assert again.data_ptr() == got.data_ptr() and torch.equal(again, cross(audio[:2] + 1))
    calls.clear()
    parts.cross_kv(audio), dataclasses.replace(parts, kernel_owned_threads=False).cross_kv(audio, scratch)
    assert calls == [3, 3]                            # no scratch, or fp32 parts: one batched call
    fp32 = ModelParts.from_model(small_ckpt.model)
    real = torch.randn(2, 1500, small_ckpt.model.dims.n_audio_state) * 0.1
    chunked = dataclasses.replace(fp32, kernel_owned_threads=True).cross_kv(real, DecodeScratch())
    torch.testing.assert_close(chunked, fp32.cross_cache(real), rtol=1e-5, atol=1e-6)


def test_decoding_with_a_scratch_equals_without(small_ckpt, tokenizer):
    parts = dataclasses.replace(ModelParts.from_model(small_ckpt.model), kernel_owned_threads=True)
    mels = mel_batch(3, seed=5)
    opts = DecodeOptions(max_tokens=8)
    plain = decode_windows(parts, tokenizer, mels, opts)
    scratch = DecodeScratch()
    for batch in (mels, mels[1:], mels):           # reused across batches of different sizes
        got = decode_windows(parts, tokenizer, batch, opts, scratch=scratch)
        want = plain[3 - batch.shape[0]:]
        assert [r.tokens for r in got] == [r.tokens for r in want]
        assert all(abs(a.sum_logprob - b.sum_logprob) < 1e-4 for a, b in zip(got, want))


def test_greedy_pick_is_torch_argmax():
    """The decode loop takes numpy's argmax: the first maximum, a NaN counting as the maximum, as torch's."""
    x = torch.randn(6, 50)
    x[1, 7] = x[1, 30] = 9.0                         # a tie: the first
    x[2, 11] = float("nan")
    x[3, :] = float("-inf")
    x[4, 5] = float("inf")
    x[5, 3], x[5, 40] = float("nan"), float("nan")
    assert torch.equal(torch.from_numpy(x.numpy().argmax(-1)).long(), x.argmax(-1))


def test_a_step_taking_int8_rows_gets_the_cross_cache_window_by_window(small_ckpt, tokenizer):
    """A compiled step whose cross cache input is int8 rows (pass int8-kv-inputs) gets (codes, scales) built
    one window at a time into the scratch: the bits the step makes of the float cache, and the same decode."""
    import fxquant
    from fxquant.models.whisper import DecoderStep

    model = small_ckpt.model
    mels = mel_batch(3, seed=1)
    audio = model.encoder(mels)
    example = (torch.tensor([[1, 2, 3]] * 2), model.decoder.cross_cache(audio[:2]), model.decoder.empty_cache(2),
               torch.tensor(0))
    step = fxquant.compile_lowbit(DecoderStep(model.decoder), example, bits=8)
    assert step.input_spec.row_inputs == {1: "cross_kv"}
    calls = []

    def cross_cache(a):
        calls.append(a.shape[0])
        return model.decoder.cross_cache(a)
    parts = dataclasses.replace(ModelParts.from_model(model), cross_cache=cross_cache, step=step,
                                kernel_owned_threads=True)
    scratch = DecodeScratch()
    codes, scales = parts.cross_kv(audio, scratch)
    want = step.int8_rows(model.decoder.cross_cache(audio))
    assert calls == [1, 1, 1] and torch.equal(codes, want[0]) and torch.equal(scales, want[1])
    again = parts.cross_kv(audio[:2], scratch)
    assert again[0].data_ptr() == codes.data_ptr() and torch.equal(again[0], want[0][:2])
    opts = DecodeOptions(max_tokens=8)
    got = decode_windows(parts, tokenizer, mels, opts, audio=audio, scratch=DecodeScratch())
    float_parts = dataclasses.replace(parts, step=lambda *a: step(*a))      # passes the float cache: converted
    plain = decode_windows(float_parts, tokenizer, mels, opts, audio=audio, scratch=DecodeScratch())
    assert [r.tokens for r in got] == [r.tokens for r in plain] and len(got[0].tokens) > 0
    assert [r.sum_logprob for r in got] == [r.sum_logprob for r in plain]
