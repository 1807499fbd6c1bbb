"""Audio front end: WAV I/O, resampling quality, log-mel against a direct DFT."""
import math
import struct
import wave

import numpy as np
import pytest
import soundfile as sf
import torch

from fxquant.audio import (
    LogMel,
    hz_to_mel,
    load_audio,
    load_wav,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    resample,
)
from fxquant.errors import AudioError, AudioNotFoundError, ConfigError, FxQuantError


def _write_wav(path, samples, sr=8000, width=2, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        if width == 2:
            w.writeframes(struct.pack(f"<{len(samples)}h", *samples))
        else:
            w.writeframes(bytes(samples))


def _sine(freq, sr, n):
    return torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / sr)


def test_load_wav_scales_int16(tmp_path):
    _write_wav(tmp_path / "a.wav", [0, 16384, -32768, 32767], sr=8000)
    x, sr = load_wav(tmp_path / "a.wav")
    assert sr == 8000 and x.dtype == torch.float32
    assert x.tolist() == pytest.approx([0.0, 0.5, -1.0, 32767 / 32768])


def test_load_wav_averages_stereo(tmp_path):
    _write_wav(tmp_path / "s.wav", [1000, 3000, -200, 200], channels=2)
    x, _ = load_wav(tmp_path / "s.wav")
    assert x.tolist() == pytest.approx([2000 / 32768, 0.0])


def test_load_wav_reads_8_bit_and_keeps_rate(tmp_path):
    _write_wav(tmp_path / "u8.wav", [128, 192, 0], sr=11025, width=1)  # unsigned 8-bit: 128 is zero
    x, sr = load_wav(tmp_path / "u8.wav")
    assert sr == 11025 and x.tolist() == pytest.approx([0.0, 0.5, -1.0])


def test_load_wav_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_wav(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"not a wav at all")
    with pytest.raises(ValueError, match="junk.wav: not a readable audio file"):
        load_wav(tmp_path / "junk.wav")


@pytest.mark.parametrize("freq, tol", [(440.0, 2e-3), (3000.0, 5e-3)])
def test_upsample_x2_matches_ideal_sine(freq, tol):
    y = resample(_sine(freq, 8000, 8000).float(), 8000, 16000)
    assert y.shape == (16000,)
    ideal = _sine(freq, 16000, 16000)
    assert (y.double() - ideal)[100:-100].abs().max() < tol
    assert torch.fft.rfft(y.double()).abs().argmax().item() == int(freq)  # 1 Hz bins: frequency kept


def test_downsample_removes_aliases_and_keeps_passband():
    x = _sine(6000.0, 16000, 16000).float()  # above the new Nyquist (4 kHz)
    assert resample(x, 16000, 8000)[100:-100].pow(2).mean().sqrt() < 2e-3
    y = resample(_sine(3000.0, 16000, 16000).float(), 16000, 8000)
    assert y.shape == (8000,)
    assert y[100:-100].pow(2).mean().sqrt().item() == pytest.approx(math.sqrt(0.5), abs=5e-3)


def test_resample_arbitrary_ratio_length_and_batch():
    x = torch.randn(3, 1000)
    assert resample(x, 16000, 14400).shape == (3, 900)
    assert resample(x, 16000, 17600).shape == (3, 1100)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


def test_htk_mel_scale():
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.02)
    assert float(mel_to_hz(torch.tensor(hz_to_mel(4000.0)))) == pytest.approx(4000.0, rel=1e-6)


def test_filterbank_triangles_have_unit_height():
    fb = mel_filterbank(1024, 40, 16000, 0.0, 8000.0)
    assert fb.shape == (513, 40)
    assert fb.max() <= 1.0
    assert fb[:, 39].max() > 0.98  # wide top band: a bin lands near its centre
    assert fb[0].sum() == 0.0 and fb[512].sum() < 1e-6  # 0 Hz and 8 kHz are band edges


def test_bcresnet_features_shape_and_floor():
    feats = LogMel()(torch.zeros(2, 16000))
    assert feats.shape == (2, 1, 40, 32)
    assert feats[0, 0, 0, 0].item() == pytest.approx(math.log2(1e-9))


def test_sine_peaks_in_nearest_mel_band():
    feats = log_mel(_sine(1000.0, 16000, 16000).float())
    centres = mel_to_hz(torch.linspace(0.0, hz_to_mel(8000.0), 42, dtype=torch.float64))[1:-1]
    expected = int((centres - 1000.0).abs().argmin())
    assert expected == 13  # centre 955 Hz
    assert feats.mean(dim=1).argmax().item() == 13


def test_log_mel_matches_direct_dft_of_one_frame():
    x = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.1
    feats = log_mel(x)  # hop 512, n_fft 1024, centred frames
    m = 10
    frame = x[m * 512 - 512 : m * 512 + 512].double() * torch.hann_window(1024, dtype=torch.float64)
    power = torch.fft.rfft(frame).abs() ** 2
    expected = torch.log2(power @ mel_filterbank(1024, 40, 16000, 0.0, 8000.0).double() + 1e-9)
    assert torch.allclose(feats[:, m].double(), expected, atol=1e-3)


def test_digit_frontend_settings():
    front = LogMel(
        n_fft=512, win_length=400, hop_length=160, n_mels=64, log="ln", eps=1e-6, channel_dim=False
    )
    out = front(torch.zeros(16000))
    assert out.shape == (1, 64, 101)
    assert out[0, 0, 0].item() == pytest.approx(math.log(1e-6))
    with pytest.raises(ValueError, match="log must be"):
        log_mel(torch.zeros(16000), log="log7")


# ---- load_audio: any libsndfile format and rate -> 16 kHz mono float32 ----


def _write_sine(path, sr, channels, fmt, subtype, freq=1000.0, seconds=1.0):
    t = np.arange(int(sr * seconds)) / sr
    left = 0.6 * np.sin(2 * np.pi * freq * t)
    data = left if channels == 1 else np.stack([left, left / 3.0], axis=1)  # stereo mean = 0.4 * sine
    sf.write(str(path), data.astype(np.float32), sr, format=fmt, subtype=subtype)
    return data.shape[0]


CASES = [
    ("WAV", "PCM_16", 8000, 1),
    ("WAV", "PCM_U8", 22050, 2),
    ("WAV", "PCM_24", 16000, 1),
    ("WAV", "FLOAT", 44100, 2),
    ("FLAC", "PCM_16", 22050, 2),
    ("FLAC", "PCM_24", 44100, 1),
    ("OGG", "VORBIS", 8000, 1),
    ("OGG", "VORBIS", 44100, 2),
]


@pytest.mark.parametrize("fmt, subtype, sr, channels", CASES)
def test_load_audio_resamples_to_16k_mono_and_keeps_the_tone(tmp_path, fmt, subtype, sr, channels):
    path = tmp_path / f"tone_{sr}_{channels}.{fmt.lower()}"
    n = _write_sine(path, sr, channels, fmt, subtype)
    x = load_audio(path)
    assert x.dtype == torch.float32 and x.dim() == 1
    assert abs(x.numel() - n * 16000 / sr) <= 1
    spectrum = torch.fft.rfft(x[:16000].double(), n=16000).abs()  # 1 Hz bins
    assert spectrum.argmax().item() == 1000
    peak = 0.6 if channels == 1 else 0.4
    rms = x[800:-800].double().pow(2).mean().sqrt().item()
    tol = 0.05 if fmt == "OGG" or subtype == "PCM_U8" else 0.01  # lossy codec, 8-bit quantisation
    assert rms == pytest.approx(peak / math.sqrt(2), rel=tol)


def test_load_audio_other_rate_and_quality(tmp_path):
    _write_sine(tmp_path / "a.wav", 16000, 1, "WAV", "PCM_16")
    x = load_audio(tmp_path / "a.wav", sample_rate=8000, quality="VHQ")
    assert x.shape == (8000,)
    assert torch.equal(
        load_audio(tmp_path / "a.wav"), load_wav(tmp_path / "a.wav")[0]
    )  # 16 kHz: no resampling
    with pytest.raises(ConfigError, match="sample_rate must be a positive int"):
        load_audio(tmp_path / "a.wav", sample_rate=0)
    with pytest.raises(ConfigError, match="quality must be one of"):
        load_audio(tmp_path / "a.wav", quality="best")


def test_load_audio_errors_name_the_file_and_the_formats(tmp_path):
    with pytest.raises(AudioNotFoundError, match="audio file not found: .*missing.flac") as info:
        load_audio(tmp_path / "missing.flac")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, FxQuantError)
    with pytest.raises(AudioNotFoundError, match="it is a folder"):
        load_audio(tmp_path)
    (tmp_path / "notes.ogg").write_text("this is text, not audio")
    with pytest.raises(AudioError, match="notes.ogg: not a readable audio file.*FLAC, OGG"):
        load_audio(tmp_path / "notes.ogg")
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="zero.wav: not a readable audio file"):
        load_audio(tmp_path / "zero.wav")
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: the file holds no samples"):
        load_audio(tmp_path / "empty.wav")
    sf.write(str(tmp_path / "nan.wav"), np.array([0.0, np.nan, 0.1], np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: the samples contain NaN"):
        load_audio(tmp_path / "nan.wav")
    _write_sine(tmp_path / "long.wav", 8000, 1, "WAV", "PCM_16", seconds=3.0)
    with pytest.raises(AudioError, match="3 s of audio exceeds the limit of 2 s"):
        load_audio(tmp_path / "long.wav", max_seconds=2)


def test_load_audio_reads_real_lj_speech_flac(shared):
    path = shared / "data" / "ljspeech" / "LJ001-0002.flac"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    x = load_audio(path)
    assert x.shape == (30393,)  # 1.900 s at 16 kHz (metadata.tsv)
    assert 0.01 < x.abs().max().item() <= 1.0
