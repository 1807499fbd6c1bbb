"""Offline packing of a `QuantizedWeight` into the byte streams the generated kernels read.

Two layouts:

* **avx512** (`pack_avx512`): rows in blocks of 16, each group padded to a multiple of 16 inputs.
  For each (row block, group, 16-input superblock) the 256 codes form four "quads" of 64 bytes
  (byte 4*r + i holds row r, input 4*q + i: one vpdpbusd lane per row), stored as bit planes
  (4-bit: nibble pairs, 2-bit: four crumbs per byte, 1-bit: one 64-bit mask per quad), so a
  superblock is exactly 32*bits bytes and the kernel reads one sequential stream.
  Scales are [NB, G, 16] fp32; affine multi-table formats add per-(row, group) int32 level offsets.
* **portable** (`pack_portable`): one code byte per weight, [N, G*group_size] (groups zero padded).

Both set `Packed.packed_codes`, a `fxquant.qweight.PackedCodes` over their code bytes that can
give the codes back (`unpack_avx512`): the op then keeps that one copy instead of its own.
Byte shuffling runs in numpy over small row chunks (single-threaded, so a busy machine cannot
stall it at thread barriers, and temporaries stay small).

Example:
    >>> import torch
    >>> from fxquant.qweight import PackedCodes, QuantizedWeight
    >>> qw = QuantizedWeight.uniform_symmetric(torch.randn(16, 32), bits=4, group_size=32)
    >>> pack_avx512(qw).codes.numel()   # 16 rows x 32 inputs x 4 bits / 8
    256
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fxquant.qweight import PackedCodes, QuantizedWeight

PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
LITERAL_MAX_BYTES = 4096  # level tables up to this size are inlined in the kernel source as a literal
PACK_CHUNK_ROWS = 256  # rows (un)packed per step: temporaries stay ~1 MiB per 4096 inputs


@dataclass
class TableInfo:
    """How a weight's level tables can be served: mode "shared", "affine" or "codebook".

    affine: every used table equals table[base] + a constant; `offsets` [N, G] holds that constant.
    """

    mode: str
    base: torch.Tensor            # int8 [2**bits]: the table kernels expand codes with
    offsets: torch.Tensor | None  # int32 [N, G] for mode "affine"


def analyze_tables(qw: QuantizedWeight) -> TableInfo:
    """Classify the level tables (see TableInfo)."""
    if qw.table.shape[0] == 1:
        return TableInfo("shared", qw.table[0].clone(), None)
    tab = qw.table.to(torch.int32)
    used = torch.unique(qw.table_index)
    base_row = int(used[0])
    base = tab[base_row]
    diff = tab[used] - base[None]
    if bool((diff == diff[:, :1]).all()):
        shift = torch.zeros(tab.shape[0], dtype=torch.int32)
        shift[used] = diff[:, 0]
        offs = shift[qw.table_index.long()]
        if bool((offs == 0).all()):
            return TableInfo("shared", qw.table[base_row].clone(), None)
        return TableInfo("affine", qw.table[base_row].clone(), offs.contiguous())
    return TableInfo("codebook", qw.table[base_row].clone(), None)


@dataclass
class Packed:
    """Tensors a kernel receives at call time (None = not used by this layout)."""

    codes: torch.Tensor
    scales: torch.Tensor
    aux: torch.Tensor | None = None     # avx512: int32 offsets; portable: int32 table_index
    tables: torch.Tensor | None = None  # avx512 codebook: uint8 [NB, G|1, 4, 64] biased tables
    levels: torch.Tensor | None = None  # portable: int8 level table (when too big for a C literal)
    packed_codes: PackedCodes | None = None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.codes, self.scales, self.aux, self.tables, self.levels]


def padded_group(group_size: int, multiple: int) -> int:
    return math.ceil(group_size / multiple) * multiple


def _grouped_codes(codes: np.ndarray, group_size: int, rows: int, gsp: int) -> np.ndarray:
    """codes [n, K] as uint8 [rows, G, gsp]: each group zero padded to gsp, rows padded to `rows`."""
    n, k = codes.shape
    g, full = math.ceil(k / group_size), k // group_size
    out = np.zeros((rows, g, gsp), dtype=np.uint8)
    if full:
        out[:n, :full, :group_size] = codes[:, : full * group_size].reshape(n, full, group_size)
    if k > full * group_size:
        out[:n, full, : k - full * group_size] = codes[:, full * group_size :]
    return out


def _bit_planes(q: np.ndarray, bits: int) -> np.ndarray:
    """q: uint8 [..., 4 quads, 64 bytes] codes -> uint8 [..., 32*bits] bit-plane bytes (byte arithmetic)."""
    out, shift = [], 0
    lead = q.shape[:-2]
    for width in PLANES[bits]:
        v = q if width == 8 else (q >> shift) & ((1 << width) - 1)
        if width == 8:
            out.append(v.reshape(*lead, 256))
        elif width == 4:  # quads (0,1) and (2,3) share bytes: low nibble, high nibble
            out.append((v[..., 0::2, :] | (v[..., 1::2, :] << 4)).reshape(*lead, 128))
        elif width == 2:
            out.append(v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6))
        else:  # one 64-bit little-endian mask per quad: byte j holds bits of inputs 8j .. 8j+7
            out.append(np.packbits(v, axis=-1, bitorder="little").reshape(*lead, 32))
        shift += width
    return out[0] if len(out) == 1 else np.concatenate(out, -1)


def _from_bit_planes(planes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _bit_planes: uint8 [..., 32*bits] -> uint8 [..., 4 quads, 64 bytes] codes."""
    lead = planes.shape[:-1]
    q = np.zeros((*lead, 4, 64), dtype=np.uint8)
    pos, shift = 0, 0
    for width in PLANES[bits]:
        b = planes[..., pos : pos + 32 * width]
        if width == 8:
            v = b.reshape(*lead, 4, 64)
        elif width == 4:
            b = b.reshape(*lead, 2, 1, 64)
            v = np.concatenate([b & 15, b >> 4], -2).reshape(*lead, 4, 64)
        elif width == 2:
            v = (b[..., None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
        else:
            v = np.unpackbits(b.reshape(*lead, 4, 8), axis=-1, bitorder="little")
        q |= v << shift
        pos, shift = pos + 32 * width, shift + width
    return q


def unpack_avx512(codes: torch.Tensor, shape: tuple[int, int], bits: int, group_size: int) -> torch.Tensor:
    """uint8 [N, K] codes back from pack_avx512's code stream (the reference path of an op whose only
    copy of the codes is its kernel's)."""
    n, k = shape
    g, nb, gsp = math.ceil(k / group_size), math.ceil(n / 16), padded_group(group_size, 16)
    planes = codes.numpy().reshape(nb, g, gsp // 16, 32 * bits)
    out = np.empty((n, k), dtype=np.uint8)
    step = max(1, PACK_CHUNK_ROWS // 16)
    for b0 in range(0, nb, step):
        b1 = min(b0 + step, nb)
        q = _from_bit_planes(planes[b0:b1], bits).reshape(b1 - b0, g, gsp // 16, 4, 16, 4)
        q = q.transpose(0, 4, 1, 2, 3, 5).reshape((b1 - b0) * 16, g, gsp)[:, :, :group_size]
        rows = min(b1 * 16, n) - b0 * 16
        out[b0 * 16 : b0 * 16 + rows] = q[:rows].reshape(rows, g * group_size)[:, :k]
    return torch.from_numpy(out)


def avx512_code_bytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Bytes of pack_avx512's code stream for [N, K] codes of `bits` bits in groups of `group_size`."""
    n, k = shape
    return math.ceil(n / 16) * math.ceil(k / group_size) * (padded_group(group_size, 16) // 16) * 32 * bits


def pack_avx512_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The code stream of pack_avx512 (uint8, avx512_code_bytes long) for uint8 [N, K] codes."""
    n, k = codes.shape
    g, nb = math.ceil(k / group_size), math.ceil(n / 16)
    gsp = padded_group(group_size, 16)
    out = np.empty((nb, g * (gsp // 16) * 32 * bits), dtype=np.uint8)
    src = codes.numpy()
    step = max(1, PACK_CHUNK_ROWS // 16)
    for b0 in range(0, nb, step):  # numpy (one thread, no barriers on a busy machine), in small row chunks
        b1 = min(b0 + step, nb)
        c = _grouped_codes(src[b0 * 16 : b1 * 16], group_size, (b1 - b0) * 16, gsp)
        # (nb, r, g, s, q, i) -> (nb, g, s, q, r, i): quad byte 4*r + i
        c = (
            c.reshape(b1 - b0, 16, g, gsp // 16, 4, 4)
            .transpose(0, 2, 3, 4, 1, 5)
            .reshape(b1 - b0, g, gsp // 16, 4, 64)
        )
        out[b0:b1] = _bit_planes(c, bits).reshape(b1 - b0, -1)
    return torch.from_numpy(out.reshape(-1))


def pack_avx512(qw: QuantizedWeight, info: TableInfo | None = None,
                codes: torch.Tensor | None = None) -> Packed:
    """Pack for the avx512 LUT kernels (layout in the module docstring). `codes`: the code stream when it
    is already known (codegen/pack_cache.py); qw.codes is then not read (only its shape)."""
    info = info or analyze_tables(qw)
    n, _ = qw.codes.shape
    g, nb = qw.num_groups, math.ceil(n / 16)
    want = avx512_code_bytes(qw.shape, qw.bits, qw.group_size)
    if codes is None:
        codes = pack_avx512_codes(qw.codes, qw.bits, qw.group_size)
    elif codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != want:
        raise ValueError(f"pack_avx512: a code stream of {want} uint8 bytes is needed, got "
                         f"{tuple(codes.shape)} {codes.dtype}")
    scales = torch.nn.functional.pad(qw.scales.float(), (0, 0, 0, nb * 16 - n))
    scales = scales.view(nb, 16, g).transpose(1, 2).contiguous()
    shape, bits, gs = tuple(qw.codes.shape), qw.bits, qw.group_size
    packed = Packed(
        codes,
        scales,
        packed_codes=PackedCodes(
            codes, shape, bits, "avx512", lambda data: unpack_avx512(data, shape, bits, gs)
        ),
    )
    if info.mode == "affine":
        offs = torch.nn.functional.pad(info.offsets, (0, 0, 0, nb * 16 - n))
        packed.aux = offs.view(nb, 16, g).transpose(1, 2).contiguous().to(torch.int32)
    elif info.mode == "codebook":
        packed.tables = codebook_tables(qw, nb)
    return packed


def codebook_tables(qw: QuantizedWeight, nb: int) -> torch.Tensor:
    """uint8 [NB, G or 1, 4, 64]: for vpshufb number r, lane j holds the biased table of row 4j+r."""
    if qw.bits > 4:
        raise ValueError(
            "avx512 codebook (non-affine multi-table) kernels need bits <= 4; "
            "use target='portable' for this layer"
        )
    n = qw.codes.shape[0]
    tidx = qw.table_index.long()
    if bool((tidx == tidx[:, :1]).all()):
        tidx = tidx[:, :1]
    rows = torch.nn.functional.pad(tidx, (0, 0, 0, nb * 16 - n))  # padded rows use table 0
    tab = torch.nn.functional.pad(qw.table.to(torch.int32) + 128, (0, 16 - qw.table.shape[1]))
    t = tab[rows]  # [NB*16, Gt, 16]
    t = t.view(nb, 4, 4, rows.shape[1], 16).permute(0, 3, 2, 1, 4)  # (nb, j, r, g, e) -> (nb, g, r, j, e)
    return t.reshape(nb, rows.shape[1], 4, 64).to(torch.uint8).contiguous()


def pack_portable(qw: QuantizedWeight, literal_levels: bool) -> Packed:
    """One byte per code, [N, G*group_size]; table_index only when there are several tables."""
    n, _ = qw.codes.shape
    codes = torch.from_numpy(_grouped_codes(qw.codes.numpy(), qw.group_size, n, qw.group_size).reshape(n, -1))
    aux = qw.table_index.to(torch.int32).contiguous() if qw.table.shape[0] > 1 else None
    levels = None if literal_levels else qw.table.contiguous()
    k, gs = qw.codes.shape[1], qw.group_size

    def unpack(data):
        return data.view(n, -1, gs).reshape(n, -1)[:, :k].contiguous()

    return Packed(
        codes,
        qw.scales.float().contiguous(),
        aux,
        None,
        levels,
        PackedCodes(codes, (n, k), qw.bits, "portable", unpack),
    )
