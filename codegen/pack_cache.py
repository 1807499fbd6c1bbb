"""A disk cache of the avx512 kernels' packed code streams, so that loading an artifact does not repack.

An artifact stores each op's codes bit-packed row by row (`fxquant.qweight.pack_bits`); the avx512 LUT
kernels read another layout (codegen/packing.py: 16-row blocks, superblocks, bit planes). Building it means
unpacking every code to a byte and repacking: about half of the kernel set-up time when a Whisper artifact
is loaded (0.19 s of CPU for tiny.en). This cache keeps each stream under the sha256 of what it was made
from (layout version, shape, bits, group size and the bit-packed codes), in FXQUANT_CACHE_DIR/packed/, as the
build cache keeps compiled kernels beside it. A file holds the sha256 of its payload and the payload; one
whose size or checksum is off (truncated, replaced) is ignored and rewritten. Writes are atomic.
FXQUANT_PACK_CACHE=0 turns the cache off (every stream packed from the codes).

Example:
    >>> stream = cached_codes(op.packed_codes, op.group_size, build)   # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

from fxquant.qweight import PackedCodes

from .build import atomic_write, cache_dir
from .packing import avx512_code_bytes

__all__ = ["cached_codes", "cache_key"]

LAYOUT = b"fxquant-avx512-codes/1"   # change when pack_avx512's code layout changes
_DIGEST = 32
ENABLED = os.environ.get("FXQUANT_PACK_CACHE", "1") != "0"


def cache_key(codes: PackedCodes, group_size: int) -> str | None:
    """sha256 over the layout version, shape, bits, group size and bit-packed codes; None for codes held in
    another layout (a kernel's own copy)."""
    if codes.layout != "bits":
        return None
    h = hashlib.sha256(LAYOUT)
    h.update(repr((tuple(codes.shape), codes.bits, group_size)).encode())
    data = codes.data.contiguous()
    h.update(memoryview(data.numpy()))
    return h.hexdigest()


def _path(key: str, cache: str | None) -> Path:
    return Path(cache_dir(cache)) / "packed" / f"{key}.bin"


def _read(path: Path, size: int) -> torch.Tensor | None:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    if len(blob) != _DIGEST + size or hashlib.sha256(blob[_DIGEST:]).digest() != blob[:_DIGEST]:
        return None
    return torch.frombuffer(bytearray(blob[_DIGEST:]), dtype=torch.uint8)


def cached_codes(codes: PackedCodes, group_size: int, build: Callable[[], torch.Tensor],
                 cache: str | None = None) -> torch.Tensor:
    """The avx512 code stream of `codes`: from the cache, else `build()` (then stored)."""
    size = avx512_code_bytes(tuple(codes.shape), codes.bits, group_size)
    key = cache_key(codes, group_size) if ENABLED else None
    if key is None:
        return build()
    path = _path(key, cache)
    hit = _read(path, size)
    if hit is not None:
        return hit
    stream = build()
    if stream.dtype == torch.uint8 and stream.numel() == size:
        payload = stream.contiguous().numpy().tobytes()
        try:
            atomic_write(path, hashlib.sha256(payload).digest() + payload)
        except OSError:
            pass                       # a read-only cache: build every time
    return stream
