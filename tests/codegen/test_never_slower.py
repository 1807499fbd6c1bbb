"""Never slower than the float model: the codegen pass times each kernel against the torch op it replaces."""
from __future__ import annotations

import time
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.codegen import Float32Fallback, attach
from fxquant.codegen.never_slower import decide, slower_kernel, time_pair
from fxquant.ops import FusedAttention, LowbitLinear
from fxquant.qweight import dequantize

from .codegen_cases import make_input, make_linear
from .test_conv_attach import make_conv

SLOW_OUT = 48  # the layer whose kernel the tests slow down
# one thread: on a busy machine torch's OpenMP can take milliseconds for a tiny F.linear at two threads, which
# would (rightly) keep the slowed kernel and make these tests depend on the machine's load
# kernel_prebuild_done: no background compilers competing with the timings
pytestmark = pytest.mark.usefixtures("one_thread", "kernel_prebuild_done")


class SlowKernel:
    """A real kernel plus `delay` seconds per call (what a kernel slower than torch looks like)."""

    def __init__(self, inner, delay: float = 0.003):
        self.inner, self.delay = inner, delay

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __deepcopy__(self, memo):
        return self


@pytest.fixture
def slow_layer(monkeypatch):
    """compile_op gives the layer with SLOW_OUT outputs a kernel 3 ms slower than it is."""
    real = attach.compile_op

    def compile_op(op, target, cache_dir=None):
        k = real(op, target, cache_dir)
        return SlowKernel(k) if isinstance(op, LowbitLinear) and op.codes.shape[0] == SLOW_OUT else k

    monkeypatch.setattr(attach, "compile_op", compile_op)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fast = nn.Linear(64, 96)
        self.slow = nn.Linear(96, SLOW_OUT)

    def forward(self, x):
        return self.slow(torch.relu(self.fast(x)))


def _ops(cm) -> dict[str, LowbitLinear]:
    return {n: m for n, m in cm.graph_module.named_modules() if isinstance(m, LowbitLinear)}


def test_the_fallback_is_the_fp32_op_on_the_dequantized_weights():
    op = make_linear(24, 40, 4, 32, "asym", True, "gelu", 8)
    gen = torch.Generator().manual_seed(1)
    w_ln, b_ln = torch.rand(40, generator=gen) + 0.5, torch.randn(40, generator=gen)
    op.fuse_layer_norm(w_ln, b_ln, 1e-5)
    op.residual = True
    x, res = make_input(5, 40, zero_rows=False), torch.randn(5, 24, generator=gen)
    want = F.gelu(F.linear(F.layer_norm(x, (40,), w_ln, b_ln, 1e-5), dequantize(op.qweight), op.bias)) + res
    fb = Float32Fallback(op)
    torch.testing.assert_close(fb(x, residual=res), want, rtol=0, atol=0)
    assert fb.weight_bytes() == 24 * 40 * 4
    op.kernel = fb                                     # the op calls it like a kernel
    torch.testing.assert_close(op(x, res), want, rtol=0, atol=0)
    conv = make_conv(8, 12, (3,), (1,), (2,), (2,), 2, None, "relu")
    xc = torch.randn(2, 8, 17)
    want = F.relu(F.conv1d(xc, dequantize(conv.qweight).view(conv.weight_shape), conv.bias, 1, 2, 2, 2))
    torch.testing.assert_close(Float32Fallback(conv)(xc), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kernel_ms, fp32_ms, slower",
    [(5.3, 1.1, True), (1.05, 1.0, False), (0.012, 0.008, False), (0.030, 0.010, True), (0.5, 0.9, False)],
)
def test_the_kernel_must_be_clearly_slower_to_be_replaced(kernel_ms, fp32_ms, slower):
    assert slower_kernel(kernel_ms, fp32_ms) is slower


DECIDE_CASE = (64, 128, 4, 64, "sym", True, None, 8)


def kernel_jobs() -> list:
    """Zero-argument callables that build the kernels test_decide_times_both_and_keeps_the_faster times
    (tests/codegen/prebuild.py); the compile_lowbit tests build theirs from their models."""
    return [lambda: fxquant.codegen.compile_op(make_linear(*DECIDE_CASE), "native"),
            partial(fxquant.codegen.attention_kernel, 16, "native")]


def test_decide_times_both_and_keeps_the_faster():
    op = make_linear(*DECIDE_CASE)
    kernel = fxquant.codegen.compile_op(op, "native")
    x = make_input(4, 128)
    timing, fallback, name = decide(op, SlowKernel(kernel), (x,), {})
    assert timing.choice == "torch" and timing.kernel_ms > 3.0 and timing.torch_ms < 3.0
    assert isinstance(fallback, Float32Fallback) and name == "torch-fp32"
    assert timing.label(name).startswith("kernel ") and " > fp32 " in timing.label(name)
    assert op.kernel is None  # decide leaves the op as it found it
    att = FusedAttention(head_dim=16)
    q, kv = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 30, 16)
    timing, fallback, name = decide(
        att, SlowKernel(fxquant.codegen.attention_kernel(16, "native")), (q, kv, kv), {}
    )
    assert timing.choice == "torch" and fallback is None and name == "torch-sdpa"


def test_codegen_keeps_torch_where_the_kernel_is_slower(slow_layer, tmp_path):
    model, x = TwoLayers().eval(), torch.randn(3, 64)
    cm = fxquant.compile_lowbit(model, (x,), bits=8)  # default pipeline: codegen{never_slower=true}
    ops = _ops(cm)
    slow = next(op for op in ops.values() if op.codes.shape[0] == SLOW_OUT)
    assert slow.backend.startswith("torch-fp32 (kernel ") and " > fp32 " in slow.backend, slow.backend
    assert isinstance(slow.kernel, Float32Fallback) and slow.kernel_choice == "torch"
    rows = {r["module"]: r["backend"] for r in cm.report_rows()}
    assert rows["slow"] == slow.backend  # the report shows the choice and both timings
    fast = next(op for op in ops.values() if op.codes.shape[0] != SLOW_OUT)
    assert (
        " ms " in fast.backend and "fp32" in fast.backend
    )  # timed too: "c:avx512 (kernel .. ms <= fp32 .. ms)"
    with torch.no_grad():
        h = torch.relu(fast(x))
        want = F.linear(h, dequantize(slow.qweight), slow.bias)
        torch.testing.assert_close(cm(x), want, rtol=1e-6, atol=1e-6)
    # the choice is part of the artifact and comes back on load, untimed
    loaded = fxquant.load(cm.save(tmp_path / "m"))
    lslow = next(op for op in _ops(loaded).values() if op.codes.shape[0] == SLOW_OUT)
    assert isinstance(lslow.kernel, Float32Fallback) and lslow.backend.startswith("torch-fp32")
    torch.testing.assert_close(loaded(x), cm(x), rtol=0, atol=0)


def test_never_slower_false_keeps_every_kernel(slow_layer):
    model, x = TwoLayers().eval(), torch.randn(3, 64)
    pipe = fxquant.default_pipeline("native").replace(",codegen", ",codegen{never_slower=false}")
    cm = fxquant.compile_lowbit(model, (x,), bits=8, passes=pipe)
    assert all(
        op.backend.startswith("c:") and isinstance(op.kernel, (SlowKernel, fxquant.codegen.LinearKernel))
        for op in _ops(cm).values()
    )
    assert not any("kernel_choice" in vars(op) for op in _ops(cm).values())


def test_one_preempted_call_does_not_decide():
    """The first timed call of the faster callable stalls (as when another process takes its core): the
    medians over the minimum number of pairs still rank the two correctly."""
    calls = {"n": 0}

    def usually_fast():
        calls["n"] += 1
        time.sleep(0.02 if calls["n"] == 2 else 0.0)    # call 1 is the warm-up, call 2 the first timed one

    def steady():
        time.sleep(0.002)

    fast_ms, steady_ms = time_pair(usually_fast, steady, budget_s=0.0)
    assert calls["n"] >= 4                                # warm-up + at least min_reps (3) timed calls
    assert fast_ms < steady_ms
