"""The packed-weight contract shared by quantization passes, the reference path and C kernels.

Every weight format (uniform or codebook, any granularity) is stored the same way: integer codes
index small int8 *level tables*, and a float scale per (output row, input group) turns levels into
weights.  Uniform b-bit levels are just one particular table, so a single LUT-expansion kernel
family serves every format.

    W_hat[n, k] = scales[n, k // group_size] * table[table_index[n, k // group_size], codes[n, k]]

Example:
    >>> import torch
    >>> qw = QuantizedWeight.uniform_symmetric(torch.randn(8, 64), bits=4, group_size=32)
    >>> dequantize(qw).shape
    torch.Size([8, 64])

Codes are stored bit-packed where they live long (`PackedCodes`, `pack_bits` / `unpack_bits`: the
little-endian bit stream artifacts use too); `QuantizedWeight.codes` is the unpacked uint8 view.

Activations use dynamic per-row (per-token) symmetric int8 by default; `reference_linear` gives the
exact integer semantics the C kernels implement (int32 accumulation per group, then fp32 scaling).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SCHEMES = ["uniform", "codebook"]   # fxquant.formats.register_format adds new formats
GRANULARITIES = ("tensor", "channel", "group")


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight matrix: codes + int8 level tables + per-group scales.

    Fields:
        bits: code width (2..8); codes lie in [0, 2**bits).
        codes: uint8 [N, K].
        table: int8 [T, 2**bits]; the integer level each code stands for, per table.
        table_index: int32 [N, G]; which table row serves each (output row, group).
        scales: float32 [N, G]; G = ceil(K / group_size).
        group_size: input elements per scale group (K for per-channel and per-tensor).
        scheme: "uniform" or "codebook"; granularity: "tensor", "channel" or "group".
    """

    bits: int
    codes: torch.Tensor
    table: torch.Tensor
    table_index: torch.Tensor
    scales: torch.Tensor
    group_size: int
    scheme: str = "uniform"
    granularity: str = "group"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        return math.ceil(self.codes.shape[1] / self.group_size)

    def validate(self) -> None:
        """Raise ValueError naming the inconsistent field."""
        n, k = self.codes.shape
        levels = 1 << self.bits
        g = math.ceil(k / self.group_size) if self.group_size > 0 else -1
        checks = [
            (2 <= self.bits <= 8, f"bits must be in 2..8, got {self.bits}"),
            (self.codes.dtype == torch.uint8, f"codes must be uint8, got {self.codes.dtype}"),
            (self.table.dtype == torch.int8, f"table must be int8, got {self.table.dtype}"),
            (
                self.table.dim() == 2 and self.table.shape[1] == levels,
                f"table must be [T, {levels}], got {tuple(self.table.shape)}",
            ),
            (self.group_size > 0, f"group_size must be positive, got {self.group_size}"),
            (
                tuple(self.scales.shape) == (n, g),
                f"scales must be [{n}, {g}], got {tuple(self.scales.shape)}",
            ),
            (
                tuple(self.table_index.shape) == (n, g),
                f"table_index must be [{n}, {g}], got {tuple(self.table_index.shape)}",
            ),
            (self.scheme in SCHEMES, f"scheme must be one of {SCHEMES}, got {self.scheme!r}"),
            (self.granularity in GRANULARITIES, f"granularity must be one of {GRANULARITIES}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid QuantizedWeight: {msg}")

    def nbytes(self) -> int:
        """Bytes the deployed format costs: packed codes + scales (fp32) + tables + table indices."""
        return format_bytes(tuple(self.codes.shape), self.bits, self.table, self.table_index, self.scales)

    def levels(self) -> torch.Tensor:
        """int8 [N, K] integer weight levels (the values kernels expand codes into).

        Uniform tables (every table is `arange(2**bits) - offset`) are an integer subtraction;
        other tables a lookup done in row chunks (bounded int64 index memory).
        """
        n, k = self.codes.shape
        g, gs = self.num_groups, self.group_size
        tab = self.table.to(torch.int16)
        if bool((tab[:, 1:] - tab[:, :-1] == 1).all()):
            first = tab[:, 0][self.table_index.long()]  # level of code 0, [N, G]
            if bool((first == first.reshape(-1)[0]).all()):
                return (self.codes.to(torch.int16) + first.reshape(-1)[0]).to(torch.int8)
            c = torch.nn.functional.pad(self.codes, (0, g * gs - k)).view(n, g, gs).to(torch.int16)
            return (c + first[..., None]).view(n, g * gs)[:, :k].to(torch.int8)
        flat, levels = self.table.reshape(-1), torch.empty(n, k, dtype=torch.int8)
        step = max(1, (1 << 20) // max(k, 1))
        for r0 in range(0, n, step):
            base = (
                self.table_index[r0 : r0 + step].long().mul(tab.shape[1]).repeat_interleave(gs, dim=1)[:, :k]
            )
            levels[r0 : r0 + step] = flat[base + self.codes[r0 : r0 + step].long()]
        return levels

    @staticmethod
    def uniform_symmetric(
        weight: torch.Tensor, bits: int, group_size: int | None = None
    ) -> "QuantizedWeight":
        """Round-to-nearest symmetric uniform quantization (levels -2^(b-1)+1 .. 2^(b-1)-1)."""
        w = weight.detach().float()
        n, k = w.shape
        gs = group_size or k
        g = math.ceil(k / gs)
        pad = g * gs - k
        wp = torch.nn.functional.pad(w, (0, pad)).view(n, g, gs)
        qmax = (1 << (bits - 1)) - 1
        scales = wp.abs().amax(-1) / qmax
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.clamp(torch.round(wp / scales[..., None]), -qmax, qmax).view(n, g * gs)[:, :k]
        offset = 1 << (bits - 1)
        table = (torch.arange(1 << bits) - offset).to(torch.int8)[None]
        return QuantizedWeight(
            bits=bits,
            codes=(q + offset).to(torch.uint8),
            table=table,
            table_index=torch.zeros(n, g, dtype=torch.int32),
            scales=scales.float(),
            group_size=gs,
            scheme="uniform",
            granularity="channel" if gs == k else "group",
        )


def format_bytes(
    shape: tuple[int, int], bits: int, table: torch.Tensor, table_index: torch.Tensor, scales: torch.Tensor
) -> int:
    """QuantizedWeight.nbytes() from the parts (no codes needed): packed codes + scales + tables + indices."""
    n, k = shape
    index_bytes = 0 if table.shape[0] == 1 else table_index.numel() * (1 if table.shape[0] <= 256 else 2)
    return math.ceil(n * k * bits / 8) + scales.numel() * 4 + table.numel() + index_bytes


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """float32 [N, K] weight the format represents."""
    n, k = qw.codes.shape
    g, gs = qw.num_groups, qw.group_size
    levels = qw.levels()
    if g * gs == k:
        return (levels.view(n, g, gs).float() * qw.scales[..., None]).view(n, k)
    return levels.float() * qw.scales.repeat_interleave(gs, dim=1)[:, :k]


def quantize_activation_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row of the last dim: returns (q int8 [.., K], scale fp32 [.., 1]).

    q = round_half_even(x * (127 / absmax)), clamped to [-127, 127]; scale = absmax / 127 (1 for zero rows,
    NaN for rows holding a NaN, so that NaN propagates as in float).
    """
    x = x.float()
    absmax = x.abs().amax(-1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    inv = torch.tensor(127.0, dtype=torch.float32) / safe
    q = torch.clamp(torch.round(x * inv), -127, 127).to(torch.int8)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    scale = torch.where(torch.isnan(absmax), absmax, scale)  # a NaN input row gives a NaN output row
    return q, scale


def group_accumulators(xq: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Exact int32-range per-group dot products: [M, N, G] (int64 tensor) of xq [M, K] with levels."""
    m, k = xq.shape
    n = qw.codes.shape[0]
    g, gs = qw.num_groups, qw.group_size
    pad = g * gs - k
    # BLAS in float32 is exact while every partial sum stays below 2^24 (|x|, |level| <= 128); else float64
    dtype = torch.float32 if gs * 128 * 128 < (1 << 24) else torch.float64
    xp = torch.nn.functional.pad(xq.to(dtype), (0, pad)).view(m, g, gs)
    wp = torch.nn.functional.pad(qw.levels().to(dtype), (0, pad)).view(n, g, gs)
    return torch.einsum("mgk,ngk->mng", xp, wp).round().long()


def reference_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, act_bits: int | None = 8
) -> torch.Tensor:
    """y = x @ W_hat^T + bias with the kernels' exact semantics.

    act_bits=8: per-row int8 activations, per-group int32 accumulation, fp32 scaling.
    act_bits=None: float activations times the dequantized weight (weight-only quantization).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    if act_bits is None:
        y = x2 @ dequantize(qw).t()
    elif act_bits == 8:
        xq, sa = quantize_activation_per_row(x2)
        acc = group_accumulators(xq, qw)  # [M, N, G]
        y = (acc.float() * qw.scales[None]).sum(-1) * sa
    else:
        raise ValueError(f"act_bits must be 8 or None, got {act_bits}")
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, qw.codes.shape[0])


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """One QuantizedWeight whose rows are the rows of `parts` in order (same K, bits, group size, scheme).

    Level tables shared by every part stay one table; otherwise the tables are stacked and each
    part's table indices shifted. Example: the q/k/v projections of one attention block become a
    single [3D, D] weight that one kernel call serves.
    """
    first = parts[0]
    for p in parts[1:]:
        if (p.codes.shape[1], p.bits, p.group_size, p.scheme) != (
            first.codes.shape[1],
            first.bits,
            first.group_size,
            first.scheme,
        ):
            raise ValueError("concat_rows needs parts with equal K, bits, group_size and scheme")
    if all(p.table.shape == first.table.shape and torch.equal(p.table, first.table) for p in parts):
        table, index = first.table, torch.cat([p.table_index for p in parts])
    else:
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + p.table.shape[0])
        table = torch.cat([p.table for p in parts])
        index = torch.cat([p.table_index + off for p, off in zip(parts, offsets)]).to(torch.int32)
    granularity = first.granularity if all(p.granularity == first.granularity for p in parts) else "channel"
    return QuantizedWeight(
        first.bits,
        torch.cat([p.codes for p in parts]),
        table,
        index,
        torch.cat([p.scales for p in parts]),
        first.group_size,
        first.scheme,
        granularity,
    )


PACK_CHUNK = 1 << 20  # codes per pack/unpack step (a multiple of 8): bounds the int64 scratch of odd widths


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes (any shape, values < 2**bits) -> uint8 [ceil(numel / 8) * bits]: a little-endian bit
    stream, code i in bits [i*b, (i+1)*b), so 8 codes fill exactly `bits` bytes.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist()
        [33, 3, 0, 0]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    if bits == 8:
        return flat.clone() if flat.data_ptr() == codes.data_ptr() else flat
    if 8 % bits == 0:
        per = 8 // bits
        g = flat.view(-1, per)
        out = g[:, 0].clone()
        for i in range(1, per):
            out |= g[:, i] << (bits * i)
        return out
    out = np.empty(flat.numel() // 8 * bits, dtype=np.uint8)
    planes = torch.arange(bits, dtype=torch.uint8)
    for c0 in range(
        0, flat.numel(), PACK_CHUNK
    ):  # odd widths: code bits in stream order, then numpy's packbits
        stream = ((flat[c0 : c0 + PACK_CHUNK, None] >> planes) & 1).numpy().reshape(-1)
        out[c0 // 8 * bits : (c0 + PACK_CHUNK) // 8 * bits] = np.packbits(stream, bitorder="little")
    return torch.from_numpy(out)


def unpack_bits(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `numel` codes of the stream, uint8 [numel]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits: bits must be in 1..8, got {bits}")
    need = -(-numel // 8) * bits
    if data.dtype != torch.uint8 or data.numel() < need:
        raise ValueError(
            f"unpack_bits: {numel} {bits}-bit codes need {need} uint8 bytes, got {data.numel()} {data.dtype}"
        )
    raw = data.reshape(-1)[:need].contiguous()
    if bits == 8:
        return raw[:numel].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        out = torch.empty(raw.numel(), per, dtype=torch.uint8)
        for i in range(per):
            torch.bitwise_and(raw >> (bits * i), mask, out=out[:, i])
        return out.view(-1)[:numel]
    out = torch.empty(raw.numel() // bits * 8, dtype=torch.uint8)
    weights = (1 << torch.arange(bits, dtype=torch.uint8)).view(1, bits)
    step = PACK_CHUNK // 8 * bits
    for b0 in range(0, raw.numel(), step):
        stream = torch.from_numpy(np.unpackbits(raw[b0 : b0 + step].numpy(), bitorder="little")).view(
            -1, bits
        )
        out[b0 // bits * 8 : (b0 + step) // bits * 8] = (stream * weights).sum(1, dtype=torch.uint8)
    return out[:numel]


class PackedCodes:
    """The b-bit codes of an [N, K] weight, held packed; `unpack()` gives uint8 [N, K] when needed.

    layout "bits" is the `pack_bits` stream of the row-major codes (what artifacts store). A kernel
    whose packed copy holds every code offers its own layout (`unpack_fn(data) -> uint8 [N, K]`), so
    an op can keep that one copy instead of two. The last unpacked tensor is remembered while anyone
    holds it, so ops sharing one PackedCodes (a tied embedding and its projection) see one tensor.

    Example:
        >>> codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
        >>> pc = PackedCodes.from_codes(codes, bits=4)
        >>> pc.nbytes, torch.equal(pc.unpack(), codes), torch.equal(pc.rows(torch.tensor([2])), codes[2:])
        (12, True, True)
    """

    def __init__(
        self,
        data: torch.Tensor,
        shape: tuple[int, int],
        bits: int,
        layout: str = "bits",
        unpack_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if layout != "bits" and unpack_fn is None:
            raise ValueError(f"PackedCodes layout {layout!r} needs its unpack function")
        self.data, self.shape, self.bits, self.layout = (
            data,
            (int(shape[0]), int(shape[1])),
            int(bits),
            layout,
        )
        self._unpack_fn = unpack_fn
        self._last: weakref.ref | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_last": None}  # the remembered tensor is a cache, not state

    @classmethod
    def from_codes(cls, codes: torch.Tensor, bits: int) -> "PackedCodes":
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(f"PackedCodes needs uint8 [N, K] codes, got {codes.dtype} {tuple(codes.shape)}")
        packed = cls(pack_bits(codes, bits), tuple(codes.shape), bits)
        packed._last = weakref.ref(codes)  # while the caller keeps its codes (a compile does), no unpacking
        return packed

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def unpack(self) -> torch.Tensor:
        """uint8 [N, K] codes (the same tensor as the previous call while that one is still alive)."""
        last = self._last() if self._last is not None else None
        if last is not None:
            return last
        if self.layout == "bits":
            codes = unpack_bits(self.data, self.bits, self.shape[0] * self.shape[1]).view(self.shape)
        else:
            codes = self._unpack_fn(self.data)
        self._last = weakref.ref(codes)
        return codes

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Codes of the rows in `index` (any shape): uint8 [*index.shape, K], unpacking only those rows."""
        n, k = self.shape
        if self.layout != "bits" or (k * self.bits) % 8 or k % 8:
            return self.unpack()[index]
        row_bytes = k * self.bits // 8
        picked = self.data[: n * row_bytes].view(n, row_bytes)[index.reshape(-1)]
        return unpack_bits(picked, self.bits, picked.shape[0] * k).view(*index.shape, k)
