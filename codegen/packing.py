"""Offline packing of a `QuantizedWeight` into the byte streams the generated kernels read.

Two layouts:

* **avx512** (`pack_avx512`): rows in blocks of 16, each group padded to a multiple of 16 inputs.
  For each (row block, group, 16-input superblock) the 256 codes form four "quads" of 64 bytes
  (byte 4*r + i holds row r, input 4*q + i: one vpdpbusd lane per row), stored as bit planes
  (4-bit: nibble pairs, 2-bit: four crumbs per byte, 1-bit: one 64-bit mask per quad), so a
  superblock is exactly 32*bits bytes and the kernel reads one sequential stream.
  Scales are [NB, G, 16] fp32; affine multi-table formats add per-(row, group) int32 level offsets.
* **portable** (`pack_portable`): one code byte per weight, [N, G*group_size] (groups zero padded).

Example:
    >>> import torch
    >>> from fxquant.qweight import QuantizedWeight
    >>> qw = QuantizedWeight.uniform_symmetric(torch.randn(16, 32), bits=4, group_size=32)
    >>> pack_avx512(qw).codes.numel()   # 16 rows x 32 inputs x 4 bits / 8
    256
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxquant.qweight import QuantizedWeight

PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


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

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.codes, self.scales, self.aux, self.tables, self.levels]


def padded_group(group_size: int, multiple: int) -> int:
    return math.ceil(group_size / multiple) * multiple


def _grouped_codes(qw: QuantizedWeight, rows: int, gsp: int) -> torch.Tensor:
    """codes as uint8 [rows, G, gsp]: each group zero padded to gsp, rows padded to `rows`."""
    n, k = qw.codes.shape
    g, gs = qw.num_groups, qw.group_size
    c = torch.nn.functional.pad(qw.codes, (0, g * gs - k)).view(n, g, gs)
    c = torch.nn.functional.pad(c, (0, gsp - gs))
    return torch.nn.functional.pad(c, (0, 0, 0, 0, 0, rows - n))


def _bit_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: int32 [..., 4 quads, 64 bytes] codes -> uint8 [..., 32*bits] bit-plane bytes."""
    out, shift = [], 0
    for width in PLANES[bits]:
        v = (q >> shift) & ((1 << width) - 1)
        if width == 8:
            out.append(v.flatten(-2))
        elif width == 4:  # quads (0,1) and (2,3) share bytes: low nibble, high nibble
            out.append((v[..., 0::2, :] | (v[..., 1::2, :] << 4)).flatten(-2))
        elif width == 2:
            out.append(v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6))
        else:  # one 64-bit little-endian mask per quad
            b = v.reshape(*v.shape[:-1], 8, 8) << torch.arange(8, dtype=torch.int32)
            out.append(b.sum(-1).flatten(-2))
        shift += width
    return torch.cat(out, -1).to(torch.uint8)


def pack_avx512(qw: QuantizedWeight, info: TableInfo | None = None) -> Packed:
    """Pack for the avx512 LUT kernels (layout in the module docstring)."""
    info = info or analyze_tables(qw)
    n, _ = qw.codes.shape
    g, nb = qw.num_groups, math.ceil(n / 16)
    gsp = padded_group(qw.group_size, 16)
    c = _grouped_codes(qw, nb * 16, gsp).to(torch.int32)
    # (nb, r, g, s, q, i) -> (nb, g, s, q, r, i): quad byte 4*r + i
    c = c.view(nb, 16, g, gsp // 16, 4, 4).permute(0, 2, 3, 4, 1, 5).reshape(nb, g, gsp // 16, 4, 64)
    codes = _bit_planes(c, qw.bits).contiguous().view(-1)
    scales = torch.nn.functional.pad(qw.scales.float(), (0, 0, 0, nb * 16 - n))
    scales = scales.view(nb, 16, g).transpose(1, 2).contiguous()
    packed = Packed(codes, scales)
    if info.mode == "affine":
        offs = torch.nn.functional.pad(info.offsets, (0, 0, 0, nb * 16 - n))
        packed.aux = offs.view(nb, 16, g).transpose(1, 2).contiguous().to(torch.int32)
    elif info.mode == "codebook":
        packed.tables = codebook_tables(qw, nb)
    return packed


def codebook_tables(qw: QuantizedWeight, nb: int) -> torch.Tensor:
    """uint8 [NB, G or 1, 4, 64]: for vpshufb number r, lane j holds the biased table of row 4j+r."""
    if qw.bits > 4:
        raise ValueError("avx512 codebook (non-affine multi-table) kernels need bits <= 4; "
                         "use target='portable' for this layer")
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
    codes = _grouped_codes(qw, n, qw.group_size).reshape(n, -1).contiguous()
    aux = qw.table_index.to(torch.int32).contiguous() if qw.table.shape[0] > 1 else None
    levels = None if literal_levels else qw.table.contiguous()
    return Packed(codes, qw.scales.float().contiguous(), aux, None, levels)
