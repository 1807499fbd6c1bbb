"""30 s windows, long audio, temperature fallback and the no-speech rule."""
from __future__ import annotations

import pytest
import torch

from fxquant.asr.decoding import DecodeResult, ModelParts, compression_ratio
from fxquant.asr.transcriber import TranscribeOptions, Transcriber, split_windows
from fxquant.textnorm import normalize_english


@pytest.mark.parametrize("seconds,windows", [(0.5, 1), (30.0, 1), (30.02, 2), (70.0, 3)])
def test_split_windows(seconds, windows):
    mels = split_windows(torch.randn(int(seconds * 16000)) * 0.1)
    assert mels.shape == (windows, 80, 3000)
    assert torch.isfinite(mels).all()


def _windows_after_30s_of_silence(audio: torch.Tensor) -> torch.Tensor:
    """openai-whisper's features: the mel of the audio + 30 s of zeros, cut into 3000-frame windows."""
    from fxquant.models.whisper_frontend import N_SAMPLES, log_mel_spectrogram

    mel = log_mel_spectrogram(audio, padding=N_SAMPLES)
    n = -(-max(1, -(-audio.shape[0] // 160)) // 3000)
    return torch.stack([mel[:, i * 3000:(i + 1) * 3000] for i in range(n)])


@pytest.mark.parametrize("samples", [1, 201, 401, 3200, 16000, 479_599, 479_850, 480_000, 480_001, 959_900,
                                     1_000_003])
@pytest.mark.parametrize("where", ["everywhere", "at the end"])
def test_split_windows_equals_the_features_after_30s_of_silence(samples, where):
    """Only the frames whose STFT reaches the audio are transformed, bit for bit the same features (the
    loudest frame, which sets the 8-unit floor, may be one whose STFT window reaches past the last window:
    lengths near 30 s; very short clips have almost no frame of their own)."""
    g = torch.Generator().manual_seed(samples)
    audio = torch.randn(samples, generator=g) * 0.1
    if where == "at the end":                  # quiet audio whose loudest part is its last 40 samples
        audio *= 1e-4
        audio[-40:] = torch.randn(min(40, samples), generator=g)
    assert torch.equal(split_windows(audio), _windows_after_30s_of_silence(audio))


def test_split_windows_rejects_stereo():
    with pytest.raises(ValueError, match="mono"):
        split_windows(torch.zeros(2, 16000))


def test_fallback_retries_unlikely_windows(small_ckpt, tokenizer):
    """A random model's greedy output is unlikely (mean log-prob < -1): it is sampled at higher temperatures."""
    opts = TranscribeOptions(temperatures=(0.0, 0.5, 1.0), best_of=2, max_tokens=6, no_speech_threshold=1.1)
    t = Transcriber(ModelParts.from_model(small_ckpt.model), tokenizer, opts)
    out = t.transcribe_audio([torch.randn(16000) * 0.1])
    assert len(out[0].temperatures) == 1 and out[0].temperatures[0] in opts.temperatures   # one kept attempt
    again = t.transcribe_audio([torch.randn(16000) * 0.1])
    assert len(again[0].windows) == 1


def test_silent_windows_give_no_text(tiny_ckpt):
    """Room-noise-like silence: no-speech probability > 0.6 and an unlikely text, so nothing is printed.

    (Digital zeros make tiny.en say "you" with a confident log-probability, as in openai-whisper.)
    """
    t = Transcriber.from_checkpoint(tiny_ckpt)
    out = t.transcribe_audio([torch.randn(48000, generator=torch.Generator().manual_seed(0)) * 0.003])
    assert out[0].text == ""
    assert out[0].windows[0].no_speech_prob > 0.6


def test_long_audio_is_cut_into_windows(tiny_ckpt, lj_clips):
    """Two LJ clips 31 s apart: two windows, both clips' words in order."""
    from fxquant.audio import load_audio

    a, b = load_audio(lj_clips[1].path), load_audio(lj_clips[5].path)
    wave = torch.cat([a, torch.zeros(31 * 16000 - a.numel()), b])
    t = Transcriber.from_checkpoint(tiny_ckpt)
    out = t.transcribe_audio([wave, a])
    assert len(out[0].windows) == 2 and len(out[1].windows) == 1
    text = normalize_english(out[0].text)
    assert text.startswith(normalize_english(lj_clips[1].text))
    words_b = normalize_english(lj_clips[5].text).split()
    assert sum(w in text.split() for w in words_b) >= 0.8 * len(words_b)


def test_progress_counts_finished_files(small_ckpt, tokenizer):
    opts = TranscribeOptions(temperatures=(0.0,), max_tokens=2, batch_size=2)
    t = Transcriber(ModelParts.from_model(small_ckpt.model), tokenizer, opts)
    seen = []
    t.transcribe_audio([torch.randn(16000) * 0.1, torch.randn(40 * 16000) * 0.1, torch.randn(8000) * 0.1],
                       progress=seen.append)
    assert seen == [1, 3]          # windows: file 0 | file 1 (2 windows) | file 2 -> batches of 2


def test_last_resort_keeps_the_likeliest_attempt_and_cuts_its_loop(tokenizer):
    """All temperatures failed: an attempt that passes the compression rule wins; among loops, the likeliest,
    cut after the first copy of its repeated n-gram."""
    t = Transcriber(ModelParts(None, None, None, 1, 1, 1, 1), tokenizer, TranscribeOptions())

    def attempt(text_tokens, avg, temp):
        return DecodeResult(tokens=text_tokens, sum_logprob=avg * (len(text_tokens) + 1), no_speech_prob=0.0,
                            temperature=temp, text=tokenizer.decode(text_tokens))

    head = tokenizer.encode(" It was a bright cold day")
    the_loop = attempt(head + tokenizer.encode(" the") * 30, -0.2, 0.0)
    a_loop = attempt(head + tokenizer.encode(" a b") * 20, -0.5, 0.6)
    assert all(compression_ratio(r.text) > 2.4 for r in (the_loop, a_loop))
    kept = t._last_resort([a_loop, the_loop])
    assert kept.temperature == 0.0 and kept.tokens == head + tokenizer.encode(" the")
    assert kept.text == " It was a bright cold day the"
    unlikely = attempt(head, -1.5, 1.0)                       # fails only the log-probability rule
    assert t._last_resort([the_loop, a_loop, unlikely]) is unlikely
