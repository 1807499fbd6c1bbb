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

Activations use dynamic per-row (per-token) symmetric int8 by default; `reference_linear` gives the
exact integer semantics the C kernels implement (int32 accumulation per group, then fp32 scaling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEMES = ("uniform", "codebook")
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
            (self.table.dim() == 2 and self.table.shape[1] == levels,
             f"table must be [T, {levels}], got {tuple(self.table.shape)}"),
            (self.group_size > 0, f"group_size must be positive, got {self.group_size}"),
            (tuple(self.scales.shape) == (n, g), f"scales must be [{n}, {g}], got {tuple(self.scales.shape)}"),
            (tuple(self.table_index.shape) == (n, g),
             f"table_index must be [{n}, {g}], got {tuple(self.table_index.shape)}"),
            (self.scheme in SCHEMES, f"scheme must be one of {SCHEMES}, got {self.scheme!r}"),
            (self.granularity in GRANULARITIES, f"granularity must be one of {GRANULARITIES}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid QuantizedWeight: {msg}")

    def nbytes(self) -> int:
        """Bytes the deployed format costs: packed codes + scales (fp32) + tables + table indices."""
        n, k = self.codes.shape
        code_bytes = math.ceil(n * k * self.bits / 8)
        index_bytes = 0 if self.table.shape[0] == 1 else self.table_index.numel() * (1 if self.table.shape[0] <= 256 else 2)
        return code_bytes + self.scales.numel() * 4 + self.table.numel() + index_bytes

    def levels(self) -> torch.Tensor:
        """int8 [N, K] integer weight levels (the values kernels expand codes into)."""
        n, k = self.codes.shape
        idx = self.table_index.long().repeat_interleave(self.group_size, dim=1)[:, :k]
        return self.table.long()[idx, self.codes.long()].to(torch.int8)

    @staticmethod
    def uniform_symmetric(weight: torch.Tensor, bits: int, group_size: int | None = None) -> "QuantizedWeight":
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
            bits=bits, codes=(q + offset).to(torch.uint8), table=table,
            table_index=torch.zeros(n, g, dtype=torch.int32), scales=scales.float(), group_size=gs,
            scheme="uniform", granularity="channel" if gs == k else "group")


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """float32 [N, K] weight the format represents."""
    k = qw.codes.shape[1]
    s = qw.scales.repeat_interleave(qw.group_size, dim=1)[:, :k]
    return qw.levels().float() * s


def quantize_activation_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row of the last dim: returns (q int8 [.., K], scale fp32 [.., 1]).

    q = round_half_even(x * (127 / absmax)), clamped to [-127, 127]; scale = absmax / 127 (1 for zero rows).
    """
    x = x.float()
    absmax = x.abs().amax(-1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    inv = torch.tensor(127.0, dtype=torch.float32) / safe
    q = torch.clamp(torch.round(x * inv), -127, 127).to(torch.int8)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return q, scale


def group_accumulators(xq: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Exact int32-range per-group dot products: [M, N, G] (int64 tensor) of xq [M, K] with levels."""
    m, k = xq.shape
    n = qw.codes.shape[0]
    g, gs = qw.num_groups, qw.group_size
    pad = g * gs - k
    xp = torch.nn.functional.pad(xq.double(), (0, pad)).view(m, g, gs)
    wp = torch.nn.functional.pad(qw.levels().double(), (0, pad)).view(n, g, gs)
    # doubles hold these sums exactly (|sum| < 2^53), and BLAS makes it fast
    return torch.einsum("mgk,ngk->mng", xp, wp).round().long()


def reference_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                     act_bits: int | None = 8) -> torch.Tensor:
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
        if (p.codes.shape[1], p.bits, p.group_size, p.scheme) != (first.codes.shape[1], first.bits,
                                                                 first.group_size, first.scheme):
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
    return QuantizedWeight(first.bits, torch.cat([p.codes for p in parts]), table, index,
                           torch.cat([p.scales for p in parts]), first.group_size, first.scheme, granularity)
