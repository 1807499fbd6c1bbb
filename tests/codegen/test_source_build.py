"""Generated source text (golden-style), targets, the build cache and compiler errors."""
from __future__ import annotations

import subprocess

import pytest
import torch

from fxquant import codegen
from fxquant.codegen import build, compile_op, render_linear
from fxquant.codegen.render import render_conv_grouped
from fxquant.codegen.targets import TARGETS, Target, detect_host, resolve_target

from .codegen_cases import make_linear, make_qweight

SYM4 = "{ -8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7 }"


def test_avx512_source_is_specialized():
    qw = make_qweight(13, 70, 4, 32)
    name, src = render_linear(qw, "avx512", has_bias=True, epilogue="gelu", act_bits=8)
    assert name == "linear_avx512_w4g32"
    for line in (
        "#define FX_N 13",
        "#define FX_K 70",
        "#define FX_GS 32",
        "#define FX_G 3",
        "#define FX_GSP 32",
        "#define FX_NB 1",
        "static const int8_t FX_LEVELS[1][FX_L] = {",
        SYM4,
        "_mm512_permutexvar_epi8",
        "_mm512_dpbusd_epi32",
        "r = fx_gelu16(r)",
        "_mm512_maskz_loadu_ps(k, bias + n0)",
    ):
        assert line in src, line
    assert "_mm512_shuffle_epi8" not in src  # 2/4-bit shared tables: mask-free 64-entry vpermb
    src3 = render_linear(make_qweight(13, 70, 3, 64), "avx512", False, None, 8)[1]
    assert "_mm512_shuffle_epi8" in src3 and "_mm512_mask_add_epi8" in src3 and "bias + n0" not in src3
    src6 = render_linear(make_qweight(13, 70, 6, 64), "avx512", False, None, 8)[1]
    assert "_mm512_permutexvar_epi8(c[j], T->t0)" in src6
    src_cb = render_linear(make_qweight(13, 70, 4, 32, "row_cb"), "avx512", False, None, 8)[1]
    assert "_mm512_mask_shuffle_epi8" in src_cb


def test_portable_and_f32_sources():
    qw = make_qweight(13, 70, 3, None, "asym")
    name, src = render_linear(qw, "portable", False, "relu", 8)
    assert name == "linear_portable_w3gc" and "#define FX_GS 70" in src and "#define FX_G 1" in src
    assert "static const int8_t FX_LEVELS[8][FX_L]" in src and "{ 0, 1, 2, 3, 4, 5, 6, 7 }" in src
    assert "tidx[" in src and "v > 0.0f ? v : 0.0f" in src
    name, src = render_linear(make_qweight(13, 70, 4, 32), "portable", True, None, None)
    assert name == "linear_portable_w4g32_f32" and "fp32 activations" in src


def test_big_tables_and_weights_are_blobs_not_literals():
    qw = make_qweight(512, 300, 4, 32, "row_cb")  # 512 tables x 16 = 8 KiB > 4 KiB
    src = render_linear(qw, "portable", False, None, 8)[1]
    assert "static const int8_t FX_LEVELS" not in src and "#define FX_LEVEL_TABLE(blob) (blob)" in src
    assert len(src) < 20000  # packed codes never appear as C literals


def test_conv_source():
    qw = make_qweight(12, 3, 4, None)
    src = render_conv_grouped(
        "conv_portable_g12_w4", qw, (12, 1, 1, 3), (1, 1), (0, 2), (1, 2), 12, True, "silu"
    )
    for line in ("#define FX_CIN 12", "#define FX_KW 3", "float acc = bias[co];", "fx_silu(v)"):
        assert line in src, line


def test_targets():
    avx512 = frozenset("avx512f avx512bw avx512vl avx512_vnni avx512vbmi avx2 fma".split())
    assert detect_host(avx512).name == "avx512"
    assert detect_host(frozenset({"avx2", "fma", "avx_vnni"})).name == "avx2"
    assert detect_host(frozenset({"sse2"})).name == "portable"
    assert "-mavx512vnni" in TARGETS["avx512"].flags and "-fopenmp-simd" in TARGETS["portable"].flags
    assert "-fopenmp" not in TARGETS["portable"].flags  # threads come from fxquant's pool, not libgomp
    assert resolve_target("native") == detect_host()
    with pytest.raises(ValueError, match="choose one of"):
        resolve_target("avx1024")


TARGET_NAMES = ["portable", "avx2", "avx512"]
EVERY_TARGET_CASE = (24, 64, 4, 32, "asym", True, "gelu", 8)
FOREIGN_CASE = (16, 32, 4, 32)


def kernel_jobs() -> list:
    """Zero-argument callables that build the kernels the tests here compile into the session's cache
    (tests/codegen/prebuild.py); the foreign-CPU kernel has the avx512 source, so it is that one."""
    jobs = [lambda t=t: compile_op(make_linear(*EVERY_TARGET_CASE), t) for t in TARGET_NAMES]
    return jobs + [lambda: compile_op(make_linear(*FOREIGN_CASE), "avx512")]


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_every_target_compiles(target):
    """Kernels for targets the host may not run are still generated and compiled."""
    op = make_linear(*EVERY_TARGET_CASE)
    kern = compile_op(op, target)
    assert kern.name.startswith(f"linear_{target}_") and kern.target.name == target


def test_kernel_for_foreign_cpu_refuses_to_run(monkeypatch):
    fake = Target("avx512", ("no_such_cpu_flag",), TARGETS["avx512"].isa_flags, "avx512")
    kern = compile_op(make_linear(*FOREIGN_CASE), fake)
    with pytest.raises(RuntimeError, match="cannot run"):
        kern(torch.randn(1, 32))


def test_cache_second_build_skips_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    op = make_linear(16, 32, 2, 32, "sym", True, "relu", 8)
    before = build.STATS["compiles"]
    compile_op(op, "portable")
    assert build.STATS["compiles"] == before + 1
    assert len(list(tmp_path.glob("*.so"))) == 1 and len(list(tmp_path.glob("*.c"))) == 1

    real = subprocess.run

    def no_compiler(cmd, *a, **kw):
        if "-o" in cmd:
            raise AssertionError("compiler called for a cached kernel")
        return real(cmd, *a, **kw)

    monkeypatch.setattr(build.subprocess, "run", no_compiler)
    kern = compile_op(op, "portable")
    assert build.STATS["compiles"] == before + 1
    x = torch.randn(2, 32)
    torch.testing.assert_close(kern(x), op.reference(x), rtol=1e-5, atol=1e-5)


def test_no_compiler_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("FXQUANT_CACHE_DIR", str(tmp_path))
    with pytest.raises(codegen.BuildError) as info:
        compile_op(make_linear(16, 32, 3, 32), "portable")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "/nonexistent/cc" in msg and "gcc" in msg and 'target="reference"' in msg


def test_failed_compile_leaves_nothing_behind(tmp_path):
    with pytest.raises(codegen.BuildError, match="failed"):
        build.compile_source("this is not C;", "broken", ("-O1", "-fPIC", "-shared"), str(tmp_path))
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*"))
