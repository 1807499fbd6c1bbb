"""The generated per-row int8 quantizer (codegen/kv_quant.py) vs fxquant.kv_rows.kv_int8_per_row, bit for bit:
shape sweeps (head dims off the 16-lane vector width included), strided views, special values, threads,
errors, and FusedAttention converting its constant keys / values with it."""
from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch

from fxquant.codegen import TARGETS
from fxquant.codegen.attention import attention_kernel
from fxquant.codegen.kv_quant import row_quantizer
from fxquant.codegen.threadpool import kernel_threads
from fxquant.kv_rows import kv_int8_per_row
from fxquant.ops import FusedAttention
from fxquant.qweight import quantize_activation_per_row

RUNNABLE = [t for t in ("avx512", "avx2", "portable") if TARGETS[t].runnable()]
TARGET_PARAMS = [pytest.param(t, marks=pytest.mark.skipif(t not in RUNNABLE, reason=f"host cannot run {t}"))
                 for t in ("portable", "avx2", "avx512")]
# (B, H, L, D): D below, at and around the 16-lane width, Whisper's 64, and an odd large one
SWEEP = list(itertools.product((1, 3), (1, 6), (1, 2, 17), (1, 3, 15, 16, 17, 33, 64, 80)))


def kernel_jobs() -> list:
    """Zero-argument callables that build the quantizers the tests use (tests/codegen/prebuild.py)."""
    return [partial(row_quantizer, t) for t in RUNNABLE] + \
        [partial(attention_kernel, 16, t, kv_dtype="int8") for t in ("avx512", "portable") if t in RUNNABLE]


def _special(shape, seed: int) -> torch.Tensor:
    """Random rows of very different magnitudes, plus rows that are zero, hold NaN / +-inf / -0.0 / denormals,
    sit on rounding ties after scaling, or are all negative."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 10
    flat = t.view(-1, shape[-1])
    d = shape[-1]
    specials = [
        lambda r: r.zero_(),
        lambda r: r.__setitem__(d // 2, float("nan")),
        lambda r: r.__setitem__(0, float("inf")),
        lambda r: r.__setitem__(slice(0, 2), -float("inf")),
        lambda r: r.copy_(127.5 / 127 * torch.arange(d) - 3),
        lambda r: r.copy_(-r.abs()),
        lambda r: r.fill_(-0.0),
        lambda r: r.copy_(torch.full((d,), 1e-42) * torch.arange(d)),
        lambda r: r.mul_(3e37),
    ]
    for i, f in enumerate(specials[:flat.shape[0]]):
        f(flat[i])
    return t


def _same(got, want) -> None:
    (q, s), (rq, rs) = got, want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == rq.shape and s.shape == rs.shape
    assert q.is_contiguous() and s.is_contiguous()
    assert torch.equal(q, rq)
    assert torch.equal(torch.isnan(s), torch.isnan(rs))
    assert torch.equal(s.nan_to_num(-1.0), rs.nan_to_num(-1.0))


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("shape", SWEEP)
def test_equals_the_torch_quantizer(target, shape):
    t = _special(shape, sum(shape))
    _same(row_quantizer(target)(t), kv_int8_per_row(t))
    _same(row_quantizer(target)(t), quantize_activation_per_row(t))


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("layout", ["transposed", "cross-cache slice", "every other row", "broadcast",
                                    "last stride 2"])
def test_strided_views(target, layout):
    base = _special((2, 4, 2, 6, 40, 64), 5)
    if layout == "transposed":
        t = base[:, 0, 0].transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "cross-cache slice":          # Whisper's (B, n_layer, 2, H, A, dh) cache, one layer's keys
        t = base[:, 2, 1]
    elif layout == "every other row":
        t = base[:, 1, 0, :, ::2]
    elif layout == "broadcast":
        t = base[:1, 0, 0, :1].expand(3, 5, 40, 64)
    else:
        t = torch.cat([base[:, 0, 0], base[:, 0, 1]], -1)[..., ::2]
    _same(row_quantizer(target)(t), kv_int8_per_row(t))


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_threads_split_the_rows(target):
    t = _special((4, 6, 1500, 64), 9)
    with kernel_threads(2):
        two = row_quantizer(target)(t)
    with kernel_threads(1):
        one = row_quantizer(target)(t)
    _same(two, one)
    _same(two, kv_int8_per_row(t))


def test_empty_and_bad_inputs():
    quant = row_quantizer(RUNNABLE[0])
    q, s = quant(torch.zeros(0, 6, 5, 64))
    assert q.shape == (0, 6, 5, 64) and s.shape == (0, 6, 5, 1)
    q, s = quant(torch.zeros(2, 1, 0, 8))
    assert q.shape == (2, 1, 0, 8) and s.shape == (2, 1, 0, 1)
    with pytest.raises(ValueError, match="float32"):
        quant(torch.zeros(1, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        quant(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="float32"):
        quant([[1.0]])


@pytest.mark.parametrize("target", [t for t in ("avx512", "portable") if t in RUNNABLE])
def test_fused_attention_uses_it_and_sees_new_contents(target):
    """A kv-int8 op quantizes constant keys / values with its kernel's quantizer (the same bits as the torch
    path) and converts again when the same tensor is written in place (decode scratch buffers are reused)."""
    att = FusedAttention(head_dim=16, kv_int8=True)
    att.kernel = attention_kernel(16, target, kv_dtype="int8")
    assert att.kernel.quantize_rows is row_quantizer(target)
    assert attention_kernel(16, target).quantize_rows is None        # float32 K / V: nothing to quantize
    cache = _special((2, 2, 3, 40, 16), 3)           # (B, 2, H, L, D): keys and values of one layer
    q = torch.randn(2, 3, 1, 16)
    k, v = cache[:, 0], cache[:, 1]
    out = att(q, k, v)
    assert torch.equal(att._kv_memo._slots["k"][2][0], kv_int8_per_row(k)[0])
    torch.testing.assert_close(out, att.reference(q, k, v), rtol=1e-5, atol=1e-5, equal_nan=True)
    cache.copy_(torch.randn(cache.shape))            # same tensors, new contents
    again = att(q, k, v)
    assert torch.equal(att._kv_memo._slots["k"][2][0], kv_int8_per_row(k)[0])
    torch.testing.assert_close(again, att.reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, again)


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_out_buffers_are_written_in_place(target):
    """out=(codes, scales): one window written into a slice of a batch buffer, the bits of a fresh call."""
    quant = row_quantizer(target)
    t = _special((2, 3, 17, 64), 7)
    codes, scales = torch.zeros(3, 3, 17, 64, dtype=torch.int8), torch.zeros(3, 3, 17, 1)
    got = quant(t, out=(codes[1:], scales[1:]))
    want = quant(t)
    assert got[0].data_ptr() == codes[1:].data_ptr()
    assert torch.equal(codes[1:], want[0])
    torch.testing.assert_close(scales[1:], want[1], rtol=0, atol=0, equal_nan=True)
    assert not codes[0].any()                                        # nothing outside the window written
    with pytest.raises(ValueError, match="out must be contiguous int8"):
        quant(t, out=(codes[1:].transpose(1, 2), scales[1:]))
    with pytest.raises(ValueError, match="out must be contiguous int8"):
        quant(t, out=(codes[1:], scales[1:].double()))
