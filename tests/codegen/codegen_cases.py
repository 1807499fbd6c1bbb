"""Weight formats and helpers shared by the codegen tests (symmetric, asymmetric, codebooks)."""
from __future__ import annotations

import math

import torch

from fxquant.ops import LowbitLinear
from fxquant.qweight import QuantizedWeight

# tight tolerance for the fp32 outputs: relative to the output magnitude (summation order differs)
RTOL = 1e-5


def assert_close(y: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """|y - ref| <= RTOL * (max|ref| + 1) elementwise (int accumulators exact, fp32 sums reordered)."""
    bound = RTOL * (ref.abs().max().item() + 1.0)
    err = (y - ref).abs().max().item() if y.numel() else 0.0
    assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g}"


def make_qweight(n: int, k: int, bits: int, group: int | None, fmt: str = "sym", seed: int = 0,
                 pow2_scales: bool = False) -> QuantizedWeight:
    """fmt: "sym" (one table), "asym" (one table per zero point), "row_cb" (codebook per row),
    "group_cb" (codebook per (row, group))."""
    gen = torch.Generator().manual_seed(seed)
    gs = group or k
    g = math.ceil(k / gs)
    levels = 1 << bits
    codes = torch.randint(0, levels, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    if pow2_scales:
        scales = 2.0 ** torch.randint(-2, 1, (n, g), generator=gen).float()
    else:
        scales = torch.rand(n, g, generator=gen) * 0.1 + 0.01
    if fmt == "sym":
        table = (torch.arange(levels) - levels // 2).clamp(-127, 127).to(torch.int8)[None]
        tidx = torch.zeros(n, g, dtype=torch.int32)
    elif fmt == "asym":
        zps = torch.arange(levels) if bits < 8 else torch.tensor([128])
        table = (torch.arange(levels)[None] - zps[:, None]).to(torch.int8)
        tidx = torch.randint(0, len(zps), (n, g), generator=gen, dtype=torch.int32)
    elif fmt in ("row_cb", "group_cb"):
        t = n if fmt == "row_cb" else n * g
        table = torch.randint(-127, 128, (t, levels), generator=gen, dtype=torch.int32).to(torch.int8)
        tidx = (torch.arange(n)[:, None] * (1 if fmt == "row_cb" else g) +
                (0 if fmt == "row_cb" else torch.arange(g)[None])).expand(n, g).to(torch.int32).contiguous()
    else:
        raise ValueError(fmt)
    scheme = "uniform" if fmt in ("sym", "asym") else "codebook"
    return QuantizedWeight(bits, codes, table, tidx, scales, gs, scheme, "group" if gs < k else "channel")


def make_linear(n, k, bits, group, fmt="sym", bias=True, epilogue=None, act_bits=8, seed=0,
                pow2_scales=False) -> LowbitLinear:
    qw = make_qweight(n, k, bits, group, fmt, seed, pow2_scales)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return LowbitLinear(qw, b, act_bits=act_bits, epilogue=epilogue)


def make_input(m: int, k: int, seed: int = 0, zero_rows: bool = True, big: bool = False) -> torch.Tensor:
    """Random activations with an all-zero row, a huge-magnitude row and a tiny row mixed in."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 7))
    if zero_rows and m >= 3:
        x[1] = 0
        x[2] *= 1e4
    if zero_rows and m >= 4:
        x[3] *= 1e-6
    if big:
        x *= 1e3
    return x
