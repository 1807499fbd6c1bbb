"""Every linear kernel vs op.reference over shapes, bit widths, table formats, groups, epilogues.

Every op a test here compiles comes from the case lists and builders below, which `kernel_jobs` hands to the
background build of a cold run (tests/codegen/prebuild.py)."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from fxquant.codegen import TARGETS, compile_op

from .codegen_cases import assert_close, make_input, make_linear

MS = (1, 2, 3, 8, 61)
RUNNABLE = [t for t in ("avx512", "avx2", "portable") if TARGETS[t].runnable()]

# (n, k, bits, group, fmt, bias, epilogue, act_bits)
AVX512_CASES = (
    [(13, 70, b, 32, "sym", True, None, 8) for b in (2, 3, 4, 5, 6, 7, 8)]
    + [(40, 100, b, g, "sym", False, None, 8) for b in (2, 3, 4, 8) for g in (64, 128, None)]
    + [(13, 100, b, 64, "asym", True, None, 8) for b in (2, 3, 4, 5, 6, 7)]
    + [(13, 70, b, 32, "row_cb", True, None, 8) for b in (2, 3, 4)]
    + [(21, 100, 4, 32, "group_cb", False, None, 8), (17, 96, 8, 32, "row_cb", False, None, None)]
    + [(13, 70, 4, 32, "sym", True, e, 8) for e in ("relu", "gelu", "silu")]
    + [
        (13, 70, b, 32, f, True, "gelu", None)
        for b, f in ((2, "sym"), (4, "asym"), (3, "row_cb"), (8, "sym"))
    ]
)
PORTABLE_CASES = [(13, 70, b, 32, "sym", True, None, 8) for b in (2, 3, 4, 5, 8)] + [
    (13, 100, 4, None, "asym", False, "silu", 8),
    (13, 70, 6, 32, "row_cb", True, "relu", 8),
    (21, 100, 4, 32, "group_cb", False, None, 8),
    (20, 70, 8, 32, "row_cb", False, None, 8),
    (13, 70, 4, 64, "asym", True, "gelu", None),
]
AVX2_CASES = PORTABLE_CASES[:3] + PORTABLE_CASES[-2:]
LARGE_M_CASES = [
    (40, 64, 4, 64, "sym", True, "gelu", 8),
    (13, 100, 2, None, "asym", False, None, 8),
    (19, 64, 3, 32, "row_cb", True, None, None),
]
MAGNITUDES_CASE = (24, 64, 4, 32, "sym", True, None, 8)
EXACT_CASES = [(fmt, group) for group in (32, None) for fmt in ("sym", "asym", "row_cb")]
EPILOGUES = ["gelu", "silu", "relu"]
FUSED_CASES = [
    (40, 64, 4, 32, "sym", True, None, 8),
    (24, 70, 3, None, "row_cb", False, "gelu", 8),
    (19, 96, 4, 32, "asym", True, None, None),
]
FUSIONS = ["ln", "res", "ln+res"]


def exact_op(fmt: str, group: int | None):
    """Power-of-two scales and no bias (test_integer_accumulators_bit_exact)."""
    return make_linear(37, 100, 4, group, fmt, bias=False, pow2_scales=True)


def epilogue_op(epilogue: str):
    """96 outputs whose biases span the epilogue's range (test_epilogue_functions_over_a_wide_range)."""
    op = make_linear(96, 32, 8, None, "sym", True, epilogue, 8)
    op.bias = torch.cat(
        [
            torch.linspace(-30, 30, 80),
            torch.tensor(
                [0.0, -1e-6, 1e-6, -0.5, 0.5, 1.0, -1.0, 3.0, -3.0, 6.0, -6.0, 12.0, -12.0, 88.0, -88.0, 1e-3]
            ),
        ]
    )
    return op


def fused_op(case, fusion: str):
    """(op with a fused LayerNorm and / or residual add, the generator that drew its LayerNorm weights)."""
    n, k, bits, group, fmt, bias, epi, act = case
    op = make_linear(n, k, bits, group, fmt, bias, epi, act)
    gen = torch.Generator().manual_seed(3)
    if "ln" in fusion:
        op.fuse_layer_norm(
            torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen) if bias else None, 1e-5
        )
    op.residual = "res" in fusion
    return op, gen


def kernel_jobs() -> list:
    """Zero-argument callables that build every kernel the tests below compile (for the background build)."""
    cases = [("avx512", c) for c in AVX512_CASES if "avx512" in RUNNABLE]
    cases += [("portable", c) for c in PORTABLE_CASES]
    cases += [("avx2", c) for c in AVX2_CASES if "avx2" in RUNNABLE]
    cases += [(t, c) for t in RUNNABLE for c in LARGE_M_CASES + [MAGNITUDES_CASE]]
    jobs = [partial(_compile, partial(make_linear, *c), t) for t, c in cases]
    jobs += [partial(_compile, partial(exact_op, *c), t) for t in RUNNABLE for c in EXACT_CASES]
    jobs += [partial(_compile, partial(epilogue_op, e), t) for t in RUNNABLE for e in EPILOGUES]
    return jobs + [
        partial(_compile, lambda c=c, f=f: fused_op(c, f)[0], t)
        for t in RUNNABLE for c in FUSED_CASES for f in FUSIONS
    ]


def _compile(make_op, target):
    return compile_op(make_op(), target)


def _check(target, case, ms=MS):
    op, k = make_linear(*case), case[1]
    kern = compile_op(op, target)
    for m in ms:
        x = make_input(m, k, seed=m)
        assert_close(kern(x), op.reference(x), f"{kern.name} {case} M={m}")


@pytest.mark.skipif("avx512" not in RUNNABLE, reason="host cannot run avx512 kernels")
@pytest.mark.parametrize("case", AVX512_CASES, ids=str)
def test_avx512_linear(case):
    _check("avx512", case)


@pytest.mark.parametrize("case", PORTABLE_CASES, ids=str)
def test_portable_linear(case):
    _check("portable", case)


@pytest.mark.skipif("avx2" not in RUNNABLE, reason="host cannot run avx2 kernels")
@pytest.mark.parametrize("case", AVX2_CASES, ids=str)
def test_avx2_linear(case):
    _check("avx2", case)


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("case", LARGE_M_CASES, ids=str)
def test_large_m(target, case):
    """M=1500 (the encoder's frame count): blocked path, and the M split when N has few row blocks."""
    _check(target, case, ms=(1500,))


@pytest.mark.parametrize("target", RUNNABLE)
def test_large_magnitudes_and_leading_dims(target):
    op = make_linear(*MAGNITUDES_CASE)
    kern = compile_op(op, target)
    x = make_input(6, 64, big=True).view(2, 3, 64)
    assert_close(kern(x), op.reference(x), "big")
    xb = x.to(torch.bfloat16)
    y = kern(xb)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    assert kern(torch.zeros(0, 64)).shape == (0, 24)
    out = torch.empty(6, 24)
    assert kern(x.view(6, 64), out=out) is out
    assert_close(out, op.reference(x.view(6, 64)), "out=")
    with pytest.raises(ValueError, match="out must be"):
        kern(x.view(6, 64), out=torch.empty(5, 24))


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("fmt", ["sym", "asym", "row_cb"])
@pytest.mark.parametrize("group", [32, None])
def test_integer_accumulators_bit_exact(target, fmt, group):
    """Power-of-two scales, no bias: every fp32 step before the final *s_a is exact, so the outputs
    equal the reference bit for bit iff every per-group int32 accumulator is exact."""
    op = exact_op(fmt, group)
    kern = compile_op(op, target)
    for m in (1, 3, 8, 61):
        x = make_input(m, 100, seed=m)
        assert torch.equal(kern(x), op.reference(x)), f"{kern.name} fmt={fmt} M={m}"


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_epilogue_functions_over_a_wide_range(target, epilogue):
    """Zero activations leave y = epilogue(bias): the (vectorised) epilogue itself against torch."""
    from fxquant.ops import EPILOGUES as FUNCTIONS

    op = epilogue_op(epilogue)
    kern = compile_op(op, target)
    y = kern(torch.zeros(3, 32))
    want = FUNCTIONS[epilogue](op.bias)[None].expand(3, -1)
    torch.testing.assert_close(y, want, rtol=3e-6, atol=1e-6)


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_fused_layernorm_and_residual(target, case, fusion):
    """LayerNorm prologue (float64 statistics) and residual add inside the kernel vs op.reference."""
    n, k = case[:2]
    op, gen = fused_op(case, fusion)
    kern = compile_op(op, target)
    assert ("_ln" in kern.name) == ("ln" in fusion) and ("_res" in kern.name) == ("res" in fusion)
    for m in (1, 3, 61, 1500):
        x = make_input(m, k, seed=m) * 3 + 1  # rows with a mean and a scale to remove
        res = torch.randn(m, n, generator=gen) if op.residual else None
        y = kern(x, residual=res)
        assert_close(y, op.reference(x, res), f"{kern.name} {fusion} M={m}")
    if op.residual:
        with pytest.raises(ValueError, match="contiguous float32 residual of shape"):
            kern(x, residual=torch.randn(m, n + 1))
    else:
        with pytest.raises(ValueError, match="no fused residual add"):
            kern(x, residual=torch.randn(m, n))
