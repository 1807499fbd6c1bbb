"""Compiled Whisper: one budget over encoder/cross/step, save/load round trip, the on-disk compile cache."""
from __future__ import annotations

import json

import pytest
import torch

from fxquant.asr.compiled import CompiledWhisper, cached_compile, compile_whisper, precision_key
from fxquant.asr.decoding import DecodeOptions, ModelParts, decode_windows
from fxquant.errors import ArtifactError, ConfigError

from .conftest import mel_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cal_waves():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16000 * 3, generator=g) * 0.1 for _ in range(2)]


@pytest.fixture(scope="module")
def compiled_w8(small_ckpt, cal_waves):
    return compile_whisper(small_ckpt, bits=8, calibration_waves=cal_waves)


def test_precision_keys():
    assert [precision_key(), precision_key(bits=8), precision_key(avg_bits=4), precision_key(avg_bits=3.5)] == \
        ["fp32", "bits8", "avg4", "avg3.5"]
    with pytest.raises(ConfigError):
        precision_key(bits=8, avg_bits=4)


def test_w8_decodes_like_fp32_and_batches(compiled_w8, small_ckpt, tokenizer):
    mels = mel_batch(2, seed=3)
    opts = DecodeOptions(max_tokens=6)
    ref = decode_windows(ModelParts.from_model(small_ckpt.model), tokenizer, mels, opts)
    got = decode_windows(compiled_w8.parts(), tokenizer, mels, opts)         # batch 2 through compiled parts
    assert sum(a.tokens == b.tokens for a, b in zip(ref, got)) >= 1
    alone = decode_windows(compiled_w8.parts(), tokenizer, mels[1:], opts)
    assert alone[0].tokens == got[1].tokens
    assert all(r["format"].startswith("W8") for cm in compiled_w8.modules().values() for r in cm.report_rows())


def test_save_load_round_trip(compiled_w8, tokenizer, tmp_path):
    out = compiled_w8.save(tmp_path / "w8")
    loaded = CompiledWhisper.load(out)
    assert loaded.precision == "bits8" and loaded.dims == compiled_w8.dims
    mels = mel_batch(1, seed=4)
    a = decode_windows(compiled_w8.parts(), tokenizer, mels, DecodeOptions(max_tokens=5))[0]
    b = decode_windows(loaded.parts(), tokenizer, mels, DecodeOptions(max_tokens=5))[0]
    assert a.tokens == b.tokens and abs(a.sum_logprob - b.sum_logprob) < 1e-4
    compiled_w8.save(out)                       # replacing an artifact works
    assert CompiledWhisper.load(out).name == compiled_w8.name


def test_tampered_or_foreign_folders_are_refused(compiled_w8, tmp_path):
    out = compiled_w8.save(tmp_path / "a")
    meta = json.loads((out / "whisper.json").read_text())
    meta["dims"]["n_text_layer"] = -3
    (out / "whisper.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="dims"):
        CompiledWhisper.load(out)
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError):
        CompiledWhisper.load(out)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not an fxquant Whisper artifact"):
        compiled_w8.save(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ArtifactError, match="no whisper.json"):
        CompiledWhisper.load(foreign)


def test_one_budget_over_the_whole_model(small_ckpt, cal_waves, tokenizer):
    cw = compile_whisper(small_ckpt, avg_bits=4, calibration_waves=cal_waves, target="reference", max_batches=1)
    rows = [r for cm in cw.modules().values() for r in cm.report_rows()]
    assert {r["decided_by"] for r in rows} == {"budget:avg_bits=4 (whole model)"}
    bits = {r["format"].split()[0] for r in rows}
    assert len(bits) > 1                                   # mixed precision across the parts
    params = sum(int(r["weight"].split("->")[0]) * int(r["weight"].split("->")[1]) for r in rows)
    weighted = sum(int(r["format"].split()[0][1:]) * int(r["weight"].split("->")[0]) *
                   int(r["weight"].split("->")[1]) for r in rows)
    assert weighted / params <= 4.0 + 1e-9
    blocks = sorted(r["module"] for r in rows if r["module"].startswith("decoder.token_embedding"))
    assert blocks == [f"decoder.token_embedding.parts.{i}" for i in range(6)]      # a format per row block
    dec = small_ckpt.model.decoder
    tokens = torch.tensor([[tokenizer.sot, 11, 3000, 20000, tokenizer.eot, tokenizer.timestamp_begin + 3]])
    cross = dec.cross_cache(torch.randn(1, 1500, dec.ln.normalized_shape[0]))
    ref = dec.step(tokens, cross, dec.empty_cache(1), torch.tensor(0))[0]
    got = cw.step(tokens, cross, dec.empty_cache(1), torch.tensor(0))[0]
    shift = (got - ref).mean(-1, keepdim=True)           # the centered table moves each position's logits
    assert torch.nn.functional.cosine_similarity((got - shift).flatten(), ref.flatten(), dim=0) > 0.95


def test_cached_compile_loads_the_second_time(small_ckpt, cal_waves, tmp_path, monkeypatch):
    import fxquant.asr.compiled as mod

    real = mod.compile_whisper
    monkeypatch.setattr(mod, "compile_whisper", lambda ck, **kw: real(ck, calibration_waves=cal_waves, **kw))
    logs = []
    first = cached_compile(small_ckpt, bits=8, cache=tmp_path, log=logs.append)
    second = cached_compile(small_ckpt, bits=8, cache=tmp_path, log=logs.append)
    assert any(m.startswith("compiling") for m in logs) and any(m.startswith("loaded compiled") for m in logs)
    assert second.precision == first.precision == "bits8"
