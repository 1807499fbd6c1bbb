"""CTranslate2 / faster-whisper model directories (model.bin + config.json) into fxquant's Whisper.

model.bin is parsed here, without CTranslate2 and without pickle: the layout is the one CTranslate2's
loader reads (src/models/model.cc; written by python/ctranslate2/specs/model_spec.py `_serialize`):

    u32 binary_version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | n_bytes of data)
    u32 n_aliases | n_aliases x (str alias | str target)        str = u16 length (NUL included) + bytes

The file is untrusted: every length and offset is checked against the file size, dtypes come from an
allowlist, byte counts must match the shapes, and the result is checked against the Whisper layout.
Weights are read through a memory map; float16/bfloat16 are widened and int8/int16 weights are
dequantized with their `<name>_scale` (CTranslate2 stores q = round(w * scale), so w = q / scale).

Variable names follow ctranslate2/specs/whisper_spec.py and transformer_spec.py: self-attention q/k/v are
fused in `self_attention/linear_0` (the key part has no bias), cross-attention has the query in
`attention/linear_0`, k/v fused in `attention/linear_1` and the output in `linear_2`; the output projection
is an alias of (tied to) `decoder/embeddings/weight`.

Example:
    >>> model = load_ct2_whisper("faster-whisper-tiny.en/")      # doctest: +SKIP
    >>> model.dims.n_vocab                                       # doctest: +SKIP
    51864
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from fxquant.errors import CheckpointError
from fxquant.models.whisper import ModelDimensions, Whisper

__all__ = ["Ct2ModelFile", "read_ct2_model", "whisper_state_from_ct2", "whisper_from_state", "load_ct2_whisper"]

SUPPORTED_BINARY_VERSIONS = (4, 5, 6)     # versions 1-3 predate Whisper (dtype by item size)
SPEC_NAME = "WhisperSpec"
MAX_RANK = 8
# DataType enum of include/ctranslate2/types.h; "bfloat16" is widened by hand (numpy has no bfloat16)
DTYPES: dict[int, np.dtype | str] = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
                                     4: np.dtype("<f2"), 5: "bfloat16"}
GELU = 3                                  # ctranslate2.specs.common_spec.Activation.GELU
HEAD_DIM = 64                             # every Whisper size; used when num_heads is not stored


@dataclasses.dataclass(frozen=True)
class Ct2ModelFile:
    """A parsed model.bin: spec name and revision, and its variables by name (aliases resolved)."""
    spec: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; errors name the file and the offset."""

    def __init__(self, buffer: np.ndarray, path: Path):
        self.buffer, self.path, self.offset, self.size = buffer, path, 0, buffer.size

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.offset + n > self.size:
            raise CheckpointError(f"{self.path} is truncated or corrupt: reading {what} needs {n} bytes at offset "
                                  f"{self.offset}, but the file has {self.size} bytes. Re-download or re-convert it.")
        out = self.buffer[self.offset:self.offset + n]
        self.offset += n
        return out

    def uint(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what).tobytes(), "little")

    def string(self, what: str) -> str:
        n = self.uint(2, f"the length of {what}")
        raw = self.take(n, what).tobytes()
        if n == 0 or raw[-1] != 0 or 0 in raw[:-1]:
            raise CheckpointError(f"{self.path}: {what} at offset {self.offset - n} is not a NUL-terminated string; "
                                  "the file is corrupt.")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} at offset {self.offset - n} is not UTF-8; the file is corrupt.") from None


def _decode(raw: np.ndarray, dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.view(dtype).reshape(shape)


def read_ct2_model(path: str | Path) -> Ct2ModelFile:
    """Parse a CTranslate2 model.bin (the file, or the directory holding it); arrays view a memory map.

    Example:
        >>> read_ct2_model("model_dir").variables["encoder/conv1/weight"].shape     # doctest: +SKIP
        (384, 80, 3)
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; a CTranslate2 model directory holds model.bin and config.json.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty; re-download or re-convert the model.")
    cur = _Cursor(np.memmap(path, dtype=np.uint8, mode="r"), path)
    version = cur.uint(4, "the binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CheckpointError(f"{path}: CTranslate2 binary version {version} is not supported (supported: "
                              f"{list(SUPPORTED_BINARY_VERSIONS)}); is this a CTranslate2 model.bin? Re-convert it "
                              "with a CTranslate2 4.x converter.")
    spec = cur.string("the spec name")
    revision = cur.uint(4, "the spec revision")
    variables: dict[str, np.ndarray] = {}
    for index in range(cur.uint(4, "the variable count")):
        name = cur.string(f"the name of variable {index}")
        rank = cur.uint(1, f"the rank of {name}")
        if rank > MAX_RANK:
            raise CheckpointError(f"{path}: variable {name!r} has rank {rank} (> {MAX_RANK}); the file is corrupt.")
        shape = tuple(cur.uint(4, f"dimension {d} of {name}") for d in range(rank))
        code = cur.uint(1, f"the dtype of {name}")
        if code not in DTYPES:
            raise CheckpointError(f"{path}: variable {name!r} has dtype code {code}; supported codes are "
                                  f"{sorted(DTYPES)} (float32, int8, int16, int32, float16, bfloat16).")
        n_bytes = cur.uint(4, f"the byte count of {name}")
        itemsize = 2 if DTYPES[code] == "bfloat16" else DTYPES[code].itemsize
        if n_bytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CheckpointError(f"{path}: variable {name!r} of shape {shape} declares {n_bytes} bytes, expected "
                                  f"{int(np.prod(shape, dtype=np.int64)) * itemsize}; the file is corrupt.")
        if name in variables:
            raise CheckpointError(f"{path}: variable {name!r} appears twice; the file is corrupt.")
        variables[name] = _decode(cur.take(n_bytes, f"the data of {name}"), DTYPES[code], shape)
    for index in range(cur.uint(4, "the alias count")):
        alias, target = cur.string(f"alias {index}"), cur.string(f"the target of alias {index}")
        if target not in variables or alias in variables:
            raise CheckpointError(f"{path}: alias {alias!r} -> {target!r} names a missing variable or shadows one; "
                                  "the file is corrupt.")
        variables[alias] = variables[target]
        if target + "_scale" in variables:
            variables[alias + "_scale"] = variables[target + "_scale"]
    if cur.offset != cur.size:
        raise CheckpointError(f"{path}: {cur.size - cur.offset} unexpected bytes after the last alias; the file is "
                              "corrupt or two files were concatenated.")
    return Ct2ModelFile(spec, revision, version, variables)


class _SkipInit(TorchFunctionMode):
    """Within this (thread-local) mode, torch.nn.init's in-place initialisers do nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


class _Reader:
    """Float32 access to CT2 variables by name, dequantizing int8/int16 weights with `<name>_scale`."""

    def __init__(self, variables: dict[str, np.ndarray], source: str):
        self.variables, self.source = variables, source

    def has(self, name: str) -> bool:
        return name in self.variables

    def scalar(self, name: str, default: int | None = None) -> int | None:
        value = self.variables.get(name)
        if value is None:
            return default
        if value.size != 1 or value.dtype.kind not in "iu":
            raise CheckpointError(f"{self.source}: attribute {name!r} should be one integer, got shape {value.shape} "
                                  f"of {value.dtype}; the file is corrupt.")
        return int(value.reshape(()))

    def array(self, name: str, ndim: int) -> np.ndarray:
        if name not in self.variables:
            raise CheckpointError(f"{self.source}: variable {name!r} is missing; this is not a complete CTranslate2 "
                                  "Whisper model (re-convert it with ct2-transformers-converter).")
        value = self.variables[name]
        if value.ndim != ndim:
            raise CheckpointError(f"{self.source}: variable {name!r} has shape {value.shape}, expected {ndim} dims.")
        if value.dtype.kind == "f":
            return value.astype(np.float32)            # always a copy: never hand out views of the file
        scale = self.variables.get(name + "_scale")
        if value.dtype.kind != "i" or value.dtype.itemsize > 2 or scale is None or scale.dtype.kind != "f":
            raise CheckpointError(f"{self.source}: variable {name!r} is {value.dtype} without a float "
                                  f"'{name}_scale'; only float32/float16/bfloat16 and int8/int16 with a scale load.")
        scale = scale.astype(np.float32)
        if scale.size not in (1, value.shape[0]) or not np.all(np.isfinite(scale)) or np.any(scale == 0):
            raise CheckpointError(f"{self.source}: '{name}_scale' of shape {scale.shape} does not fit {name!r} "
                                  f"{value.shape} or holds zero/non-finite values; the file is corrupt.")
        scale = scale.reshape((-1,) + (1,) * (value.ndim - 1)) if scale.size > 1 else scale.reshape(())
        with np.errstate(over="ignore"):               # non-finite results are rejected by whisper_from_state
            return value.astype(np.float32) / scale


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    found = {int(m.group(1)) for k in variables if (m := re.match(re.escape(prefix) + r"/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"{prefix} layers {sorted(found)} are not numbered 0..n-1; the model is corrupt.")
    return len(found)


def _split(array: np.ndarray, parts: int, name: str, source: str) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise CheckpointError(f"{source}: fused variable {name!r} of shape {array.shape} does not split in {parts}.")
    return [part.copy() for part in np.split(array, parts)]     # own memory: no hidden storage sharing


def _attention(r: _Reader, src: str, dst: str, fused: list[str], out: str, state: dict) -> None:
    """Map one attention block; `fused` lists (CT2 linear, roles) e.g. ["linear_0:qkv"] or ["linear_0:q", "linear_1:kv"]."""
    for item in fused:
        linear, roles = item.split(":")
        weight, bias = r.array(f"{src}/{linear}/weight", 2), r.array(f"{src}/{linear}/bias", 1)
        for role, w, b in zip(roles, _split(weight, len(roles), f"{src}/{linear}/weight", r.source),
                              _split(bias, len(roles), f"{src}/{linear}/bias", r.source), strict=True):
            module = {"q": "query", "k": "key", "v": "value"}[role]
            state[f"{dst}.{module}.weight"] = w
            if role != "k":     # a key bias shifts every score of a query equally: softmax drops it
                state[f"{dst}.{module}.bias"] = b
    state[f"{dst}.out.weight"] = r.array(f"{src}/{out}/weight", 2)
    state[f"{dst}.out.bias"] = r.array(f"{src}/{out}/bias", 1)


def _norm(r: _Reader, src: str, dst: str, state: dict) -> None:
    state[f"{dst}.weight"] = r.array(f"{src}/gamma", 1)
    state[f"{dst}.bias"] = r.array(f"{src}/beta", 1)


def _block(r: _Reader, src: str, dst: str, state: dict, cross: bool) -> None:
    _attention(r, f"{src}/self_attention", f"{dst}.attn", ["linear_0:qkv"], "linear_1", state)
    _norm(r, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", state)
    if cross:
        _attention(r, f"{src}/attention", f"{dst}.cross_attn", ["linear_0:q", "linear_1:kv"], "linear_2", state)
        _norm(r, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", state)
    for i, ct2 in ((0, "linear_0"), (2, "linear_1")):
        state[f"{dst}.mlp.{i}.weight"] = r.array(f"{src}/ffn/{ct2}/weight", 2)
        state[f"{dst}.mlp.{i}.bias"] = r.array(f"{src}/ffn/{ct2}/bias", 1)
    _norm(r, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", state)


def _check_architecture(r: _Reader, spec: str) -> None:
    if spec != SPEC_NAME:
        raise CheckpointError(f"{r.source}: spec {spec!r} is not a Whisper model (expected {SPEC_NAME!r}).")
    expected = {"decoder/pre_norm": 1, "decoder/activation": GELU, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
    for name, want in expected.items():
        got = r.scalar(name, want)
        if got != want:
            raise CheckpointError(f"{r.source}: {name} = {got}, but Whisper needs {want}; this variant is not supported.")


def whisper_state_from_ct2(model: Ct2ModelFile, source: str = "model.bin") -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    """Dimensions and an openai-whisper-named float32 state dict from a parsed CTranslate2 Whisper.

    Example:
        >>> dims, state = whisper_state_from_ct2(read_ct2_model("model_dir"))   # doctest: +SKIP
        >>> state["encoder.blocks.0.attn.query.weight"].shape                   # doctest: +SKIP
        (384, 384)
    """
    r = _Reader(model.variables, source)
    _check_architecture(r, model.spec)
    state: dict[str, np.ndarray] = {}
    for i in (1, 2):
        state[f"encoder.conv{i}.weight"] = r.array(f"encoder/conv{i}/weight", 3)
        state[f"encoder.conv{i}.bias"] = r.array(f"encoder/conv{i}/bias", 1)
    state["encoder.positional_embedding"] = r.array("encoder/position_encodings/encodings", 2)
    n_audio_layer, n_text_layer = _count_layers(r.variables, "encoder"), _count_layers(r.variables, "decoder")
    for i in range(n_audio_layer):
        _block(r, f"encoder/layer_{i}", f"encoder.blocks.{i}", state, cross=False)
    _norm(r, "encoder/layer_norm", "encoder.ln_post", state)
    embedding = r.array("decoder/embeddings/weight", 2)
    state["decoder.token_embedding.weight"] = embedding
    state["decoder.positional_embedding"] = r.array("decoder/position_encodings/encodings", 2)
    for i in range(n_text_layer):
        _block(r, f"decoder/layer_{i}", f"decoder.blocks.{i}", state, cross=True)
    _norm(r, "decoder/layer_norm", "decoder.ln", state)
    if r.has("decoder/projection/weight") and r.variables["decoder/projection/weight"] is not r.variables["decoder/embeddings/weight"]:
        if not np.allclose(r.array("decoder/projection/weight", 2), embedding, atol=1e-6):
            raise CheckpointError(f"{source}: the output projection differs from the token embedding; fxquant's "
                                  "Whisper ties them, so this checkpoint cannot load.")
    if r.has("decoder/projection/bias") and np.any(r.array("decoder/projection/bias", 1) != 0):
        raise CheckpointError(f"{source}: the output projection has a bias; Whisper has none, so this cannot load.")
    audio_state, text_state = state["encoder.conv1.weight"].shape[0], embedding.shape[1]
    dims = ModelDimensions(
        n_mels=state["encoder.conv1.weight"].shape[1], n_audio_ctx=state["encoder.positional_embedding"].shape[0],
        n_audio_state=audio_state, n_audio_head=r.scalar("encoder/num_heads", audio_state // HEAD_DIM),
        n_audio_layer=n_audio_layer, n_vocab=embedding.shape[0],
        n_text_ctx=state["decoder.positional_embedding"].shape[0], n_text_state=text_state,
        n_text_head=r.scalar("decoder/num_heads", text_state // HEAD_DIM), n_text_layer=n_text_layer)
    return dims, state


def whisper_from_state(dims: ModelDimensions, state: dict[str, np.ndarray], source: str) -> Whisper:
    """Build an fp32 eval-mode Whisper from `dims` and a numpy state dict, checking names and shapes.

    Example:
        >>> model = whisper_from_state(dims, state, "model.bin")    # doctest: +SKIP
    """
    for field in dataclasses.fields(dims):
        value = getattr(dims, field.name)
        if value <= 0:
            raise CheckpointError(f"{source}: {field.name} = {value}; the checkpoint is corrupt.")
    if dims.n_audio_state % dims.n_audio_head or dims.n_text_state % dims.n_text_head:
        raise CheckpointError(f"{source}: widths {dims.n_audio_state}/{dims.n_text_state} do not split in "
                              f"{dims.n_audio_head}/{dims.n_text_head} heads; the checkpoint is corrupt.")
    with _SkipInit():               # every tensor is replaced below: skip the random initialisation
        model = Whisper(dims)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} for a Whisper "
                              f"of {dims}; the checkpoint is not a Whisper model or is incomplete.")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape} for {dims}.")
        if not np.isfinite(state[key]).all():
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values; the checkpoint is corrupt.")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)     # adopt the arrays: no second copy
    return model.float().eval()


def load_ct2_whisper(directory: str | Path) -> Whisper:
    """Load a CTranslate2 Whisper model directory (or its model.bin) as an fp32 fxquant Whisper.

    Example:
        >>> load_ct2_whisper("faster-whisper-tiny.en").dims.n_text_layer     # doctest: +SKIP
        4
    """
    parsed = read_ct2_model(directory)
    dims, state = whisper_state_from_ct2(parsed, str(directory))
    return whisper_from_state(dims, state, str(directory))
