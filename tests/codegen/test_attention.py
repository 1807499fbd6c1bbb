"""The generated attention kernel vs torch SDPA: shapes, masks, strided views, masked-row skipping, errors.

Most tests run for float32 and for int8 key / value (kv="int8": the kernel gets quantize_activation_per_row
copies and is compared with SDPA over the dequantized key_q * key_scale, value_q * value_scale)."""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fxquant.codegen import TARGETS, Target, UnsupportedOp
from fxquant.codegen.attention import AttentionKernel, attention_kernel
from fxquant.qweight import quantize_activation_per_row

RUNNABLE = [t for t in ("avx512", "avx2", "portable") if TARGETS[t].runnable()]
TARGET_PARAMS = [pytest.param("portable"),
                 pytest.param("avx512", marks=pytest.mark.skipif("avx512" not in RUNNABLE,
                                                                 reason="host cannot run avx512 kernels"))]
DIMS = (8, 64, 80)
KV = ("float32", "int8")
NEG = float("-inf")
# (B, H, Lq, Lk): every combination of the sweep values
SWEEP = list(itertools.product((1, 2), (1, 6), (1, 2, 4, 17), (1, 5, 448, 1500)))
pytestmark = pytest.mark.usefixtures("one_thread")  # test_parallel_split sets 2 threads itself


def kernel_jobs() -> list:
    """Zero-argument callables that build every kernel the tests below use (tests/codegen/prebuild.py runs them
    in the background): portable and avx512 at every head dim, avx2 at 40 (test_avx2)."""
    jobs = [(d, t, kv) for t in ("portable", "avx512") if t in RUNNABLE for d in (*DIMS, 40) for kv in KV]
    jobs += [(40, "avx2", kv) for kv in KV if "avx2" in RUNNABLE]
    return [partial(attention_kernel, d, t, kv_dtype=kv) for d, t, kv in jobs]


def sdpa(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def kv_operands(kern: AttentionKernel, k, v) -> tuple[tuple, tuple]:
    """((key, value, scale kwargs) for the kernel, (key, value) for the reference): float32 k / v as they
    are; for an int8 kernel their per-row int8 copies, and the dequantized values for the reference."""
    if kern.kv_dtype == "float32":
        return (k, v, {}), (k, v)
    (kq, ks), (vq, vs) = quantize_activation_per_row(k), quantize_activation_per_row(v)
    return (kq, vq, {"key_scale": ks, "value_scale": vs}), (kq.float() * ks, vq.float() * vs)


def run(kern: AttentionKernel, q, k, v, mask=None, scale=None, kv=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, SDPA reference) for float32 k / v (kv: their kv_operands, when already made)."""
    (key, value, scales), (ref_k, ref_v) = kv or kv_operands(kern, k, v)
    return kern(q, key, value, mask, scale, **scales), sdpa(q, ref_k, ref_v, mask, scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str = "", rtol: float = 1e-5) -> None:
    """|out - ref| <= rtol * max|ref| everywhere (and the same shape)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == torch.float32
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    bound = rtol * ref.abs().max().item() if ref.numel() else 0.0
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g}"


POOL = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))  # N(0, 1) samples drawn once (randn is slow)


def qkv(b, h, lq, lk, d, seed=0):
    """q [B, H, Lq, D], k and v [B, H, Lk, D]: fresh copies of consecutive POOL samples at a seeded offset."""
    sizes = (b * h * lq * d, b * h * lk * d, b * h * lk * d)
    start = seed * 104729 % (POOL.numel() - sum(sizes))
    q, k, v = POOL[start:start + sum(sizes)].clone().split(sizes)
    return q.view(b, h, lq, d), k.view(b, h, lk, d), v.view(b, h, lk, d)


def decode_mask(lq: int, lk: int, offset: int) -> torch.Tensor:
    """[Lq, Lk] additive mask of a decode cache: row i sees the first offset + i slots, -inf beyond."""
    allowed = torch.arange(lk)[None] < (offset + torch.arange(lq))[:, None]
    return torch.zeros(lq, lk).masked_fill_(~allowed, NEG)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_sweep_unmasked_and_decode_mask(target, d, kv):
    kern = attention_kernel(d, target, kv_dtype=kv)
    for b, h, lq, lk in SWEEP:
        q, k, v = qkv(b, h, lq, lk, d, seed=lk + lq)
        kv = kv_operands(kern, k, v)
        assert_close(*run(kern, q, k, v, kv=kv), f"{kern.name} {(b, h, lq, lk)} no mask")
        mask = decode_mask(lq, lk, max(1, lk // 3))
        assert_close(*run(kern, q, k, v, mask, kv=kv), f"{kern.name} {(b, h, lq, lk)} decode mask")


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("d", (64, 40))
def test_mask_kinds(target, d, kv):
    kern = attention_kernel(d, target, kv_dtype=kv)
    b, h, lq, lk = 2, 3, 5, 37
    q, k, v = qkv(b, h, lq, lk, d)
    causal = torch.full((lq, lk), NEG).triu_(lk - lq + 1)
    per_head = torch.randn(b, h, lq, lk).masked_fill_(torch.rand(b, h, lq, lk) < 0.5, NEG)
    per_head[..., 0] = 0.0  # every row keeps one key
    keep = torch.rand(lq, lk) < 0.7
    keep[:, 0] = True
    masks = {"causal": causal, "per-head 4-D": per_head, "bool 2-D": keep, "bool 4-D": per_head > NEG,
             "3-D [H, Lq, Lk]": per_head[0], "[B, 1, 1, Lk]": per_head[:, :1, :1], "[Lq, 1] column": torch.randn(lq, 1),
             "transposed": causal.t().contiguous().t(), "finite random": torch.randn(lq, lk) * 3}
    for what, mask in masks.items():
        assert_close(*run(kern, q, k, v, mask), f"{kern.name} {what}")
    assert_close(*run(kern, q, k, v, causal, scale=0.3), "custom scale")
    assert_close(*run(kern, q, k, v, scale=2.0), "custom scale, no mask")


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_fully_masked_rows_match_torch(target, kv):
    """Rows with every entry -inf (float) or False (bool): torch gives zeros there, and so do we."""
    kern = attention_kernel(8, target, kv_dtype=kv)
    q, k, v = qkv(1, 2, 3, 6, 8)
    mask = torch.zeros(3, 6)
    mask[1] = NEG
    for m in (mask, mask == 0):
        out, ref = run(kern, q, k, v, m)
        assert torch.equal(ref[:, :, 1], torch.zeros(1, 2, 8))  # this torch's behaviour
        assert torch.equal(out[:, :, 1], ref[:, :, 1])
        assert_close(out, ref, "fully masked row")
    assert torch.equal(*run(kern, q, k, v, torch.full((3, 6), NEG)))
    empty_k = torch.zeros(1, 2, 0, 8)
    assert torch.equal(*run(kern, q, empty_k, empty_k))  # Lk = 0: zeros
    assert run(kern, torch.zeros(0, 2, 3, 8), torch.zeros(0, 2, 4, 8), torch.zeros(0, 2, 4, 8))[0].shape == (0, 2, 3, 8)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_large_scores_are_stable(target, kv):
    """Scores of +-hundreds and a +1000 mask shift (exp would overflow without the running max)."""
    kern = attention_kernel(64, target, kv_dtype=kv)
    q, k, v = qkv(1, 6, 4, 448, 64)
    q = q * 30.0
    mask = decode_mask(4, 448, 100) + 1000.0
    out, ref = run(kern, q, k, v, mask)
    assert torch.isfinite(out).all()
    # scores ~ +-100 turn fp32 rounding differences of q.k (~1e-5 absolute) into ~1e-5 relative in p
    assert_close(out, ref, "large scores", rtol=1e-4)
    assert_close(*run(kern, q, k, v), "large scores, no mask", rtol=1e-4)


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_strided_views(target):
    """q = x.view(B, Lq, H, D).transpose(1, 2), key/value selected from a 6-D cache, expanded batch, and
    a non-unit last stride (copied in Python); the output's merged-heads reshape is a free view."""
    kern = attention_kernel(64, target)
    b, h, lq, lmax, lk, d = 2, 6, 3, 448, 100, 64
    x = torch.randn(b, lq, h * d)
    q = x.view(b, lq, h, d).transpose(1, 2)
    cache = torch.randn(4, 2, b, lmax, h, d)  # [layer, k/v, B, slot, H, D]
    key, value = cache[1, 0].transpose(1, 2), cache[1, 1].transpose(1, 2)  # [B, H, 448, D] views
    mask = decode_mask(lq, lmax, 50)
    out = kern(q, key, value, mask)
    assert_close(out, sdpa(q, key, value, mask), "cache select")
    key_n, value_n = key[:, :, :lk], value[:, :, :lk]
    assert_close(kern(q, key_n, value_n), sdpa(q, key_n, value_n), "narrowed cache")
    cache_bh = torch.randn(2, 2, 1, h, lmax, d)  # [layer, k/v, 1, H, slot, D], batch expanded (stride 0)
    ke, ve = cache_bh[0, 0].expand(b, -1, -1, -1), cache_bh[0, 1].expand(b, -1, -1, -1)
    assert ke.stride(0) == 0
    assert_close(kern(q, ke, ve, mask), sdpa(q, ke, ve, mask), "expanded batch")
    kh = cache_bh[1, 0, :, :1].expand(b, h, -1, -1)  # one head broadcast over H (stride 0 on H)
    assert_close(kern(q, kh, kh), sdpa(q, kh, kh), "expanded heads")
    qt = torch.randn(b, h, d, lq).transpose(2, 3)  # last stride != 1
    assert_close(kern(qt, key, value, mask), sdpa(qt, key, value, mask), "non-unit last stride")
    merged = out.transpose(1, 2).reshape(b, lq, h * d)
    assert merged.data_ptr() == out.data_ptr() and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_int8_strided_views(target):
    """int8 key / value and their scales selected from 6-D caches ([layer, k/v, B, slot, H, D] and
    [layer, k/v, B, H, slot, 1], and a scale cache laid out like the levels: strided scale rows), expanded
    batch / heads (stride 0) and transposed per-row scales; one kernel per layout, each vs SDPA."""
    kern = attention_kernel(64, target, kv_dtype="int8")
    b, h, lq, lmax, d = 2, 6, 3, 448, 64
    q = torch.randn(b, lq, h * d).view(b, lq, h, d).transpose(1, 2)
    levels, scales = quantize_activation_per_row(torch.randn(4, 2, b, lmax, h, d))  # scales [4, 2, B, slot, H, 1]
    kq, vq = levels[1, 0].transpose(1, 2), levels[1, 1].transpose(1, 2)  # [B, H, 448, D] views
    ks_strided, vs_strided = scales[1, 0].transpose(1, 2), scales[1, 1].transpose(1, 2)  # slot stride H
    assert ks_strided.stride(2) == h and kq.stride(2) == h * d
    ks, vs = ks_strided.contiguous(), vs_strided.contiguous()  # the common layout
    mask = decode_mask(lq, lmax, 50)
    for what, (k_s, v_s), m in (("contiguous scales", (ks, vs), None), ("contiguous scales, mask", (ks, vs), mask),
                                ("strided scales", (ks_strided, vs_strided), None),
                                ("strided scales, mask", (ks_strided, vs_strided), mask)):
        ref = sdpa(q, kq.float() * k_s, vq.float() * v_s, m)
        assert_close(kern(q, kq, vq, m, key_scale=k_s, value_scale=v_s), ref, what)
    ke, kse = kq[:1].expand(b, -1, -1, -1), ks[:1].expand(b, -1, -1, -1)  # batch broadcast (stride 0)
    kh, ksh = kq[:, :1].expand(-1, h, -1, -1), ks_strided[:, :1].expand(-1, h, -1, -1)  # one head over H
    assert ke.stride(0) == kse.stride(0) == kh.stride(1) == ksh.stride(1) == 0
    for what, (k_, ks_, m) in {"expanded batch": (ke, kse, mask), "expanded heads": (kh, ksh, None)}.items():
        ref = sdpa(q, k_.float() * ks_, vq.float() * vs, m)
        assert_close(kern(q, k_, vq, m, key_scale=ks_, value_scale=vs), ref, what)
    qt = torch.randn(b, h, d, lq).transpose(2, 3)  # q with a non-unit last stride
    assert_close(kern(qt, kq, vq, mask, key_scale=ks, value_scale=vs),
                 sdpa(qt, kq.float() * ks, vq.float() * vs, mask), "non-unit last stride of q")


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_masked_rows_are_never_read(target, kv):
    """K / V rows under -inf are NaN (int8: garbage levels with NaN scales): the output stays finite and
    equals attention over the allowed rows."""
    kern = attention_kernel(64, target, kv_dtype=kv)
    b, h, lq, lk, d, offset = 1, 6, 2, 448, 64, 20
    q, k, v = qkv(b, h, lq, lk, d)
    mask = decode_mask(lq, lk, offset)
    n = offset + lq - 1  # slots any row may see
    per_head = torch.zeros(b, h, lq, 60)  # head i sees the first 5 * (i + 1) slots; the rest is NaN per head
    _, k2, v2 = qkv(b, h, lq, 60, d, seed=1)
    for i in range(h):
        per_head[:, i, :, 5 * (i + 1):] = NEG
    for kk, vv, m, seen in ((k, v, mask, lambda t: t[:, :, :n]), (k2, v2, per_head, None)):
        allowed = (m > NEG).expand(b, h, lq, -1).any(2)  # [B, H, Lk]: key rows some query row may see
        if kv == "float32":
            kk, vv = (t.masked_fill(~allowed[..., None], float("nan")) for t in (kk, vv))
            out, ref_k, ref_v = kern(q, kk, vv, m), kk, vv
        else:
            (kq, ks), (vq, vs) = quantize_activation_per_row(kk), quantize_activation_per_row(vv)
            ref_k, ref_v = kq.float() * ks, vq.float() * vs
            garbage = torch.randint(-128, 128, kq.shape, dtype=torch.int8)
            kq, vq = (torch.where(allowed[..., None], t, garbage) for t in (kq, vq))
            ks, vs = (t.masked_fill(~allowed[..., None], float("nan")) for t in (ks, vs))
            out = kern(q, kq, vq, m, key_scale=ks, value_scale=vs)
        assert torch.isfinite(out).all()
        if seen is not None:  # attention over the first n rows only
            assert_close(out, sdpa(q, seen(ref_k), seen(ref_v), m[:, :n]), "NaN in masked rows")
        else:
            assert_close(out, sdpa(q, ref_k.nan_to_num(), ref_v.nan_to_num(), m), "per-head NaN rows")


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_parallel_split(target, kv):
    """par_min = 0 forces the OpenMP split on small shapes (results must not depend on it)."""
    kern = attention_kernel(8, target, kv_dtype=kv)
    old_min, old_threads = kern.par_min, torch.get_num_threads()
    try:
        kern.par_min = 0
        torch.set_num_threads(2)
        for b, h, lq, lk in ((1, 6, 1, 50), (2, 3, 5, 17), (1, 1, 1, 9)):
            q, k, v = qkv(b, h, lq, lk, 8)
            mask = decode_mask(lq, lk, 3)
            assert_close(*run(kern, q, k, v, mask), f"split {(b, h, lq, lk)}")
            assert_close(*run(kern, q, k, v), f"split {(b, h, lq, lk)} no mask")
    finally:
        kern.par_min = old_min
        torch.set_num_threads(old_threads)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_long_keys_and_concurrent_callers(target, kv):
    """Lk > 2048 (heap scratch instead of stack), and Python threads calling one kernel at once."""
    kern = attention_kernel(8, target, kv_dtype=kv)
    q, k, v = qkv(1, 2, 3, 3000, 8)
    mask = decode_mask(3, 3000, 2500)
    assert_close(*run(kern, q, k, v), "Lk=3000")
    assert_close(*run(kern, q, k, v, mask), "Lk=3000 masked")
    cases = [qkv(1, h, lq, 20 * h, 8, seed=h) for h in range(1, 9) for lq in (1, 3)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: run(kern, *c), cases))
    for out, ref in results:
        assert_close(out, ref, "concurrent")


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_int8_query_extremes(target):
    """The avx512 int8 kernel splits each q row into int8 digits (vpdpbusd): zero, tiny and huge rows keep
    their accuracy, and a NaN or inf in q makes that output row NaN as in torch."""
    kern = attention_kernel(64, target, kv_dtype="int8")
    q, k, v = qkv(1, 2, 5, 100, 64)
    q[0, 0, 0] = 0.0
    q[0, 0, 1] *= 1e-30
    q[0, 0, 2] *= 1e5 / q[0, 0, 2].abs().max()  # scores ~ +-1e6: one-hot attention
    q[0, 0, 3, 7] = float("nan")
    q[0, 1, 4, 3] = float("inf")
    out, ref = run(kern, q, k, v)
    bad = ref.isnan()
    assert bad[0, 0, 3].all() and bad[0, 1, 4].all() and bad.sum() == 2 * 64
    assert torch.equal(out.isnan(), bad)
    assert_close(out.nan_to_num(), ref.nan_to_num(), "extreme q rows")


@pytest.mark.skipif("avx2" not in RUNNABLE, reason="host cannot run avx2 kernels")
@pytest.mark.parametrize("kv", KV)
def test_avx2(kv):
    kern = attention_kernel(40, "avx2", kv_dtype=kv)
    q, k, v = qkv(2, 6, 4, 448, 40)
    assert_close(*run(kern, q, k, v, decode_mask(4, 448, 30)), "avx2")


def test_errors():
    kern = attention_kernel(8, "portable")
    q, k, v = qkv(1, 2, 3, 5, 8)
    with pytest.raises(UnsupportedOp, match="q must be a float32 tensor, got torch.float64"):
        kern(q.double(), k, v)
    with pytest.raises(UnsupportedOp, match="value must be a float32"):
        kern(q, k, v.half())
    with pytest.raises(UnsupportedOp, match="key must be a float32 tensor, got list"):
        kern(q, k.tolist(), v)
    with pytest.raises(ValueError, match=r"key must be 4-D \[B, H, L, D\], got shape \(2, 5, 8\)"):
        kern(q, k[0], v)
    with pytest.raises(UnsupportedOp, match="head dim 16, this kernel is compiled for 8"):
        kern(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="shapes do not match"):
        kern(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))  # H
    with pytest.raises(ValueError, match="shapes do not match"):
        kern(q, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))  # B
    with pytest.raises(ValueError, match="shapes do not match"):
        kern(q, k, torch.randn(1, 2, 6, 8))  # value length
    with pytest.raises(ValueError, match="not broadcastable"):
        kern(q, k, v, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="not broadcastable"):
        kern(q, k, v, torch.zeros(3, 4))
    with pytest.raises(UnsupportedOp, match="mask must be bool or float32"):
        kern(q, k, v, torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        attention_kernel(0, "portable")
    with pytest.raises(UnsupportedOp, match="reference"):
        attention_kernel(8, "reference")
    with pytest.raises(ValueError, match="unknown codegen target"):
        attention_kernel(8, "sse2")


def test_int8_errors():
    """int8 / float32 key-value mix-ups and missing or malformed scales name the fix."""
    kern8, kern = attention_kernel(8, "portable", kv_dtype="int8"), attention_kernel(8, "portable")
    q, k, v = qkv(1, 2, 3, 5, 8)
    (kq, ks), (vq, vs) = quantize_activation_per_row(k), quantize_activation_per_row(v)
    with pytest.raises(UnsupportedOp, match=r"key must be an int8 tensor, got torch.float32 \(quantize with"):
        kern8(q, k, v, key_scale=ks, value_scale=vs)
    with pytest.raises(UnsupportedOp, match="value must be an int8 tensor"):
        kern8(q, kq, v, key_scale=ks, value_scale=vs)
    with pytest.raises(UnsupportedOp, match="q must be a float32 tensor, got torch.int8"):
        kern8(kq, kq, vq, key_scale=ks, value_scale=vs)
    with pytest.raises(ValueError, match="int8 key / value need key_scale and value_scale"):
        kern8(q, kq, vq)
    with pytest.raises(ValueError, match="need key_scale and value_scale"):
        kern8(q, kq, vq, key_scale=ks)
    with pytest.raises(UnsupportedOp, match="value_scale must be a float32 tensor, got torch.float64"):
        kern8(q, kq, vq, key_scale=ks, value_scale=vs.double())
    with pytest.raises(ValueError, match=r"key_scale must have shape \[B, H, Lk, 1\] = \[1, 2, 5, 1\], got \(1, 2, 5\)"):
        kern8(q, kq, vq, key_scale=ks[..., 0], value_scale=vs)
    with pytest.raises(ValueError, match="shapes do not match"):
        kern8(q, kq, vq[:, :, :4], key_scale=ks, value_scale=vs)
    with pytest.raises(UnsupportedOp, match=r"key must be a float32 tensor, got torch.int8 \(.*kv_dtype='int8'"):
        kern(q, kq, vq)
    with pytest.raises(ValueError, match="key_scale / value_scale are for int8 key / value"):
        kern(q, k, v, key_scale=ks, value_scale=vs)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        attention_kernel(8, "portable", kv_dtype="int4")


def test_target_the_host_cannot_run():
    fake = Target("nohost", ("no_such_cpu_flag",), (), "portable")
    kern = attention_kernel(8, fake)
    assert not kern.runnable
    with pytest.raises(RuntimeError, match="which this CPU cannot run"):
        kern(*qkv(1, 1, 1, 2, 8))


def test_cache_and_generated_source():
    kern = attention_kernel(64, "portable")
    assert isinstance(kern, AttentionKernel) and attention_kernel(64, TARGETS["portable"]) is kern
    assert kern.name == "attention_portable_d64" and kern.head_dim == 64 and kern.kv_dtype == "float32"
    assert "#define FX_D 64\n" in kern.source and "immintrin.h" not in kern.source
    assert "void fx_attention(const float *q, const float *k, const float *v, const float *mask" in kern.source
    kern8 = attention_kernel(64, "portable", kv_dtype="int8")
    assert kern8 is not kern and kern8.name == "attention_portable_d64_kv8" and kern8.kv_dtype == "int8"
    assert "const int8_t *k, const int8_t *v" in kern8.source and "const float *ks, const float *vs)" in kern8.source
    assert attention_kernel(64, "portable", kv_dtype="float32") is kern
    if "avx512" in RUNNABLE:
        src = attention_kernel(80, "avx512").source
        assert "#define FX_D 80\n" in src and "#include <immintrin.h>" in src
        assert "_mm512_maskz_compress_epi32" in src and "fx_hsum16" in src and "dpbusd" not in src
        assert attention_kernel(80, "native") is attention_kernel(80, "avx512")
        src8 = attention_kernel(80, "avx512", kv_dtype="int8").source
        assert "_mm512_dpbusd_epi32" in src8 and "fx_rows4" in src8
