"""The bf16 prefill (flash) attention path vs torch SDPA: shape sweep, strided views, threads, dispatch.

Tolerances come from the kernel's rounding: q * scale, k, v and the softmax weights p are rounded to bf16
(round to nearest even: relative error <= 2^-9 each) and everything else is fp32. So
- against SDPA in float64 on the *same* bf16-rounded q * scale, k, v, only p's rounding (and the fp32 exp /
  sums) remain: |err| <= 2^-8 * max|v| (2^-9 from p's rounding, as much again from the sum l being taken
  before that rounding, so the weights need not sum to exactly 1);
- against fp32 SDPA, a score s = q.k * scale moves by at most ds = 2^-8 * scale * sum_d |q_d k_d| (q and k
  both rounded), a weight by a factor within exp(+-2 ds) after normalisation, and v by 2^-9 of itself:
  |err| <= max|v| * (exp(2 ds) - 1 + 2^-8 + 2^-9).
"""
from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fxquant.codegen import TARGETS
from fxquant.codegen.attention import PREFILL_MIN_ROWS, attention_kernel
from fxquant.ops import FusedAttention

HAVE = TARGETS["avx512"].runnable() and attention_kernel(64, "avx512").has_prefill
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not HAVE, reason="host has no AVX512-BF16 (the prefill path needs vdpbf16ps)")]
U = 2.0 ** -9  # bf16 unit roundoff
# (B, H, Lq, Lk): tile edges (16-key blocks, 128-key tiles, 48-row query blocks at D = 64), Lk = 1, odd lengths
SWEEP = [(1, 1, 32, 1), (1, 2, 33, 5), (2, 1, 47, 16), (1, 1, 48, 17), (2, 3, 49, 127), (1, 2, 97, 128),
         (1, 1, 100, 129), (2, 2, 37, 255), (1, 6, 1500, 1500), (2, 6, 1500, 1500), (1, 1, 40, 1501),
         (1, 3, 448, 33)]


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def bounds(q, k, v, scale) -> tuple[float, float, float]:
    """(bound vs the bf16-input float64 reference, bound vs fp32 SDPA, max|v|) for these operands."""
    vmax = v.abs().max().item()
    ds = 2 * U * scale * (q.abs().double() @ k.abs().double().transpose(-1, -2)).max().item()
    return 2 * U * vmax, vmax * (math.expm1(2 * ds) + 3 * U), vmax


def check(kern, q, k, v, scale=None, what=""):
    """Run the kernel on q, k, v and assert both bounds; returns (err vs fp32, bound vs fp32)."""
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = kern(q, k, v, None, scale)
    ref32 = F.scaled_dot_product_attention(q, k, v, scale=s)
    ref16 = F.scaled_dot_product_attention(bf16(q * s), bf16(k), bf16(v), scale=1.0)
    tight, loose, _ = bounds(q, k, v, s)
    assert out.shape == ref32.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), what
    err16, err32 = (out.double() - ref16).abs().max().item(), (out - ref32).abs().max().item()
    assert err16 <= tight, f"{what}: {err16:.3g} > {tight:.3g} vs the bf16-input reference"
    assert err32 <= loose, f"{what}: {err32:.3g} > {loose:.3g} vs fp32 SDPA"
    return err32, loose


def kernel_jobs() -> list:
    """Zero-argument callables that build the kernels the tests below add to test_attention's (prebuild.py)."""
    if not HAVE:
        return []
    return [partial(attention_kernel, d, "avx512") for d in (16, 80, 128)] + [
        partial(attention_kernel, 64, "avx512", prefill_split=s) for s in (1, 2)
    ]


def operands(b, h, lq, lk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g),
            torch.randn(b, h, lk, d, generator=g))


@pytest.mark.parametrize("d", (64, 16, 80, 128))
def test_shape_sweep(d):
    kern = attention_kernel(d, "avx512")
    assert kern.has_prefill
    for i, (b, h, lq, lk) in enumerate(SWEEP if d == 64 else SWEEP[:8]):
        q, k, v = operands(b, h, lq, lk, d, seed=i)
        check(kern, q, k, v, what=f"D={d} {(b, h, lq, lk)}")


def test_whisper_layout_and_typical_error():
    """q / k / v as the encoder passes them: [B, T, H*D] viewed as [B, H, T, D] (strided); B = 2 rows differ.
    On random operands the error is far below the bound (about 2^-9 * max|v|)."""
    kern = attention_kernel(64, "avx512")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1500, 3 * 384, generator=g)
    q, k, v = (x[..., i * 384:(i + 1) * 384].view(2, 1500, 6, 64).transpose(1, 2) for i in range(3))
    assert q.stride() == (1500 * 1152, 64, 1152, 1)
    err, bound = check(kern, q, k, v, what="whisper views")
    assert err < 2e-3 and bound > 5 * err
    out = kern(q, k, v)
    assert torch.equal(out[1:], kern(q[1:], k[1:], v[1:]))  # batch rows are independent
    assert out.transpose(1, 2).is_contiguous()               # [B, Lq, H, D] underneath: merging heads is free


def test_peaked_scores_and_custom_scale():
    """Large scores (one key dominates a row) and an explicit scale: the online softmax rescaling at work."""
    kern = attention_kernel(64, "avx512")
    q, k, v = operands(1, 2, 200, 700, 64, seed=3)
    k[:, :, 650] = q[:, :, 0] * 3  # row 0 attends almost only to key 650, in the last tile
    check(kern, q, k, v, scale=0.05, what="scale 0.05")
    check(kern, q, k * 0.2, v, scale=1.0, what="scale 1")
    out = kern(q, k, v)
    assert (out[0, :, 0] - v[0, :, 650]).abs().max() < 4 * U * v.abs().max()


def test_threads_give_identical_results():
    """Each query block is computed by one thread from the same packed K / V: bit-identical at 1 and 2 threads."""
    kern = attention_kernel(64, "avx512")
    q, k, v = operands(2, 6, 300, 500, 64, seed=5)
    one = kern(q, k, v)
    torch.set_num_threads(2)
    assert torch.equal(kern(q, k, v), one)


def test_dispatch():
    """Few query rows or a mask keep the exact fp32 path; portable / int8 kernels have no prefill path."""
    kern = attention_kernel(64, "avx512")
    q, k, v = operands(1, 2, PREFILL_MIN_ROWS, 300, 64, seed=9)
    exact = F.scaled_dot_product_attention(q, k, v)
    assert (kern(q, k, v) - exact).abs().max() > 1e-5                      # bf16 prefill
    assert (kern(q, k, v, torch.zeros(PREFILL_MIN_ROWS, 300)) - exact).abs().max() < 1e-5  # masked: fp32 path
    assert (kern(q[:, :, :-1], k, v) - exact[:, :, :-1]).abs().max() < 1e-5            # too few rows: fp32 path
    assert not attention_kernel(64, "portable").has_prefill
    assert not attention_kernel(64, "avx512", kv_dtype="int8").has_prefill
    assert not attention_kernel(8, "avx512").has_prefill                    # head dim not a multiple of 16


def test_fused_attention_op_uses_prefill_when_allowed():
    """FusedAttention serves a 1500-row call with the kernel when its max_query_rows allows it (as
    lower-attention sets for unmasked encoder calls), else torch SDPA."""
    q, k, v = operands(1, 6, 1500, 1500, 64, seed=11)
    exact = F.scaled_dot_product_attention(q, k, v)
    op = FusedAttention(64, max_query_rows=1 << 16)
    op.kernel = attention_kernel(64, "avx512")
    err = (op(q, k, v) - exact).abs().max().item()
    assert 0 < err < 4 * U * v.abs().max()
    op.max_query_rows = 16
    assert torch.equal(op(q, k, v), exact)


@pytest.mark.parametrize("lq,lk", list(itertools.product((32, 95), (2, 64, 65))))
def test_small_lengths(lq, lk):
    check(attention_kernel(64, "avx512"), *operands(1, 1, lq, lk, 64, seed=lq * lk), what=f"{lq}x{lk}")


def test_split_scores_are_more_exact():
    """prefill_split=2 (q and k as bf16 hi + lo, three products) leaves only p / v rounding: on peaked scores
    (x4 operands) its error is several times below the default's, and well inside the tight bound."""
    q, k, v = operands(1, 2, 300, 700, 64, seed=13)
    q, k = q * 2, k * 2
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    errs = {}
    for split in (0, 1, 2):
        kern = attention_kernel(64, "avx512", prefill_split=split)
        errs[split] = (kern(q, k, v).double() - exact).abs().max().item()
    assert errs[2] < errs[1] < errs[0] and errs[2] < errs[0] / 2
    assert errs[2] <= 2 * U * v.abs().max().item()
    with pytest.raises(ValueError, match="prefill_split"):
        attention_kernel(64, "avx512", prefill_split=3)
