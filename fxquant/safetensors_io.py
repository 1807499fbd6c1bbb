"""Validated reading (and writing, for tests and tools) of .safetensors files, with numpy only.

Layout: u64 little-endian header length N | N bytes of JSON header | raw byte buffer. The header maps
each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the buffer), plus an
optional "__metadata__" dict of strings. The file is untrusted: the header size is capped, every dtype
comes from an allowlist, every byte range must match its shape and lie inside the file, and ranges may
neither overlap nor leave holes (as the format requires). Nothing is executed or unpickled.

Example:
    >>> write_safetensors("/tmp/t.safetensors", {"w": np.ones((2, 3), np.float32)})   # doctest: +SKIP
    >>> read_safetensors("/tmp/t.safetensors")["w"].shape                                # doctest: +SKIP
    (2, 3)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fxquant.errors import CheckpointError

__all__ = ["read_safetensors", "write_safetensors", "SAFETENSORS_DTYPES"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
# "BF16" has no numpy dtype: it is read as uint16 and widened to float32
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}


def _entry(path: Path, name: str, info, data_size: int) -> tuple[np.dtype, tuple[int, ...], int, int, str]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: header entry {name!r} needs exactly dtype, shape and data_offsets.")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {code!r}; supported: {sorted(SAFETENSORS_DTYPES)}."
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {shape!r}; expected a list of non-negative ints."
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {offsets!r} outside the {data_size}-byte "
            "buffer; the file is truncated or corrupt."
        )
    dtype = SAFETENSORS_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {code} needs {expected} bytes, "
            f"its data_offsets span {offsets[1] - offsets[0]}; the file is corrupt."
        )
    return dtype, tuple(shape), offsets[0], offsets[1], code


def read_safetensors(path: str | os.PathLike, *, widen: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file as numpy arrays (read-only views of a memory map).

    With `widen` (default), BF16 becomes float32 (a copy); otherwise it stays raw uint16.

    Example:
        >>> read_safetensors("model.safetensors")["model.encoder.conv1.weight"].dtype    # doctest: +SKIP
        dtype('float32')
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file.")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(
            f"{path} has {size} bytes; a safetensors file starts with an 8-byte header length."
        )
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    header_len = int.from_bytes(buffer[:8].tobytes(), "little")
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{path}: header length {header_len} exceeds the file ({size} bytes) or the "
            f"{MAX_HEADER_BYTES}-byte cap; the file is truncated or not safetensors."
        )
    try:
        header = json.loads(buffer[8 : 8 + header_len].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: the header is not UTF-8 JSON ({exc}); the file is corrupt or not safetensors."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a JSON {type(header).__name__}, expected an object.")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    entries = {name: _entry(path, name, info, data_size) for name, info in header.items()}
    position = 0
    for name, (_, _, begin, end, _) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at byte {begin}, expected {position} (overlap or "
                "hole in the buffer); the file is corrupt."
            )
        position = end
    if position != data_size:
        raise CheckpointError(
            f"{path}: the tensors cover {position} of {data_size} buffer bytes; the file is corrupt."
        )
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin, end, code) in entries.items():
        array = buffer[data_start + begin : data_start + end].view(dtype).reshape(shape)
        if code == "BF16" and widen:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write numpy arrays as a .safetensors file (little-endian, 8-byte aligned header).

    Example:
        >>> tensors = {"b": np.zeros(4, np.float16)}
        >>> write_safetensors("t.safetensors", tensors, {"format": "pt"})   # doctest: +SKIP
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        if dtype not in _NAMES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {value.dtype}; writable: {sorted(set(_NAMES.values()))}."
            )
        value = value.astype(dtype, copy=False)
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        arrays.append(value)
        offset += value.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for value in arrays:
            f.write(value.tobytes())
